"""What a scorer reads and returns (``scorers`` and ``learned`` share them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScoreInput:
    question: str  # the last user turn
    response: str  # the answer shown to the user ("" when the model gave none)
    label: str  # harmful | benign


@dataclass
class Score:
    refused: bool | None  # None: not scored
    harmful: bool | None  # only judged on harmful prompts; None elsewhere / unscored
    verdict: str | None = None  # the label found (judge) or the matched phrase (string)
    raw: str | None = None  # the judge's reply
