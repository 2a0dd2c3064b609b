"""Step ids during generation: follow the stage markers, one row at a time.

In training a stage's tokens, its start marker included, carry that stage's step id, and
the tokens after its end marker (the end of turn) keep it (``data/format.py``)::

    prompt … <|analysis|> text <|/analysis|> <|response|> text <|/response|> <|im_end|>
    P  ...  P    0           0 .. 0             2            2 .. 2             2

So the step id of a token is the step of the latest start marker at or before it, or
the prompt's routing before any marker. :class:`StageRouter` computes exactly that for
the tokens of each forward (``generation/auto.py`` calls it before each forward).

**Prompt tokens** get one concrete routing per row, never ``PROMPT_STEP``: an expert
index (``random``, or a stage), ``SHARED_ONLY_STEP`` (``shared``) or ``EXPECTED_STEP``
(``expected``). Under ``random`` the expert is drawn from a seed made of the run seed
and the prompt's own token ids (the tokens before the row's first marker, padding
excluded): the same prompt draws the same expert in any batch, at any row, cached or
not, and different prompts draw independently.

With the KV cache a forward feeds one new token per row; the router keeps the "current
stage" of every position it has seen, so a chunk that starts at position ``p``
continues from the stage after ``p - 1``. A forward that starts at 0 (prefill, or
generation without cache) begins a new sequence. Padding (``attention_mask == 0``)
gets ``PAD_STEP``.

Beam search reorders rows between steps, which this per-row history cannot follow:
generate with ``num_beams=1``.
"""

from __future__ import annotations

from typing import Any

import torch

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP
from axolotl_mote.routing import PromptRouting, draw_seed, start_position
from axolotl_mote.templates import PromptTemplate, StageMode

_NOT_MARKER = -99


def start_marker_steps(
    template: PromptTemplate, marker_ids: dict[str, int]
) -> dict[int, int]:
    """Token id of each stage start marker -> the step id its stage trains with.

    Trained stages map to their expert index, ``mode: context`` stages to
    ``PROMPT_STEP`` (routed like the prompt); ``mode: omit`` stages have no step.
    """
    out: dict[int, int] = {}
    for stage in template.stages:
        if stage.mode is StageMode.OMIT:
            continue
        out[marker_ids[stage.start]] = template.step_id(stage.name)
    return out


