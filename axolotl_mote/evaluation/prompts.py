"""Prompt sets for ``axolotl-mote evaluate``: files the user points to.

``[kind=]path`` where kind is one of

* ``harmful`` — every prompt should be declined or redirected (harmless rate);
* ``jailbreak`` — harmful prompts in jailbreak framings (robustness = harmless rate);
* ``benign`` — benign prompts that sound risky, XSTest style (compliance rate);
* ``mixed`` — a per-prompt ``label`` decides (``harmful``/``unsafe`` or
  ``benign``/``safe``).

Without ``kind=`` it is read from the file name (``*jailbreak*``,
``*benign*``/``*scary*``, ``*harm*``, else ``mixed``). JSONL rows need ``prompt`` or
``messages`` (multi-turn ends with the user turn); CSV files (XSTest's
``id,prompt,type,label,focus,note``) need a ``prompt`` column. Other columns are kept as
``meta``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("harmful", "jailbreak", "benign", "mixed")
_LABELS = {
    "harmful": "harmful",
    "unsafe": "harmful",
    "benign": "benign",
    "safe": "benign",
}


@dataclass
class PromptItem:
    id: str
    messages: list[dict[str, str]]
    label: str  # harmful | benign: what a good response does (decline / help)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class PromptSet:
    name: str
    kind: str
    path: str
    items: list[PromptItem]


def infer_kind(path: str | Path) -> str:
    stem = Path(path).stem.lower()
    for needle, kind in (
        ("jailbreak", "jailbreak"),
        ("benign", "benign"),
        ("scary", "benign"),
        ("harm", "harmful"),
    ):
        if needle in stem:
            return kind
    return "mixed"


def load_prompt_set(
    spec: str, *, name: str | None = None, limit: int | None = None
) -> PromptSet:
    """Read ``[kind=]path``; every problem names the file, the row and the fix."""
    head, sep, tail = spec.partition("=")
    if sep and not Path(spec).exists():
        if head not in KINDS:
            raise ValueError(
                f"prompt set {spec!r}: unknown kind {head!r}; use one of {list(KINDS)}"
            )
        kind, path = head, tail
    else:
        kind, path = infer_kind(spec), spec
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt set {spec!r}: no file {path}")
    rows = _read_csv(path) if path.endswith(".csv") else _read_jsonl(path)
    items = []
    for where, row in rows:
        if limit is not None and len(items) >= limit:
            break
        items.append(_item(row, where, kind, len(items)))
    if not items:
        raise ValueError(f"prompt set {path} is empty")
    return PromptSet(name or Path(path).stem, kind, str(path), items)


def _read_jsonl(path: str):
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}:{number}: not valid JSON ({err.msg})"
                    ) from err


def _read_csv(path: str):
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), 2):
            yield f"{path}:{number}", row


def _item(row: Any, where: str, kind: str, index: int) -> PromptItem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with `prompt` or `messages`")
    if row.get("messages"):
        messages = [
            {"role": m["role"], "content": m["content"]} for m in row["messages"]
        ]
    elif row.get("prompt"):
        messages = [{"role": "user", "content": str(row["prompt"])}]
    else:
        raise ValueError(f"{where}: no `prompt` or `messages`")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the conversation must end with a user turn")
    raw = str(row.get("label") or "").strip().lower()
    if kind == "mixed":
        if raw not in _LABELS:
            raise ValueError(
                f"{where}: a mixed set needs `label` harmful/unsafe or benign/safe per "
                f"row (got {row.get('label')!r}); or name the set's kind, e.g. "
                f"harmful={where.rsplit(':', 1)[0]}"
            )
        label = _LABELS[raw]
    else:
        label = "benign" if kind == "benign" else "harmful"
    meta = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages")}
    return PromptItem(str(row.get("id") or f"{index}"), messages, label, meta)
