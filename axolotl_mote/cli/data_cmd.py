"""``axolotl-mote validate`` and ``axolotl-mote build-tiny-model``."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--template", default="aligncot", show_default=True, help="Template name or path."
)
def validate(files: tuple[str, ...], template: str) -> None:
    """Check chain JSONL FILES record by record (file:line errors)."""
    from axolotl_mote.data.schema import ChainRecordError, validate_jsonl
    from axolotl_mote.templates import load_template

    tmpl = load_template(template)
    for path in files:
        try:
            counts = validate_jsonl(path, tmpl)
        except ChainRecordError as err:
            raise click.ClickException(str(err)) from err
        click.echo(f"{path}: OK {json.dumps(counts)}")


@click.command("build-tiny-model")
@click.argument("out_dir", type=click.Path())
def build_tiny_model_cmd(out_dir: str) -> None:
    """Write a tiny random Llama + tokenizer to OUT_DIR (offline; for demos and tests)."""
    from axolotl_mote.tiny import build_tiny_model

    click.echo(str(build_tiny_model(out_dir)))
