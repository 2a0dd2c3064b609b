"""The routing state: per-token step ids for one micro-batch, read by every MoTE layer.

One :class:`RoutingState` belongs to one model (``tuner.model.attach_mote`` creates it).
The trainer sets it for a whole training step (forward, loss *and* backward, so
gradient-checkpoint recomputation routes the same) with :func:`route`; generation sets
it per forward from the emitted markers (``generation/auto.py``, through
:meth:`RoutingState.set` with ``auto=True``). When a MoTE layer runs with neither, it
raises :class:`RoutingError`: MoTE never silently falls back to "no routing".

It has three parts: the frozen :class:`RoutingSpec` (the experts: their number,
alpha, the shared expert, the prompt's :class:`PromptRouting`, the seed), fixed when
MoTE is attached; the per-forward state (step ids, the masks and coefficients built from
them, the decode packs of one generated sequence), changed only through
:meth:`RoutingState.set` / :meth:`RoutingState.clear`; and the model's
:class:`Attachments` (every variant and hook, removed together). The state is closed
(``__slots__``), and the spec's fields read through without a setter.

Coefficients per token, blocks ordered ``[step_0 .. step_{E-1}, shared]``
(``w = alpha`` with a shared expert, else 1):

* step ``s >= 0``: block s = w, shared = 1 - alpha;
* ``PROMPT_STEP``: per ``prompt_routing`` — a stage index (like that step),
  ``"shared"`` (like ``SHARED_ONLY_STEP``), ``"expected"`` (like ``EXPECTED_STEP``) or
  ``"random"`` (each maximal run of prompt tokens in a row draws one step expert, from a
  generator seeded by ``(seed, draw_key)``);
* ``SHARED_ONLY_STEP``: shared = 1 - alpha, no step expert;
* ``EXPECTED_STEP``: every step block w / E, shared = 1 - alpha (the expected value of
  a uniformly random step expert);
* ``PAD_STEP``: all zeros.

When every token of a forward has the same coefficients (decoding one row, or rows in
the same stage), :meth:`RoutingState.uniform_row` returns them, so a layer can compute
the few non-zero blocks alone (``tuner/layer.py``) instead of all of them masked. The
packed copies of those blocks live in :attr:`RoutingState.packs` for one generated
sequence: forwards that continue a KV cache keep them, anything else drops them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from axolotl_mote.constants import (
    EXPECTED_STEP,
    PAD_STEP,
    PROMPT_STEP,
    SHARED_ONLY_STEP,
)


class RoutingError(RuntimeError, ValueError):
    """Step ids are missing, malformed or do not fit the input of a MoTE forward."""


@dataclass(frozen=True)
class PromptRouting:
    """How question (``PROMPT_STEP``) tokens are routed, parsed once.

    ``value`` is what was asked for: ``'random'``, ``'shared'``, ``'expected'`` or an
    expert index (a stage name is turned into its index by
    :meth:`~axolotl_mote.tuner.config.MoteConfig.resolve_prompt_routing`). ``step`` is
    the step value every prompt token takes, or None for random routing (one step
    expert drawn per prompt). The routing state, the generation router and the export
    read ``step``; nobody else switches on the name.
    """

    value: int | str
    step: int | None

    @classmethod
    def parse(
        cls, value: int | str | PromptRouting, num_experts: int, shared_expert: bool
    ) -> PromptRouting:
        """Check ``value`` against the experts; the error names the valid choices."""
        if isinstance(value, PromptRouting):
            value = value.value
        if value == "random":
            return cls("random", None)
        if value == "expected":
            return cls("expected", EXPECTED_STEP)
        if value == "shared":
            if not shared_expert:
                raise RoutingError(
                    "prompt routing 'shared' needs a shared expert, and this adapter "
                    "has none; use 'random', 'expected' or a stage"
                )
            return cls("shared", SHARED_ONLY_STEP)
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < num_experts:
                return cls(value, value)
        raise RoutingError(
            f"prompt routing {value!r} is not 'random', 'shared', 'expected' or an "
            f"expert index 0..{num_experts - 1}"
        )

    @property
    def is_random(self) -> bool:
        return self.step is None


#: Up to this many tokens the uniform check reads the step ids in Python (decode steps);
#: larger forwards compare the coefficient tensor (one host sync).
_PY_TOKENS = 64
_MISSING = object()
_LOWEST = EXPECTED_STEP  # the smallest valid step id


def draw_seed(*parts: int | str | bytes) -> int:
    """A 63-bit seed from ``parts`` (stable across processes and Python versions).

    ``hash(...) & (2**62)`` once kept a single bit, so every draw used one of two
    seeds; a cryptographic digest cannot collapse like that.
    """
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        digest.update(len(data).to_bytes(4, "little") + data)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


@dataclass(frozen=True)
class RoutingSpec:
    """What the experts are, fixed when MoTE is attached to a model."""

    num_experts: int
    alpha: float
    shared_expert: bool
    prompt: PromptRouting
    seed: int = 42
    #: no routing: every token through every block at weight 1 (one plain LoRA of
    #: rank n_blocks * r, ``mote.experts: single``, the single-LoRA baseline)
    single: bool = False
    #: the MoteConfig the layers were attached with (template, stage names)
    config: Any = field(default=None, compare=False)

    @property
    def n_blocks(self) -> int:
        return self.num_experts + int(self.shared_expert)


class Attachments:
    """What is attached to a model for one routing state: every variant and hook, as
    removable handles (``.remove()``); ``tuner.model.detach_mote`` removes them all."""

    __slots__ = ("handles",)

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def add(self, handle: Any) -> Any:
        self.handles.append(handle)
        return handle

    def discard(self, handle: Any) -> None:
        if handle in self.handles:
            self.handles.remove(handle)

    def remove_all(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles.clear()

    def find(self, kind: type) -> Any:
        """The first attached handle of ``kind``, or None."""
        return next((h for h in self.handles if isinstance(h, kind)), None)


class RoutingState:
    """The routing of the current forward(s) of one model: its step ids and what is
    built from them, beside the frozen :class:`RoutingSpec` and the model's
    :class:`Attachments`.

    The spec's fields read through (``state.alpha`` is ``state.spec.alpha``) and cannot
    be assigned: a model's experts do not change while it is attached.
    """

    __slots__ = (
        "spec",
        "attachments",
        "fast_path",
        "packs",
        "_step_ids",
        "_draw_key",
        "_auto",
        "_cache",
    )

    def __init__(
        self,
        num_experts: int,
        alpha: float,
        shared_expert: bool,
        prompt_routing: int | str | PromptRouting,
        seed: int = 42,
        config: Any = None,
        single: bool = False,
    ) -> None:
        self.spec = RoutingSpec(
            num_experts=int(num_experts),
            alpha=float(alpha),
            shared_expert=bool(shared_expert),
            # the prompt's routing, parsed and checked against the experts once
            prompt=PromptRouting.parse(prompt_routing, num_experts, shared_expert),
            seed=int(seed),
            single=bool(single),
            config=config,
        )
        self.attachments = Attachments()
        #: False forces the reference form everywhere: the masked path as PEFT writes
        #: it, ``result + lora_B(h * mask) * scaling`` (no decode packs, no fused
        #: addmm; A/B benchmarks, debugging).
        self.fast_path = True
        #: fast-path blocks packed per layer and coefficient row (tuner/layer.py);
        #: kept only while forwards continue one sequence.
        self.packs: dict[tuple, Any] = {}
        self._step_ids: torch.Tensor | None = None
        self._draw_key = 0
        self._auto = False
        self._cache: dict[tuple, Any] = {}

    # --- the spec, read through (read-only) ---------------------------------------
    num_experts = property(lambda self: self.spec.num_experts)
    alpha = property(lambda self: self.spec.alpha)
    shared_expert = property(lambda self: self.spec.shared_expert)
    prompt = property(lambda self: self.spec.prompt)
    seed = property(lambda self: self.spec.seed)
    single = property(lambda self: self.spec.single)
    config = property(lambda self: self.spec.config)
    n_blocks = property(lambda self: self.spec.n_blocks)

    @property
    def prompt_routing(self) -> int | str:
        """The prompt routing asked for: 'random', 'shared', 'expected' or an index."""
        return self.spec.prompt.value

    @property
    def handles(self) -> list[Any]:
        """The attachments' handles (``self.attachments``)."""
        return self.attachments.handles

    @property
    def is_set(self) -> bool:
        return self._step_ids is not None

    @property
    def is_auto(self) -> bool:
        """The step ids were set by automatic (marker) routing for one forward."""
        return self._auto

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

        ``auto``: set by automatic routing for a single forward (cleared after it).
        ``same_sequence``: the forward continues the KV cache of the previous one (a
        decode step), so the packed fast-path blocks stay valid.
        """
        if step_ids.dim() != 2:
            raise RoutingError(
                f"step_ids must be [batch, seq], got shape {tuple(step_ids.shape)}"
            )
        bad = (step_ids < _LOWEST) | (step_ids >= self.num_experts)
        if not self.shared_expert:
            bad |= step_ids == SHARED_ONLY_STEP
        if bool(bad.any()):
            value = int(step_ids[bad][0])
            raise RoutingError(
                f"step id {value} is out of range: valid are {PROMPT_STEP} (prompt), "
                f"{PAD_STEP} (padding), 0..{self.num_experts - 1} (experts), "
                f"{EXPECTED_STEP} (expected value) and, with a shared expert, "
                f"{SHARED_ONLY_STEP} (shared only)"
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

    def require(self, where: str) -> torch.Tensor:
        """The step ids, or a :class:`RoutingError` naming ``where`` and the fix."""
        if self._step_ids is None:
            raise RoutingError(f"{where}: {_NO_STATE}")
        return self._step_ids

    # --- coefficient construction
    # ------------------------------------------------------
    def _prompt_experts(self, steps: torch.Tensor) -> torch.Tensor:
        """Expert id per token for prompt tokens under random routing."""
        is_prompt = steps == PROMPT_STEP  # [B, T]
        prev = torch.zeros_like(is_prompt)
        prev[:, 1:] = is_prompt[:, :-1]
        starts = is_prompt & ~prev  # first token of every prompt run
        run_id = torch.cumsum(starts.flatten(), 0).view_as(steps) - 1  # [B, T]
        n_runs = int(starts.sum())
        gen = torch.Generator().manual_seed(draw_seed(self.seed, self._draw_key))
        draws = torch.randint(self.num_experts, (max(n_runs, 1),), generator=gen)
        return draws.to(steps.device)[run_id.clamp(min=0)]

    def _resolve_prompt(self, steps: torch.Tensor) -> torch.Tensor:
        """``PROMPT_STEP`` replaced by what ``prompt_routing`` makes of it."""
        is_prompt = steps == PROMPT_STEP
        if self.prompt.is_random:
            value = self._prompt_experts(steps)
        else:
            value = torch.full_like(steps, self.prompt.step)
        return torch.where(is_prompt, value, steps)

    def coefficients(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Per-token block weights ``[B, T, n_blocks]``."""
        key = ("coef", dtype, device)
        if key not in self._cache:
            steps = self.require("coefficients").to(device)
            self._cache[key] = self._coefficients_of(steps, dtype)
        return self._cache[key]

    def _coefficients_of(self, steps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.single:  # one LoRA: every block at 1 on every non-padding token
            valid = (steps != PAD_STEP).to(dtype)[..., None]
            return valid.repeat(*(1,) * steps.dim(), self.n_blocks)
        steps = self._resolve_prompt(steps)  # [B, T], no PROMPT_STEP left
        valid = steps != PAD_STEP  # [B, T]
        step_weight = self.alpha if self.shared_expert else 1.0
        routed = steps >= 0  # [B, T]
        onehot = torch.nn.functional.one_hot(steps.clamp(min=0), self.num_experts)
        experts = (onehot * routed[..., None]).to(dtype) * step_weight  # [B, T, E]
        expected = (steps == EXPECTED_STEP)[..., None].to(dtype)  # [B, T, 1]
        experts = experts + expected * (step_weight / self.num_experts)
        blocks = [experts]
        if self.shared_expert:
            blocks.append((valid.to(dtype) * (1.0 - self.alpha))[..., None])
        return torch.cat(blocks, dim=-1)  # [B, T, n_blocks]

    def rank_mask(
        self,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        scaling: float = 1.0,
    ) -> torch.Tensor:
        """Per-token mask over the rank dimension ``[B, T, n_blocks * rank]``.

        ``scaling`` (PEFT's LoRA scaling) multiplies the mask, so that a layer scales
        the rank-sized intermediate instead of its full-width output.
        """
        key = ("mask", rank, dtype, device, scaling)
        mask = self._cache.get(key)
        if mask is None:
            coef = self.coefficients(dtype, device)  # [B, T, n_blocks]
            if scaling != 1.0:
                coef = coef * scaling
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
        steps = self.require("uniform_row")
        if steps.numel() <= _PY_TOKENS:  # decode: a few ids, cheapest in Python
            ids = set(steps.flatten().tolist())
            if len(ids) == 1:
                (step,) = ids
                if step != PROMPT_STEP or not self.prompt.is_random or self.single:
                    return self._row_of(step, dtype)
        # mixed ids can still share coefficients (a prompt routed to the stage of the
        # other tokens), and random prompt draws live in the coefficient tensor
        coef = self.coefficients(dtype, device).reshape(-1, self.n_blocks)  # [N, n]
        if not bool((coef == coef[:1]).all()):
            return None
        return tuple(coef[0].tolist())

    def _row_of(self, step: int, dtype: torch.dtype) -> tuple[float, ...]:
        """The coefficients of one step id (not a random-routed prompt).

        Built by the same tensor operations as :meth:`coefficients`, so the values are
        bit-identical.
        """
        return tuple(
            self._coefficients_of(torch.tensor([[step]]), dtype)[0, 0].tolist()
        )


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
