"""Seed questions from HH-RLHF-style transcripts (``axolotl-mote convert-hh``).

The paper self-aligns on 6,000 questions from Anthropic's HH-RLHF. Its records are
``{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": "…"}``: one dialogue with
``Human:`` / ``Assistant:`` turns, the two fields differing only in the last reply. A
seed question is the dialogue **up to and including the last user turn** (multi-turn
kept), the form ``generate-data`` answers. Both fields are read by default and
de-duplicated, so a pair gives one seed; ``sample`` then draws a seeded subset.

Lines that are not JSON, lack the field, or hold no ``Human:`` turn are skipped and
reported by file and line (the first ``max_errors`` in full, all counted); nothing is
dropped silently. ``.jsonl.gz`` is read directly.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class TranscriptError(ValueError):
    """A transcript that cannot become a seed question (the message says why)."""


def parse_transcript(text: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{user: a}, {assistant: b}]``.

    Consecutive turns of one speaker are merged (HH has a few); text before the first
    ``Human:``/``Assistant:`` is an error, since it belongs to no speaker.
    """
    if not isinstance(text, str) or not text.strip():
        raise TranscriptError("empty transcript")
    parts = _TURN.split(text)
    if parts[0].strip():
        raise TranscriptError(
            f"text before the first 'Human:' turn: {parts[0].strip()[:40]!r}"
        )
    turns: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _ROLES[speaker], content.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{content}".strip()
        else:
            turns.append({"role": role, "content": content})
    if not turns:
        raise TranscriptError("no 'Human:' or 'Assistant:' turn")
    return turns


def seed_messages(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """The dialogue up to its last non-empty user turn (what the model answers)."""
    last = max(
        (i for i, t in enumerate(turns) if t["role"] == "user" and t["content"]),
        default=None,
    )
    if last is None:
        raise TranscriptError("no non-empty 'Human:' turn")
    messages = turns[: last + 1]
    if messages[0]["role"] != "user":
        messages = messages[1:]  # an opening assistant line has no question before it
    return messages


@dataclass
class ConvertReport:
    """What the conversion read, kept, merged and skipped."""

    files: list[str]
    lines: int = 0
    transcripts: int = 0  # fields read (two per line with chosen + rejected)
    unique: int = 0
    duplicates: int = 0
    written: int = 0
    multi_turn: int = 0  # written seeds with an earlier exchange before the question
    malformed: int = 0
    errors: list[str] = field(default_factory=list)  # the first max_errors, by line

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, decode error) per non-empty line, plain or gzip."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, None, f"byte {raw[err.start]:#04x} is not UTF-8"
                continue
            if line.strip():
                yield lineno, line, None


def convert_hh(
    paths: Sequence[str | Path],
    *,
    fields: Sequence[str] = ("chosen", "rejected"),
    sample: int | None = None,
    seed: int = 0,
    max_errors: int = 20,
) -> tuple[list[dict[str, Any]], ConvertReport]:
    """Seed records ``{id, messages, meta}`` from HH-style JSONL(.gz) files.

    ``id`` is ``hh-`` + a hash of the seed dialogue (stable across runs and files, so
    ``generate-data`` can resume); ``meta.source`` is ``file:line`` of its first
    occurrence. With ``sample``, a seeded random subset of that size in file order.
    """
    report = ConvertReport([str(p) for p in paths])
    seen: dict[str, dict[str, Any]] = {}

    def bad(where: str, why: str) -> None:
        report.malformed += 1
        if len(report.errors) < max_errors:
            report.errors.append(f"{where}: {why}")

    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        for lineno, line, decode_error in _lines(path):
            report.lines += 1
            where = f"{path}:{lineno}"
            if decode_error:
                bad(where, f"{decode_error}; save the file as UTF-8")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                bad(where, f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(row, dict):
                bad(where, "not a JSON object")
                continue
            present = [f for f in fields if isinstance(row.get(f), str)]
            if not present:
                bad(where, f"no text field {' or '.join(map(repr, fields))}")
                continue
            for name in present:
                report.transcripts += 1
                try:
                    messages = seed_messages(parse_transcript(row[name]))
                except TranscriptError as err:
                    bad(f"{where} ({name})", str(err))
                    continue
                key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
                if key in seen:
                    report.duplicates += 1
                    continue
                digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
                seen[key] = {
                    "id": f"hh-{digest}",
                    "messages": messages,
                    "meta": {"source": f"{path.name}:{lineno}", "field": name},
                }
    records = list(seen.values())
    report.unique = len(records)
    if sample is not None and sample < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), sample))
        records = [records[i] for i in keep]
    report.written = len(records)
    report.multi_turn = sum(len(r["messages"]) > 1 for r in records)
    return records, report


def write_seeds(records: Sequence[dict[str, Any]], output: str | Path) -> Path:
    """Write seed records as JSONL (UTF-8), replacing ``output``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return output
