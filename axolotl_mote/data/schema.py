"""The chain record: one JSON object per line, validated against a template.

A record is ``{"id": ..., "messages": [...] | "prompt": "...", <stage keys>..., "meta": {...}}``.
The stage keys come from the template (aligncot: ``analysis``, ``guidance``, ``answer``,
``check``). An absent (or null) stage key means the chain skips that stage.

Shared by the dataset strategy, the pre-flight file check and the data generator, so
every entry point rejects the same records with the same message. Pure Python: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axolotl_mote.templates import PromptTemplate, StageMode

_RESERVED_KEYS = ("id", "messages", "prompt", "meta")
_ROLES = ("system", "user", "assistant")


class ChainRecordError(ValueError):
    """A record that cannot be turned into a chain; the message says where and why."""


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

    ``location`` (e.g. ``"data/chains.jsonl:17"`` or ``"row 16"``) is put in every error.
    Raises :class:`ChainRecordError` naming the record, the field and the fix.
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
    markers = template.markers
    for i, msg in enumerate(messages):
        _reject_markers(msg["content"], f"messages[{i}].content", markers, fail)

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
        _reject_markers(value, stage.key, markers, fail)
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


def _reject_markers(text: str, field_name: str, markers: list[str], fail) -> None:
    """Marker strings in text would be tokenized as markers and change routing.

    MoTE rejects them rather than escaping: a silent rewrite would change the user's
    text, and a marker inside data is almost always a formatting bug upstream.
    """
    for marker in markers:
        if marker in text:
            raise fail(
                f"field {field_name!r} contains the stage marker {marker!r}; markers are "
                "reserved for stage boundaries. Remove it from the text, or rename the "
                "markers in your template"
            )


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)``; a broken line raises with file, line and fix."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ChainRecordError(
                    f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                    "each line must be one JSON object"
                ) from err


def validate_jsonl(path: str | Path, template: PromptTemplate) -> dict[str, int]:
    """Check every record of a JSONL file; returns counts (records, per-stage)."""
    counts: dict[str, int] = {"records": 0}
    seen_ids: dict[str, int] = {}
    for lineno, record in iter_jsonl(path):
        chain = parse_chain(record, template, location=f"{path}:{lineno}")
        if chain.id is not None:
            if chain.id in seen_ids:
                raise ChainRecordError(
                    f"{path}:{lineno}: duplicate id {chain.id!r} (first on line "
                    f"{seen_ids[chain.id]}); ids must be unique"
                )
            seen_ids[chain.id] = lineno
        counts["records"] += 1
        for key in chain.stages:
            counts[key] = counts.get(key, 0) + 1
    return counts


def trained_stage_keys(template: PromptTemplate) -> list[str]:
    return [s.key for s in template.stages if s.mode is StageMode.TRAIN]
