"""``axolotl-mote validate``, ``template`` and ``build-tiny-model``: data and
templates."""

from __future__ import annotations

import json
from pathlib import Path

import click

from axolotl_mote.cli import options


@click.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@options.config(
    "An Axolotl YAML: check its axolotl_mote datasets (paths read from the working "
    "directory, as `axolotl train` reads them) with its template, and the chain "
    "lengths against its sequence_len."
)
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
    status is 1 when any file has one. With --config, chains longer than the config's
    sequence_len are counted and named (Axolotl drops them, or stops with
    excess_length_strategy: raise).
    """
    from axolotl_mote.data.schema import check_jsonl
    from axolotl_mote.templates import load_template

    paths = [Path(f) for f in files]
    cfg = None
    bad = 0
    if config:
        from axolotl_mote.integration.config import dataset_files

        cfg = options.read_yaml(config)
        if template is None:
            block = cfg.get("mote") or {}
            template = load_template((block or {}).get("template") or "aligncot")
        problems, notes = config_dataset_locations(cfg, Path(config))
        for line in [*notes, *problems.values()]:
            click.echo(line, err=True)
        bad += len(problems)
        paths += [p for p in dataset_files(cfg) if p not in problems]
    if not paths and not bad:
        raise click.UsageError("give chain JSONL FILES, or --config with datasets")
    template = template or load_template("aligncot")
    lengths = LengthCheck.for_config(cfg, template) if cfg is not None else None
    for path in paths:
        if not path.is_file():
            bad += 1
            click.echo(f"{path}: dataset file not found", err=True)
            continue
        collect = lengths.add if lengths is not None and lengths.ready else None
        report = check_jsonl(path, template, max_errors=max_errors, on_chain=collect)
        if report.ok:
            click.echo(f"{path}: OK {json.dumps(report.counts())}")
        else:
            bad += 1
            n = len(report.errors) + report.more_errors
            click.echo(f"{path}: {n} bad record(s), {report.records} good", err=True)
            click.echo(report.message(), err=True)
        if lengths is not None:
            line, fatal = lengths.finish(path)
            if line:
                click.echo(line, err=True)
            bad += fatal
    if bad:
        raise SystemExit(1)


def config_dataset_locations(
    cfg: dict, config_path: Path
) -> tuple[dict[Path, str], list[str]]:
    """(problems by path, notes) about the config's relative ``axolotl_mote.*``
    dataset paths.

    ``axolotl train`` opens a relative ``path`` from the working directory, never from
    the config's folder. A path found only next to the config is a problem naming both
    locations; one found in both places (two different files) gets a note saying
    which one training reads.
    """
    from axolotl_mote.integration.config import mote_datasets

    problems: dict[Path, str] = {}
    notes: list[str] = []
    here = Path.cwd()
    config_dir = config_path.resolve().parent
    for ds in mote_datasets(cfg):
        raw = Path(str(ds.get("path", "")))
        if raw.is_absolute() or config_dir == here.resolve():
            continue
        there = config_dir / raw
        if not there.exists():
            continue
        if not raw.exists():
            problems[raw] = (
                f"{raw}: dataset not found in the working directory ({here / raw}),"
                f" where `axolotl train` reads it; it is next to the config "
                f"({there}): run from {config_dir}, or give the path relative to "
                "the working directory (or absolute)"
            )
        elif raw.resolve() != there.resolve():
            notes.append(
                f"note: {raw} is read from the working directory ({here / raw}), "
                f"as `axolotl train` reads it; the config's folder holds another "
                f"({there}), which is not used"
            )
    return problems, notes


class LengthCheck:
    """Chains longer than the config's ``sequence_len``, tokenized as training does.

    The tokenizer is the config's (``tokenizer_config``, else ``base_model``) with the
    template's markers added; when it cannot be loaded the check says so and is
    skipped. Over-length chains are a warning (Axolotl drops them, or truncates with
    ``excess_length_strategy: truncate``), an error with ``excess_length_strategy:
    raise``.
    """

    MAX_LISTED = 10
    BATCH = 256

    def __init__(self, formatter, sequence_len: int, strategy: str, skipped: str):
        self.formatter, self.sequence_len = formatter, sequence_len
        self.strategy, self.skipped = strategy, skipped
        self.pending: list = []
        self.too_long: list[tuple[str, int]] = []  # (id or line, tokens)
        self.total = 0

    @property
    def ready(self) -> bool:
        return self.formatter is not None

    @classmethod
    def for_config(cls, cfg: dict, template) -> LengthCheck:
        sequence_len = int(cfg.get("sequence_len") or 2048)
        strategy = str(cfg.get("excess_length_strategy") or "drop").lower()
        source = cfg.get("tokenizer_config") or cfg.get("base_model")
        if not source:
            return cls(None, sequence_len, strategy, "no base_model in the config")
        local = Path(str(source))
        if (local.is_absolute() or str(source).startswith(".")) and not local.exists():
            return cls(None, sequence_len, strategy, f"{source} not found")
        try:
            from transformers import AutoTokenizer

            from axolotl_mote.data.format import ChainFormatter
            from axolotl_mote.markers import add_marker_tokens

            tokenizer = AutoTokenizer.from_pretrained(str(source))
            add_marker_tokens(tokenizer, template)
            formatter = ChainFormatter(template, tokenizer)
            formatter.render([{"role": "user", "content": "x"}])  # a chat template?
        except Exception as err:  # offline, a gated model, no chat template ...
            reason = f"cannot load the tokenizer of {source} ({type(err).__name__}: "
            reason += f"{str(err).splitlines()[0] if str(err) else ''})"
            return cls(None, sequence_len, strategy, reason)
        return cls(formatter, sequence_len, strategy, "")

    def add(self, lineno: int, chain) -> None:
        self.pending.append((chain.id or f"line {lineno}", chain))
        if len(self.pending) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        ids = self.formatter.encode_batch([c for _, c in self.pending])["input_ids"]
        for (name, _), seq in zip(self.pending, ids):
            self.total += 1
            if len(seq) > self.sequence_len:
                self.too_long.append((name, len(seq)))
        self.pending = []

    def finish(self, path: Path) -> tuple[str | None, int]:
        """The file's length line (None: all fit) and 1 when it is an error."""
        if not self.ready:
            return f"{path}: length check skipped: {self.skipped}", 0
        self._flush()
        too_long, total = self.too_long, self.total
        self.too_long, self.total = [], 0
        if not too_long:
            return None, 0
        shown = ", ".join(f"{n} ({k} tokens)" for n, k in too_long[: self.MAX_LISTED])
        more = len(too_long) - self.MAX_LISTED
        fate = {
            "raise": "`axolotl train` stops on them (excess_length_strategy: raise)",
            "truncate": "they are cut to sequence_len (excess_length_strategy: "
            "truncate) and may lose their answer",
        }.get(
            self.strategy, "`axolotl train` drops them (excess_length_strategy: drop)"
        )
        return (
            f"{path}: {len(too_long)} of {total} chains are longer than sequence_len="
            f"{self.sequence_len}: {shown}{f' and {more} more' if more > 0 else ''}; "
            f"{fate}. Raise sequence_len or shorten them",
            int(self.strategy == "raise"),
        )


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
