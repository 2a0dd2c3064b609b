"""``axolotl-mote convert-hh``: seed questions from HH-RLHF-style transcripts."""

from __future__ import annotations

import json

import click

from axolotl_mote.cli import options


@click.command("convert-hh")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@options.output("Seed-question JSONL to write (for `generate-data --input`).")
@click.option(
    "--field",
    "fields",
    multiple=True,
    default=("chosen", "rejected"),
    show_default=True,
    help="Transcript field(s) to read; repeat the option for several.",
)
@click.option("--sample", type=int, help="Keep a seeded random sample of N seeds.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sample.")
@click.option(
    "--max-errors",
    default=20,
    show_default=True,
    help="Malformed lines listed in full (all are counted).",
)
def convert_hh_cmd(inputs, output, fields, sample, seed, max_errors) -> None:
    """Turn HH-RLHF-style JSONL(.gz) transcripts ("\\n\\nHuman: …\\n\\nAssistant: …")
    into seed questions that end with the user turn: multi-turn kept, duplicates
    merged (chosen and rejected share their question), malformed lines reported by
    line."""
    from axolotl_mote.datagen.hh import convert_hh, write_seeds

    if sample is not None and sample < 1:
        raise click.UsageError(f"--sample must be at least 1, got {sample}")
    records, report = convert_hh(
        inputs, fields=fields, sample=sample, seed=seed, max_errors=max_errors
    )
    if not records:
        raise click.ClickException(
            f"no seed question found in {', '.join(inputs)} ({report.malformed} "
            f"malformed line(s); first: {report.errors[:1]}). Expected JSONL with "
            f"{' or '.join(fields)} holding '\\n\\nHuman: …' transcripts"
        )
    write_seeds(records, output)
    click.echo(json.dumps(report.to_dict(), indent=2))
    if report.malformed:
        shown = "\n  ".join(report.errors)
        click.echo(
            f"{report.malformed} malformed transcript(s) skipped:\n  {shown}", err=True
        )
    click.echo(f"wrote {report.written} seed questions to {output}", err=True)
