"""The routing state: per-token step ids for one micro-batch, read by every MoTE layer.

One :class:`RoutingState` belongs to one model. The trainer sets it for a whole training
step (forward, loss *and* backward, so gradient-checkpoint recomputation routes the same)
with :func:`route`; generation installs a ``resolver`` that derives step ids from the input
ids. When a MoTE layer runs with neither, it raises :class:`RoutingError`: MoTE never
silently falls back to "no routing".

Coefficients per token, blocks ordered ``[step_0 .. step_{E-1}, shared]``:

* step ``s >= 0``: block s = alpha, shared = 1 - alpha (no shared expert: block s = 1);
* ``PROMPT_STEP``: per ``prompt_routing`` — a stage index (like that step), ``"shared"``
  (shared block only, 1 - alpha), or ``"random"`` (each maximal run of prompt tokens in a
  row draws one step expert, from a generator seeded by ``(seed, draw_key)``);
* ``PAD_STEP``: all zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP


class RoutingError(RuntimeError, ValueError):
    """Step ids are missing, malformed or do not fit the input of a MoTE forward."""


class RoutingState:
    """Holds the current step ids and caches the masks built from them."""

    def __init__(
        self,
        num_experts: int,
        alpha: float,
        shared_expert: bool,
        prompt_routing: int | str,
        seed: int = 42,
    ) -> None:
        self.num_experts = num_experts
        self.alpha = float(alpha)
        self.shared_expert = shared_expert
        self.prompt_routing = prompt_routing
        self.seed = int(seed)
        self.resolver: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor] | None = None
        self._step_ids: torch.Tensor | None = None
        self._draw_key = 0
        self._auto = False
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def n_blocks(self) -> int:
        return self.num_experts + int(self.shared_expert)

    @property
    def is_set(self) -> bool:
        return self._step_ids is not None

    @property
    def step_ids(self) -> torch.Tensor | None:
        return self._step_ids

    def set(self, step_ids: torch.Tensor, draw_key: int = 0, auto: bool = False) -> None:
        if step_ids.dim() != 2:
            raise RoutingError(
                f"step_ids must be [batch, seq], got shape {tuple(step_ids.shape)}"
            )
        bad = (step_ids < PROMPT_STEP) | (step_ids >= self.num_experts)
        if bool(bad.any()):
            value = int(step_ids[bad][0])
            raise RoutingError(
                f"step id {value} is out of range: valid are {PROMPT_STEP} (prompt), "
                f"{PAD_STEP} (padding) and 0..{self.num_experts - 1} (experts)"
            )
        self._step_ids = step_ids.long()
        self._draw_key = int(draw_key)
        self._auto = auto
        self._cache.clear()

    def clear(self) -> None:
        self._step_ids = None
        self._auto = False
        self._cache.clear()

    # --- coefficient construction ------------------------------------------------------
    def _prompt_experts(self, steps: torch.Tensor) -> torch.Tensor:
        """Expert id per token for prompt tokens under random routing."""
        is_prompt = steps == PROMPT_STEP  # [B, T]
        prev = torch.zeros_like(is_prompt)
        prev[:, 1:] = is_prompt[:, :-1]
        starts = is_prompt & ~prev  # first token of every prompt run
        run_id = torch.cumsum(starts.flatten(), 0).view_as(steps) - 1  # [B, T]
        n_runs = int(starts.sum())
        # keep 63 bits of the hash (``& 2**62`` kept one bit: two possible seeds)
        seed = hash((self.seed, self._draw_key)) & (2**63 - 1)
        gen = torch.Generator().manual_seed(seed)
        draws = torch.randint(self.num_experts, (max(n_runs, 1),), generator=gen)
        return draws.to(steps.device)[run_id.clamp(min=0)]

    def coefficients(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Per-token block weights ``[B, T, n_blocks]``."""
        key = ("coef", dtype, device)
        if key in self._cache:
            return self._cache[key]
        if self._step_ids is None:
            raise RoutingError(_NO_STATE)
        steps = self._step_ids.to(device)
        expert = steps.clone()
        is_prompt = steps == PROMPT_STEP
        routing = self.prompt_routing
        if routing == "random":
            expert = torch.where(is_prompt, self._prompt_experts(steps), expert)
        elif routing == "shared":
            expert = torch.where(is_prompt, torch.full_like(steps, -1), expert)
        else:
            expert = torch.where(is_prompt, torch.full_like(steps, int(routing)), expert)
        valid = steps != PAD_STEP  # [B, T]
        coef = torch.zeros(*steps.shape, self.n_blocks, dtype=dtype, device=device)
        step_weight = self.alpha if self.shared_expert else 1.0
        routed = (expert >= 0) & valid
        onehot = torch.nn.functional.one_hot(expert.clamp(min=0), self.num_experts)
        coef[..., : self.num_experts] = (onehot * routed[..., None]).to(dtype) * step_weight
        if self.shared_expert:
            coef[..., -1] = valid.to(dtype) * (1.0 - self.alpha)
        self._cache[key] = coef
        return coef

    def rank_mask(self, rank: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Per-token mask over the rank dimension ``[B, T, n_blocks * rank]``."""
        key = ("mask", rank, dtype, device)
        mask = self._cache.get(key)
        if mask is None:
            coef = self.coefficients(dtype, device)  # [B, T, n_blocks]
            mask = coef.repeat_interleave(rank, dim=-1)  # [B, T, n_blocks * rank]
            self._cache[key] = mask
        return mask


_NO_STATE = (
    "a MoTE layer ran without step ids. Inside training the trainer sets them; "
    "elsewhere wrap the forward in `axolotl_mote.routing.route(state, step_ids)` or "
    "generate with `axolotl_mote.generation` (which routes by the emitted markers)"
)


@contextlib.contextmanager
def route(state: RoutingState, step_ids: torch.Tensor, draw_key: int = 0) -> Iterator:
    """Route every MoTE layer of the model by ``step_ids`` inside the block."""
    state.set(step_ids, draw_key=draw_key)
    try:
        yield state
    finally:
        state.clear()
