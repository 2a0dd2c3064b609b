"""``axolotl-mote export``: one plain PEFT LoRA adapter per stage, for serving."""

from __future__ import annotations

import click

from axolotl_mote.cli import options


@click.command()
@click.option(
    "--adapter",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Trained MoTE adapter dir (with mote_config.json).",
)
@options.output("Folder: writes OUTPUT/<stage name>/ per stage.")
@click.option(
    "--stage",
    "stages",
    multiple=True,
    help="Stage name or record key (repeatable; default: every trained stage).",
)
@click.option(
    "--lora-only",
    is_flag=True,
    help="Only LoRA A/B (no marker rows / embeddings): for servers that load "
    "nothing else; the served base must already hold the marker rows.",
)
@click.option(
    "--serving",
    is_flag=True,
    help="Write a serving bundle instead: base model with the marker rows, one "
    "LoRA-only adapter per stage plus `prompt`, manifest.json and the vLLM/SGLang "
    "command lines (README.md in OUTPUT).",
)
@options.base_model("Base model for --serving (default: the adapter's).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="dtype of the --serving base model.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace existing stage folders (--serving: write into a non-empty OUTPUT).",
)
def export(adapter: str, output: str, stages: tuple[str, ...], lora_only: bool,
           serving: bool, base_model: str | None, dtype: str,
           force: bool) -> None:  # fmt: skip
    """Fold each stage's expert with the shared expert into a plain rank-2r LoRA.

    Refuses to replace an existing stage folder (--serving: a non-empty OUTPUT)
    unless --force is given.
    """
    from pathlib import Path

    from axolotl_mote.export import export_stage_adapters

    if serving:
        from axolotl_mote.serving.bundle import write_serving_bundle

        out = Path(output)
        if out.is_dir() and any(out.iterdir()) and not force:
            raise click.ClickException(
                f"{out} exists and is not empty; pass --force to write the bundle "
                "into it anyway"
            )
        try:
            manifest = write_serving_bundle(adapter, output, base_model, dtype)
        except (FileNotFoundError, ValueError) as err:
            raise click.ClickException(str(err)) from err
        click.echo((Path(manifest).parent / "README.md").read_text())
        return

    try:
        written = export_stage_adapters(
            adapter, output, list(stages) or None, lora_only, overwrite=force
        )
    except FileExistsError as err:
        message = str(err).replace("overwrite=True", "--force")
        raise click.ClickException(message) from err
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    for name, path in written.items():
        click.echo(f"{name}: {path}")
    click.echo(
        "Each is a plain PEFT LoRA (PeftModel.from_pretrained, axolotl merge-lora, "
        "vLLM --lora-modules). A server that switches adapters per request "
        "recomputes the earlier stages with the new adapter; MoTE keeps each stage's "
        "own expert (docs/serving.md)."
    )
