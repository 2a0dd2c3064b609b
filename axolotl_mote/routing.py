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

When every token of a forward has the same coefficients (decoding one row, or rows in
the same stage), :meth:`RoutingState.uniform_row` returns them, so a layer can compute
the few non-zero blocks alone (``tuner/variant.py``) instead of all of them masked. The
packed copies of those blocks live in :attr:`RoutingState.packs` for one generated
sequence: forwards that continue a KV cache keep them, anything else drops them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP


class RoutingError(RuntimeError, ValueError):
    """Step ids are missing, malformed or do not fit the input of a MoTE forward."""


#: Up to this many tokens the uniform check reads the step ids in Python (decode steps);
#: larger forwards compare the coefficient tensor (one host sync).
_PY_TOKENS = 64
_MISSING = object()


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
        self.resolver: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor] | None = (
            None
        )
        self._step_ids: torch.Tensor | None = None
        self._draw_key = 0
        self._auto = False
        self._cache: dict[tuple, Any] = {}
        # fast-path blocks packed per layer and coefficient row (tuner/variant.py); kept
        # only while forwards continue one sequence, so weights cannot change under them
        self.packs: dict[tuple, Any] = {}
        #: False forces the masked path everywhere (A/B benchmarks, debugging).
        self.fast_path = True

    @property
    def n_blocks(self) -> int:
        return self.num_experts + int(self.shared_expert)

    @property
    def is_set(self) -> bool:
        return self._step_ids is not None

    @property
    def step_ids(self) -> torch.Tensor | None:
        return self._step_ids

    def set(
        self,
        step_ids: torch.Tensor,
        draw_key: int = 0,
        auto: bool = False,
        same_sequence: bool = False,
    ) -> None:
        """Route the next forward(s) by ``step_ids`` [B, T].

        ``same_sequence``: the forward continues the KV cache of the previous one (a
        resolver's decode step), so the packed fast-path blocks stay valid.
        """
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
        if not same_sequence:
            self.packs.clear()

    def clear(self, end_sequence: bool = True) -> None:
        """Forget the step ids (and, ending the sequence, the packed blocks)."""
        self._step_ids = None
        self._auto = False
        self._cache.clear()
        if end_sequence:
            self.packs.clear()

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
            expert = torch.where(
                is_prompt, torch.full_like(steps, int(routing)), expert
            )
        valid = steps != PAD_STEP  # [B, T]
        coef = torch.zeros(*steps.shape, self.n_blocks, dtype=dtype, device=device)
        step_weight = self.alpha if self.shared_expert else 1.0
        routed = (expert >= 0) & valid
        onehot = torch.nn.functional.one_hot(expert.clamp(min=0), self.num_experts)
        coef[..., : self.num_experts] = (onehot * routed[..., None]).to(
            dtype
        ) * step_weight
        if self.shared_expert:
            coef[..., -1] = valid.to(dtype) * (1.0 - self.alpha)
        self._cache[key] = coef
        return coef

    def rank_mask(
        self, rank: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Per-token mask over the rank dimension ``[B, T, n_blocks * rank]``."""
        key = ("mask", rank, dtype, device)
        mask = self._cache.get(key)
        if mask is None:
            coef = self.coefficients(dtype, device)  # [B, T, n_blocks]
            mask = coef.repeat_interleave(rank, dim=-1)  # [B, T, n_blocks * rank]
            self._cache[key] = mask
        return mask

    # --- uniform routing: the decode fast path -------------------------------------
    def uniform_row(
        self, dtype: torch.dtype, device: torch.device
    ) -> tuple[float, ...] | None:
        """The coefficients ``[n_blocks]`` every token shares, or None if they differ.

        All zeros means every token is padding. Values are rounded to ``dtype`` as in
        :meth:`coefficients`. Computed once per set of step ids and cached, like the
        masks.
        """
        key = ("row", dtype, device)
        row = self._cache.get(key, _MISSING)
        if row is _MISSING:
            row = self._uniform_row(dtype, device)
            self._cache[key] = row
        return row

    def _uniform_row(
        self, dtype: torch.dtype, device: torch.device
    ) -> tuple[float, ...] | None:
        steps = self._step_ids
        if steps is None:
            raise RoutingError(_NO_STATE)
        if steps.numel() <= _PY_TOKENS:  # decode: a few ids, cheapest in Python
            ids = set(steps.flatten().tolist())
            if len(ids) == 1:
                (step,) = ids
                if step != PROMPT_STEP or self.prompt_routing != "random":
                    return self._row_of(step, dtype)
        # mixed ids can still share coefficients (a prompt routed to the stage of the
        # other tokens), and random prompt draws live in the coefficient tensor
        coef = self.coefficients(dtype, device).reshape(-1, self.n_blocks)  # [N, n]
        if not bool((coef == coef[:1]).all()):
            return None
        return tuple(coef[0].tolist())

    def _row_of(self, step: int, dtype: torch.dtype) -> tuple[float, ...]:
        """The coefficients of one step id (not a random-routed prompt), in Python."""
        row = [0.0] * self.n_blocks
        if step == PAD_STEP:
            return tuple(row)
        expert = step
        if step == PROMPT_STEP:
            expert = -1 if self.prompt_routing == "shared" else int(self.prompt_routing)
        step_weight = self.alpha if self.shared_expert else 1.0
        # round as coefficients() does: a dtype tensor times a Python float
        step_weight, shared_weight = torch.tensor(
            [step_weight, 1.0 - self.alpha], dtype=dtype
        ).tolist()
        if expert >= 0:
            row[expert] = step_weight
        if self.shared_expert:
            row[-1] = shared_weight
        return tuple(row)


def start_position(kwargs: dict[str, Any]) -> int:
    """Position of a forward's first token: the KV cache length (0 without a cache).

    ``cache_position`` is used when a caller passes it (transformers < 5 did).
    """
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return 0


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
