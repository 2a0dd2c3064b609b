"""The chain record: one JSON object per line, validated against a template.

A record is ``{"id": ..., "messages": [...] | "prompt": "...", <stage keys>..., "meta":
{...}}``. The stage keys come from the template (aligncot: ``analysis``, ``guidance``,
``answer``,
``check``). An absent (or null) stage key means the chain skips that stage.

Shared by the dataset strategy, the pre-flight file check and the data generator, so
every entry point rejects the same records with the same message. Pure Python: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axolotl_mote.templates import PromptTemplate, StageMode

_RESERVED_KEYS = ("id", "messages", "prompt", "meta")
_ROLES = ("system", "user", "assistant")


class ChainRecordError(ValueError):
    """A record that cannot be turned into a chain; the message says where and why.

    ``line``: the file's line that could not be read (bad UTF-8, broken JSON), where
    reading stopped; None for a readable but invalid record."""

    line: int | None = None


def print_record_errors_once() -> None:
    """Make an uncaught :class:`ChainRecordError` print its message alone (no
    traceback) on stderr, process-wide; the exit status stays 1 and every other
    exception keeps Python's traceback. Installed by the plugin: a bad record found by
    ``axolotl train`` (pre-flight, or in a dataset worker whose remote traceback is
    chained to it) is one message, not a stack of tracebacks around it."""
    import sys

    previous = sys.excepthook
    if getattr(previous, "mote_record_errors", False):
        return

    def hook(kind, err, tb):
        if isinstance(err, ChainRecordError):
            sys.stderr.write(f"\n{err}\n")
            sys.stderr.flush()
            return
        previous(kind, err, tb)

    hook.mote_record_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _unreadable(message: str, lineno: int) -> ChainRecordError:
    err = ChainRecordError(message)
    err.line = lineno
    return err


@dataclass
class Chain:
    """A validated chain: the conversation and the text of each present stage."""

    id: str | None
    messages: list[dict[str, str]]
    stages: dict[str, str]  # stage key -> text, only present stages, template order
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The last user turn: the one the chain answers."""
        return self.messages[-1]["content"]


def _where(record: Any, location: str | None) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    parts = [p for p in (location, f"id {rid!r}" if rid is not None else None) if p]
    return "record" + (f" ({', '.join(parts)})" if parts else "")


def parse_chain(
    record: Any, template: PromptTemplate, location: str | None = None
) -> Chain:
    """Validate one raw record and return a :class:`Chain`.

    ``location`` (e.g. ``"data/chains.jsonl:17"`` or ``"row 16"``) is put in every
    error. Raises :class:`ChainRecordError` naming the record, the field and the fix.
    """

    def fail(msg: str) -> ChainRecordError:
        return ChainRecordError(f"{_where(record, location)}: {msg}")

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    stage_keys = template.stage_keys
    # A null value counts as absent: a datasets/Arrow table gives every row every
    # column (None where a record lacks the key), so only a real value is "unknown".
    unknown = [
        k
        for k, v in record.items()
        if k not in _RESERVED_KEYS and k not in stage_keys and v is not None
    ]
    if unknown:
        raise fail(
            f"unknown key(s) {unknown}; stage keys of template {template.name!r} are "
            f"{stage_keys}, other allowed keys are {list(_RESERVED_KEYS)} (put extra "
            "fields under 'meta')"
        )
    rid = record.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise fail(f"field 'id' must be a string, got {type(rid).__name__}")
    messages = _parse_messages(record, fail)

    stages: dict[str, str] = {}
    for stage in template.stages:
        value = record.get(stage.key)
        if value is None:
            if not stage.skippable:
                raise fail(
                    f"missing required stage {stage.key!r} ({stage.name}); every chain "
                    f"must contain it"
                )
            continue
        if not isinstance(value, str):
            raise fail(
                f"stage {stage.key!r} must be a string, got {type(value).__name__}"
            )
        if not value.strip():
            raise fail(
                f"stage {stage.key!r} is empty; remove the key to skip the stage"
            )
        stages[stage.key] = value
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise fail(f"field 'meta' must be an object, got {type(meta).__name__}")
    return Chain(
        id=None if rid is None else str(rid),
        messages=messages,
        stages=stages,
        meta=meta,
    )


