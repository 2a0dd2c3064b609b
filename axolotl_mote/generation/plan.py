"""The per-row stage plan: which token may come next, as a logits processor.

Every row of a batch runs its own small state machine over the tokens it emits:

    between stages ──start marker of s──► inside s ──end marker of s──► between
         │                                   │
         └─ after the answer: stop           └─ content; at the limit: end marker

* **inside stage s**: any token except other markers and end of sequence; when s has
  used its ``max_stage_tokens`` (content tokens, markers not counted) its end marker is
  forced.
* **between stages**: only a start marker may follow. *Adaptive* rows choose among the
  later stages up to the first one that cannot be skipped (the answer); *forced* rows
  get the next stage of their plan. After the answer stage the row ends
  (``stop_after_answer``).
* **fallback** (``"answer"``): a row that would end, or run out of budget, before
  opening the answer stage has its current stage closed and the answer's start marker
  forced, keeping ``answer_reserve`` tokens for it. ``"none"`` lets such a row end
  without one.
* **forced plans keep a budget for every stage** (with ``fallback="answer"``): each
  stage of the plan still to come keeps its two markers and ``stage_reserve`` content
  tokens, the answer its start marker and ``answer_reserve`` (:func:`plan_cost`); the
  current stage is closed early to leave them. A plan that cannot fit in the budget
  drops its last stages before the answer (:func:`fit_plan`), and the row reports them
  in ``dropped`` (with ``fallback_used``): a forced plan is kept or reported, never
  shortened silently.

The processor only masks logits; routing follows the tokens (``router.py``), so a forced
marker is routed exactly like one the model chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

from axolotl_mote.templates import PromptTemplate

FALLBACKS = ("answer", "none")


def plan_cost(
    stages: list[int], answer: int, answer_reserve: int, stage_reserve: int
) -> int:
    """Tokens a forced plan's ``stages`` still need, counted from between stages: a
    stage before the answer its two markers and ``stage_reserve`` content tokens, the
    answer its start marker and ``answer_reserve``."""
    return sum(answer_reserve + 1 if s == answer else stage_reserve + 2 for s in stages)


def fit_plan(
    plan: list[int], budget: int, answer: int, answer_reserve: int, stage_reserve: int
) -> tuple[list[int], list[int]]:
    """(kept, dropped): the plan's last stages before the answer are dropped until the
    rest fits ``budget`` (the answer is never dropped)."""
    kept, dropped = list(plan), []
    while budget < plan_cost(kept, answer, answer_reserve, stage_reserve):
        others = [s for s in kept if s != answer]
        if not others:
            break
        kept.remove(others[-1])
        dropped.insert(0, others[-1])
    return kept, dropped


@dataclass(frozen=True)
class StageSpec:
    """Marker ids of the trained stages, in template (= step id) order."""

    names: list[str]
    start_ids: list[int]
    end_ids: list[int]
    skippable: list[bool]
    answer: int  # step id of the answer stage
    all_marker_ids: list[int]  # every marker of the template, omitted stages included

    @classmethod
    def from_template(
        cls, template: PromptTemplate, marker_ids: dict[str, int]
    ) -> StageSpec:
        trained = template.trained_stages
        return cls(
            names=[s.name for s in trained],
            start_ids=[marker_ids[s.start] for s in trained],
            end_ids=[marker_ids[s.end] for s in trained],
            skippable=[s.skippable for s in trained],
            answer=template.step_id(template.answer_stage),
            all_marker_ids=sorted(set(marker_ids.values())),
        )

    def index(self, name_or_key: str, template: PromptTemplate) -> int:
        """Step id of a trained stage by name or record key (the template decides)."""
        return template.trained_index(name_or_key)

    def reachable(self, after: int | None) -> list[int]:
        """Stages an adaptive row may open next: later ones, up to a non-skippable
        one."""
        out = []
        for step in range((after + 1) if after is not None else 0, len(self.names)):
            out.append(step)
            if not self.skippable[step]:
                break
        return out


@dataclass
class RowState:
    """One row's position in its chain, and what the rules did to it."""

    plan: list[int] | None  # forced stage ids, or None (adaptive)
    stage: int | None = None  # current (or last) stage
    open: bool = False
    count: int = 0  # content tokens of the current stage
    generated: int = 0  # tokens emitted so far (a prefilled marker included)
    answer_opened: bool = False
    answer_done: bool = False
    done: bool = False
    fallback_used: bool = False
    forced_ends: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # forced-plan stages not run


