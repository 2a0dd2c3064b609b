"""``axolotl-mote validate``, ``template`` and ``build-tiny-model``: data and
templates."""

from __future__ import annotations

import json
from pathlib import Path

import click

from axolotl_mote.cli import options


@click.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@options.config("An Axolotl YAML: check its axolotl_mote datasets with its template.")
@options.template(default=None)
@click.option(
    "--max-errors",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="List at most this many bad records per file (the rest are counted).",
)
def validate(files, config, template, max_errors) -> None:
    """Check chain JSONL FILES (or a config's datasets) record by record.

    Every bad record is reported with file:line, the field and the fix; the exit
    status is 1 when any file has one.
    """
    from axolotl_mote.data.schema import check_jsonl
    from axolotl_mote.templates import load_template

    paths = [Path(f) for f in files]
    if config:
        from axolotl_mote.integration.config import dataset_files

        cfg = options.read_yaml(config)
        root = Path(config).resolve().parent
        if template is None:
            block = cfg.get("mote") or {}
            template = load_template((block or {}).get("template") or "aligncot")
        paths += dataset_files(cfg, root=root)
    if not paths:
        raise click.UsageError("give chain JSONL FILES, or --config with datasets")
    template = template or load_template("aligncot")
    bad = 0
    for path in paths:
        if not path.is_file():
            bad += 1
            click.echo(f"{path}: dataset file not found", err=True)
            continue
        report = check_jsonl(path, template, max_errors=max_errors)
        if report.ok:
            click.echo(f"{path}: OK {json.dumps(report.counts())}")
        else:
            bad += 1
            n = len(report.errors) + report.more_errors
            click.echo(f"{path}: {n} bad record(s), {report.records} good", err=True)
            click.echo(report.message(), err=True)
    if bad:
        raise SystemExit(1)


@click.command("template")
@click.argument("name_or_path")
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False),
    help="Render with this tokenizer's chat template (default: a tiny ChatML one).",
)
def template_cmd(name_or_path: str, tokenizer: str | None) -> None:
    """Validate a template (a shipped name or a YAML path) and show what it defines.

    Prints the stages (mode, markers, skippable), the experts, and one chain rendered
    exactly as training sees it, with the step id of every segment.
    """
    from axolotl_mote.data.preview import describe_template
    from axolotl_mote.templates import load_template

    try:
        tmpl = load_template(name_or_path)
        text = describe_template(tmpl, tokenizer)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(text)


@click.command("build-tiny-model")
@options.output("Folder for the model and tokenizer.")
def build_tiny_model_cmd(output: str) -> None:
    """Write a tiny random Llama + tokenizer (offline; for demos and tests)."""
    from axolotl_mote.tiny import build_tiny_model

    click.echo(str(build_tiny_model(output)))
