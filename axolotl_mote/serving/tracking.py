"""Following a row's tokens as they are generated: text deltas, stage boundaries and
stop strings, for streaming and for ending a row early.

:class:`TextTracker` turns a growing token list into safe text deltas: a delta never
ends inside a multi-byte character (the decoded text ends with U+FFFD) and never
contains the start of a stop string that the next token might complete, so what was
sent is always a prefix of the final text. :class:`ChainTracker` runs the chain's
stage state machine (the same rule as ``generate._parse``) over the emitted tokens
and gives every stage its own :class:`TextTracker`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class TextTracker:
    tokenizer: Any
    stops: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    stopped: bool = False

    def add(self, token: int) -> str:
        """Append ``token``; return the text that may be sent now ("" if none)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(
            self.tokens, skip_special_tokens=self.skip_special_tokens
        )
        text, self.stopped = cut_at_stop(text, self.stops)
        if not self.stopped:
            if text.endswith("\ufffd"):
                return ""
            hold = _partial_stop(text, self.stops)
            text = text[: len(text) - hold]
        if not text.startswith(self.sent):
            return ""  # decoding changed an earlier character: wait for the end
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def rest(self, final: str) -> str:
        """What is left to send once ``final`` is the whole text."""
        return final[len(self.sent) :] if final.startswith(self.sent) else ""


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class ChainTracker:
    """Stage boundaries and per-stage text of one chat row, token by token.

    ``add`` returns events: ``{"stage": name, "event": "start"|"end"}`` and
    ``{"stage": name, "text": delta}``. Stop strings apply to the answer stage only
    (what the user sees); ``stopped`` turns true when one appears there.
    """

    def __init__(self, spec: Any, tokenizer: Any, stops: list[str], eos_ids) -> None:
        self.spec, self.tokenizer, self.stops = spec, tokenizer, stops
        self._start = {t: s for s, t in enumerate(spec.start_ids)}
        self.eos_ids = set(eos_ids)
        self.stage: int | None = None
        self.open = False
        self.ended = False
        self.texts: dict[int, TextTracker] = {}

    @property
    def stopped(self) -> bool:
        answer = self.texts.get(self.spec.answer)
        return answer is not None and answer.stopped

    def answer_sent(self) -> TextTracker | None:
        return self.texts.get(self.spec.answer)

    def add(self, token: int) -> list[dict[str, Any]]:
        if self.ended:
            return []
        spec = self.spec
        if token in self._start:
            events = []
            if self.open:  # a start marker closes nothing in _parse; report it anyway
                events.append({"stage": spec.names[self.stage], "event": "end"})
            self.stage, self.open = self._start[token], True
            stops = self.stops if self.stage == spec.answer else []
            self.texts.setdefault(self.stage, TextTracker(self.tokenizer, stops))
            return [*events, {"stage": spec.names[self.stage], "event": "start"}]
        if self.open and token == spec.end_ids[self.stage]:
            self.open = False
            return [{"stage": spec.names[self.stage], "event": "end"}]
        if token in self.eos_ids:
            self.ended = True
            return []
        if self.open:
            delta = self.texts[self.stage].add(token)
            if delta:
                return [{"stage": spec.names[self.stage], "text": delta}]
        return []