class StagePlanProcessor(LogitsProcessor):
    """Masks each row's next-token logits according to its :class:`RowState`."""

    def __init__(
        self,
        spec: StageSpec,
        rows: list[RowState],
        prompt_len: int,
        max_new_tokens: int,
        max_stage_tokens: dict[int, int],
        eos_ids: list[int],
        stop_after_answer: bool = True,
        fallback: str = "answer",
        answer_reserve: int = 16,
        keep_raw: bool = False,
        stage_reserve: int = 1,
    ) -> None:
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.spec, self.rows = spec, rows
        self.prompt_len, self.max_new_tokens = prompt_len, max_new_tokens
        self.max_stage_tokens = max_stage_tokens
        self.eos_ids = eos_ids
        self.stop_after_answer, self.fallback = stop_after_answer, fallback
        self.answer_reserve, self.stage_reserve = answer_reserve, stage_reserve
        self._start = {t: s for s, t in enumerate(spec.start_ids)}
        self._seen = prompt_len
        self._free_ban = torch.tensor(sorted(set(spec.all_marker_ids) | set(eos_ids)))
        self._bias: torch.Tensor | None = None
        self.keep_raw = keep_raw  # clone before masking (generate's output_logits)

    # --- consuming emitted tokens
    # ------------------------------------------------------
    def consume(self, row: RowState, token: int, prefilled: bool = False) -> None:
        """Advance ``row`` past ``token`` (``prefilled``: part of the prompt input)."""
        if row.done:
            return
        row.generated += 0 if prefilled else 1
        if token in self._start:
            row.stage, row.open, row.count = self._start[token], True, 0
            if row.stage == self.spec.answer:
                row.answer_opened = True
        elif row.open and token == self.spec.end_ids[row.stage]:
            row.open = False
            if row.stage == self.spec.answer:
                row.answer_done = True
        elif token in self.eos_ids:
            row.done = True
        elif row.open:
            row.count += 1

    # --- deciding the next token
    # -------------------------------------------------------
    def decide(self, row: RowState, preferred: int) -> tuple[str, list[int]]:
        """("free"|"force"|"allow"|"none", token ids) for the row's next token."""
        if row.done:
            return "none", []
        remaining = self.max_new_tokens - row.generated
        spec = self.spec
        if row.open:
            end = spec.end_ids[row.stage]
            limit = self.max_stage_tokens.get(row.stage)
            need = self.answer_reserve + 2  # this end marker, the answer's start, …
            if row.plan is not None:  # … and every later stage of a forced plan
                later = [
                    s
                    for s in row.plan
                    if s > row.stage and s != spec.answer and s not in row.dropped
                ]
                need += len(later) * (self.stage_reserve + 2)
            short = (
                self.fallback == "answer"
                and not row.answer_opened
                and remaining <= need
            )
            if (limit is not None and row.count >= limit) or short or remaining <= 1:
                row.forced_ends.append(row.stage)
                return "force", [end]
            return "free", []
        if row.answer_done:
            return (
                ("force", self.eos_ids[:1]) if self.stop_after_answer else ("none", [])
            )
        answer_start = spec.start_ids[spec.answer]
        if row.plan is not None:
            pending = [
                s
                for s in row.plan
                if (row.stage is None or s > row.stage) and s not in row.dropped
            ]
            if self.fallback == "answer" and not row.answer_opened:
                while len(pending) > 1 and remaining < plan_cost(
                    pending, spec.answer, self.answer_reserve, self.stage_reserve
                ):  # the budget cannot hold the next stage: drop and report it
                    row.dropped.append(pending.pop(0))
                    row.fallback_used = True
            choices = pending[:1]
        else:
            choices = spec.reachable(row.stage)
        if self.fallback == "answer" and not row.answer_opened:
            low_budget = remaining <= self.answer_reserve + 1
            wants_end = preferred in self.eos_ids or not choices
            if (low_budget or wants_end) and choices != [spec.answer]:
                if preferred != answer_start:
                    row.fallback_used = True
                return "force", [answer_start]
        allowed = [spec.start_ids[s] for s in choices]
        if self.fallback == "none" and not row.answer_opened:
            allowed += self.eos_ids
        if not allowed:
            return "force", self.eos_ids[:1]
        return ("force", allowed) if len(allowed) == 1 else ("allow", allowed)

    def _stage_bias(self, scores: torch.Tensor) -> torch.Tensor:
        """[E, V] additive mask of a row inside stage s: -inf on every marker and end of
        sequence except s's own end marker. Built once."""
        if self._bias is None or self._bias.shape[1] != scores.shape[1]:
            bias = scores.new_zeros(len(self.spec.names), scores.shape[1])  # [E, V]
            bias[:, self._free_ban.to(scores.device)] = float("-inf")
            for stage, end in enumerate(self.spec.end_ids):
                bias[stage, end] = 0.0
            self._bias = bias
        return self._bias

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor
    ) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if length > self._seen:  # one new token per row since the last call
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                self.consume(row, token)
            self._seen = length
        if self.keep_raw:
            scores = scores.clone()  # generate keeps the raw logits it passed in
        preferred: list[int] = []
        free_rows, free_stages = [], []
        for i, row in enumerate(self.rows):
            if not preferred and not row.open and not row.done:
                preferred = scores.argmax(dim=-1).tolist()  # [B], only between stages
            kind, tokens = self.decide(row, preferred[i] if preferred else -1)
            if kind == "free":
                free_rows.append(i)
                free_stages.append(row.stage)
            elif kind in ("force", "allow"):
                keep = scores[i, tokens].clone()
                scores[i] = float("-inf")
                scores[i, tokens] = 0.0 if kind == "force" else keep
        if free_rows:
            bias = self._stage_bias(scores)
            stages = torch.tensor(free_stages, device=scores.device)  # [F]
            if len(free_rows) == scores.shape[0]:
                scores += bias[stages]  # [B, V]
            else:
                rows = torch.tensor(free_rows, device=scores.device)  # [F]
                scores[rows] += bias[stages]
        return scores