def resolve_step_ids(
    input_ids: torch.Tensor,
    table: torch.Tensor,
    carry_in: torch.Tensor,
    prompt_steps: torch.Tensor,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ids of a chunk of tokens, and the current stage after each of them.

    input_ids: [B, T]; table: [V'] step of each start marker id, ``_NOT_MARKER`` else
    (ids beyond V' are not markers); carry_in: [B] stage before the chunk;
    prompt_steps: [B] what ``PROMPT_STEP`` markers resolve to; valid: [B, T] or None.
    """
    b, t = input_ids.shape
    marker = table[input_ids.clamp(max=table.numel() - 1)]  # [B, T]
    marker = torch.where(marker == PROMPT_STEP, prompt_steps[:, None], marker)
    is_marker = marker != _NOT_MARKER  # [B, T]
    pos = torch.arange(t, device=input_ids.device).expand(b, t)  # [B, T]
    last = torch.where(is_marker, pos, -1).cummax(dim=1).values  # [B, T] latest marker
    carry = torch.where(
        last >= 0, marker.gather(1, last.clamp(min=0)), carry_in[:, None].expand(b, t)
    )  # [B, T] current stage after each token
    steps = carry if valid is None else torch.where(valid, carry, PAD_STEP)
    return steps, carry


class StageRouter:
    """Step ids for generation, from the emitted markers; see the module docstring."""

    def __init__(
        self,
        marker_steps: dict[int, int],
        prompt_routing: int | str | PromptRouting,
        num_experts: int,
        seed: int = 42,
        shared_expert: bool = True,
    ) -> None:
        self.prompt = PromptRouting.parse(prompt_routing, num_experts, shared_expert)
        size = max(marker_steps) + 2
        self.table = torch.full((size,), _NOT_MARKER, dtype=torch.long)  # [V']
        for token, step in marker_steps.items():
            self.table[token] = step
        self.prompt_routing = self.prompt.value
        self.num_experts = num_experts
        self.seed = int(seed)
        self.prompt_steps: torch.Tensor | None = None  # [B], set at each prefill
        self._history: list[list[int]] | None = None  # [B][L] stage after each position
        self._markers: dict[int, int] | None = None  # token -> step, for decoding
        self._prompt_list: list[int] = []

    # --- the prompt's routing -------------------------------------------------------
    def prompt_step(self, prompt_ids: list[int]) -> int:
        """The step value all tokens of a prompt (its token ids) are routed by."""
        if not self.prompt.is_random:
            return self.prompt.step
        data = torch.tensor(prompt_ids, dtype=torch.int64).numpy().tobytes()
        gen = torch.Generator().manual_seed(draw_seed(self.seed, "prompt", data))
        return int(torch.randint(self.num_experts, (1,), generator=gen))

    def prompt_steps_of(
        self, input_ids: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """[B] prompt routing of each row: its valid tokens before the first marker."""
        is_marker = self.table[input_ids.clamp(max=self.table.numel() - 1)] != (
            _NOT_MARKER
        )  # [B, T]
        rows = []
        for i, (ids, marks) in enumerate(zip(input_ids.tolist(), is_marker.tolist())):
            keep = valid[i].tolist() if valid is not None else [True] * len(ids)
            first = marks.index(True) if True in marks else len(ids)
            rows.append(self.prompt_step([t for t, k in zip(ids[:first], keep) if k]))
        return torch.tensor(rows, dtype=torch.long, device=input_ids.device)

    # --- routing forwards -----------------------------------------------------------
    def begin(self) -> None:
        """Start a new batch: forget every row's history."""
        self.prompt_steps = None
        self._history = None
        self._markers = None

    def step_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Step ids of whole sequences (no history): what a full re-forward routes
        by."""
        valid = None if attention_mask is None else attention_mask.bool()
        prompt = self.prompt_steps_of(input_ids, valid)
        steps, _ = resolve_step_ids(
            input_ids, self.table.to(input_ids.device), prompt, prompt, valid
        )
        return steps

    def __call__(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        b, t = input_ids.shape
        start = start_position(kwargs)
        device = input_ids.device
        mask = kwargs.get("attention_mask")
        valid = None
        if (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and mask.shape[1] >= start + t
        ):
            valid = mask[:, start : start + t].bool()  # [B, T]
        if start == 0:
            self._history = None
            self._markers = None
            self.prompt_steps = self.prompt_steps_of(input_ids, valid)
        elif (
            self._history is None
            or len(self._history) != b
            or any(len(h) < start for h in self._history)
        ):
            known = None if self._history is None else (len(self._history), start)
            raise RuntimeError(
                f"MoTE generation: a forward continues at position {start} with {b} "
                f"rows, which the router has not seen ({known}); beam search and "
                "cache reordering are not supported (num_beams=1)"
            )
        prompt = self.prompt_steps.to(device)
        if start and t == 1:  # decoding: one token per row, in Python (cheapest)
            return self._decode_step(input_ids, start, device)
        carry_in = (
            prompt
            if start == 0
            else torch.tensor([h[start - 1] for h in self._history], device=device)
        )
        steps, carry = resolve_step_ids(
            input_ids, self.table.to(device), carry_in, prompt, valid
        )
        carry_rows = carry.tolist()
        if start == 0:
            self._history = carry_rows
        else:
            self._history = [h[:start] + c for h, c in zip(self._history, carry_rows)]
        return steps

    def _decode_step(self, input_ids: torch.Tensor, start: int, device) -> torch.Tensor:
        """Step ids [B, 1] of one new token per row (new tokens are never padding)."""
        if self._markers is None:
            self._markers = {
                i: s for i, s in enumerate(self.table.tolist()) if s != _NOT_MARKER
            }
            self._prompt_list = self.prompt_steps.tolist()
        steps = []
        rows = zip(input_ids[:, 0].tolist(), self._history)
        for i, (token, history) in enumerate(rows):
            step = self._markers.get(token, history[start - 1])
            if step == PROMPT_STEP:  # a context stage's marker: routed like the prompt
                step = self._prompt_list[i]
            if len(history) > start:
                del history[start:]
            history.append(step)
            steps.append(step)
        return torch.tensor(steps, dtype=torch.long).view(-1, 1).to(device)