def _parse_messages(record: dict[str, Any], fail) -> list[dict[str, str]]:
    prompt, messages = record.get("prompt"), record.get("messages")
    if prompt is not None and messages is not None:
        raise fail("give either 'messages' or 'prompt', not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise fail(f"field 'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise fail("field 'prompt' is empty: there is no user turn")
        return [{"role": "user", "content": prompt}]
    if messages is None:
        raise fail("no user turn: add 'messages' (a list of turns) or 'prompt'")
    if not isinstance(messages, list) or not messages:
        raise fail("field 'messages' must be a non-empty list of {role, content}")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise fail(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = msg.get("role"), msg.get("content")
        if role not in _ROLES:
            raise fail(f"messages[{i}].role is {role!r}; use one of {list(_ROLES)}")
        if role == "system" and i != 0:
            raise fail(f"messages[{i}] is a system message; only the first may be")
        if not isinstance(content, str):
            raise fail(
                f"messages[{i}].content must be a string, got {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise fail(
            "the conversation must end with a user turn (the chain answers the last "
            f"user message); messages[{len(out) - 1}] is {out[-1]['role']!r}"
        )
    if not out[-1]["content"].strip():
        raise fail(f"messages[{len(out) - 1}].content is empty: no user question")
    return out


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)``; a broken line raises with file, line and fix.

    Lines are decoded one by one, so a byte that is not UTF-8 is reported with its line
    and column instead of a bare ``UnicodeDecodeError``.
    """
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _unreadable(
                    f"{path}:{lineno}: byte {raw[err.start]:#04x} at column "
                    f"{err.start + 1} is not UTF-8; save the file as UTF-8 (e.g. "
                    f"`iconv -f latin1 -t utf-8 {Path(path).name}`)",
                    lineno,
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a BOM from some editors
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise _unreadable(
                    f"{path}:{lineno}: not valid JSON ({err.msg} at column "
                    f"{err.colno}); each line must be one JSON object",
                    lineno,
                ) from err


@dataclass
class FileCheck:
    """What :func:`check_jsonl` found in one file."""

    path: str
    records: int = 0  # well-formed records
    stages: dict[str, int] = field(default_factory=dict)  # stage key -> records with it
    errors: list[str] = field(default_factory=list)  # one message per bad record
    more_errors: int = 0  # bad records beyond ``max_errors`` (counted, not listed)
    stopped_at: int | None = None  # the unreadable line the check stopped at
    hint: str | None = None  # e.g. the shipped template whose stage keys fit the file

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self) -> dict[str, int]:
        return {"records": self.records, **self.stages}

    def message(self) -> str:
        """Every listed problem, one per line, and how many more there were."""
        lines = list(self.errors)
        if self.more_errors:
            lines.append(f"... and {self.more_errors} more bad record(s)")
        if self.stopped_at is not None:
            lines.append(
                f"{self.path}: the check stopped at line {self.stopped_at}: the lines "
                f"after it were not read (fix that line and check again)"
            )
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


def check_jsonl(
    path: str | Path,
    template: PromptTemplate,
    max_errors: int | None = 20,
    on_chain: Callable[[int, Chain], None] | None = None,
) -> FileCheck:
    """Check every record of a JSONL file; collect every problem instead of stopping.

    Up to ``max_errors`` messages are kept (None: all); the rest are counted. A file
    that cannot be read on (bad UTF-8, broken JSON) ends the check at that line
    (``stopped_at``, said in the message). An empty file is a problem: it would train
    on nothing. Records with keys of another shipped template get a ``hint`` naming
    it. ``on_chain(line, chain)`` is called for every good record.
    """
    report = FileCheck(str(path))

    def add(message: str) -> None:
        if max_errors is None or len(report.errors) < max_errors:
            report.errors.append(message)
        else:
            report.more_errors += 1

    seen_ids: dict[str, int] = {}
    keys: set[str] = set()  # every non-reserved key with a value, for the hint
    lines = iter_jsonl(path)
    while True:
        try:
            lineno, record = next(lines)
        except StopIteration:
            break
        except ChainRecordError as err:
            add(str(err))
            report.stopped_at = err.line
            break
        if isinstance(record, dict):
            keys.update(k for k, v in record.items() if v is not None)
        try:
            chain = parse_chain(record, template, location=f"{path}:{lineno}")
        except ChainRecordError as err:
            add(str(err))
            continue
        if chain.id is not None:
            if chain.id in seen_ids:
                add(
                    f"{path}:{lineno}: duplicate id {chain.id!r} (first on line "
                    f"{seen_ids[chain.id]}); ids must be unique"
                )
                continue
            seen_ids[chain.id] = lineno
        report.records += 1
        for key in chain.stages:
            report.stages[key] = report.stages.get(key, 0) + 1
        if on_chain is not None:
            on_chain(lineno, chain)
    if report.errors:
        report.hint = template_hint(keys - set(_RESERVED_KEYS), template)
    if report.records == 0 and not report.errors:
        add(
            f"{path}: no records (the file is empty or holds only blank lines); "
            "add one JSON chain record per line"
        )
    return report


def template_hint(keys: set[str], template: PromptTemplate) -> str | None:
    """A shipped template whose stage keys hold every stage-like key of a file that
    ``template`` does not know (the data was written for that template); None if the
    keys fit ``template`` or no shipped one."""
    from axolotl_mote.templates import available_templates, load_template

    if not keys or keys <= set(template.stage_keys):
        return None
    for name in available_templates():
        if name == template.name:
            continue
        other = load_template(name)
        if keys <= set(other.stage_keys):
            return (
                f"hint: these records use the stage keys of the shipped template "
                f"{name!r} ({', '.join(sorted(keys))}), not those of "
                f"{template.name!r}: "
                f"check them with `--template {name}`, train them with "
                f"`mote: {{template: {name}}}`"
            )
    return None


def validate_jsonl(path: str | Path, template: PromptTemplate) -> dict[str, int]:
    """Check every record of a JSONL file; raise listing every bad one, else counts."""
    report = check_jsonl(path, template)
    if not report.ok:
        raise ChainRecordError(report.message())
    return report.counts()


def trained_stage_keys(template: PromptTemplate) -> list[str]:
    return [s.key for s in template.stages if s.mode is StageMode.TRAIN]
