"""Step ids during generation: follow the stage markers, one row at a time.

In training a stage's tokens, its start marker included, carry that stage's step id, and
the tokens after its end marker (the end of turn) keep it (``data/format.py``)::

    prompt ...  <|analysis|> text <|/analysis|> <|response|> text <|/response|> <|im_end|>
    P  ...  P    0           0 .. 0             2            2 .. 2             2

So the step id of a token is the step of the latest start marker at or before it, or the
prompt's routing before any marker. :class:`StageRouter` is the ``RoutingState.resolver``
that computes exactly that for the tokens of each forward. With the KV cache a forward
feeds one new token per row; the router keeps the "current stage" of every position it
has seen, so a chunk that starts at position ``p`` continues from the stage after
``p - 1``. A forward that starts at 0 (prefill, or generation without cache) begins a
new sequence. Padding (``attention_mask == 0``) gets ``PAD_STEP``.

Beam search reorders rows between steps, which this per-row history cannot follow:
generate with ``num_beams=1``.
"""

from __future__ import annotations

from typing import Any

import torch

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP
from axolotl_mote.routing import start_position
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
    """``RoutingState.resolver`` for generation: step ids from the emitted markers."""

    def __init__(
        self,
        marker_steps: dict[int, int],
        prompt_routing: int | str,
        num_experts: int,
        seed: int = 42,
    ) -> None:
        size = max(marker_steps) + 2
        self.table = torch.full((size,), _NOT_MARKER, dtype=torch.long)  # [V']
        for token, step in marker_steps.items():
            self.table[token] = step
        self.prompt_routing = prompt_routing
        self.num_experts = num_experts
        self.seed = int(seed)
        self.prompt_steps: torch.Tensor | None = None  # [B], set by begin()
        self._history: list[list[int]] | None = None  # [B][L] stage after each position
        self._markers: dict[int, int] | None = None  # token -> step, for decoding
        self._prompt_list: list[int] = []

    def default_prompt_steps(self, rows: list[int] | int) -> torch.Tensor:
        """Step id for each row's prompt tokens, as ``prompt_routing`` configures.

        ``shared`` / a stage index stay ``PROMPT_STEP`` (the routing state maps them);
        ``random`` draws one expert per row, seeded by ``(seed, row index)``, so a
        prompt is routed the same whatever batch it is in, cached or not.
        """
        rows = list(range(rows)) if isinstance(rows, int) else list(rows)
        if self.prompt_routing != "random":
            return torch.full((len(rows),), PROMPT_STEP, dtype=torch.long)
        draws = []
        for row in rows:
            gen = torch.Generator().manual_seed(hash((self.seed, int(row))) & (2**62))
            draws.append(int(torch.randint(self.num_experts, (1,), generator=gen)))
        return torch.tensor(draws, dtype=torch.long)

    def begin(self, prompt_steps: torch.Tensor | None) -> None:
        """Start a new batch; ``prompt_steps`` [B] (None: ``default_prompt_steps``)."""
        self.prompt_steps = prompt_steps
        self._history = None
        self._markers = None

    def step_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Step ids of whole sequences (no history): what a full re-forward routes by."""
        prompt = self._prompt_steps(input_ids.shape[0], input_ids.device)
        valid = None if attention_mask is None else attention_mask.bool()
        steps, _ = resolve_step_ids(
            input_ids, self.table.to(input_ids.device), prompt, prompt, valid
        )
        return steps

    def _prompt_steps(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.prompt_steps is None or self.prompt_steps.shape[0] != batch:
            self.prompt_steps = self.default_prompt_steps(batch)
            self._markers = None
        return self.prompt_steps.to(device)

    def __call__(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        b, t = input_ids.shape
        start = start_position(kwargs)
        device = input_ids.device
        prompt = self._prompt_steps(b, device)
        if start == 0:
            self._history = None
        elif (
            self._history is None
            or len(self._history) != b
            or any(len(h) < start for h in self._history)
        ):
            known = None if self._history is None else (len(self._history), start)
            raise RuntimeError(
                f"MoTE generation: a forward continues at position {start} with {b} "
                f"rows, which the router has not seen ({known}); beam search and cache "
                "reordering are not supported (num_beams=1)"
            )
        if start and t == 1:  # decoding: one token per row, in Python (cheapest)
            return self._decode_step(input_ids, start, device)
        mask = kwargs.get("attention_mask")
        valid = None
        if (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and mask.shape[1] >= start + t
        ):
            valid = mask[:, start : start + t].bool()  # [B, T]
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
        for i, (token, history) in enumerate(
            zip(input_ids[:, 0].tolist(), self._history)
        ):
            step = self._markers.get(token, history[start - 1])
            if step == PROMPT_STEP:  # a context stage's marker: routed like the prompt
                step = self._prompt_list[i]
            if len(history) > start:
                del history[start:]
            history.append(step)
            steps.append(step)
        return torch.tensor(steps, dtype=torch.long).view(-1, 1).to(device)
