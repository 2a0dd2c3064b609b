"""Step skipping without a dense mask: causal attention over gathered key regions.

The dense step-skipping mask (``masks.build_step_skip_mask``) makes sdpa compute the
full ``T × T`` square instead of the causal half, and it grows with the sequence: 1.25×
plain causal at 2,048 tokens. But a hidden stage only ever removes one contiguous span
of keys from every later query of its sequence. So a sequence splits into **regions** at
the end of each hidden span: the queries of a region all see the same keys, namely the
visible spans before the region (the sequence start up to the first hidden span, between
two hidden spans, …) followed by the region's own tokens up to themselves. Gathered into
one tensor, that is a causal attention aligned to the lower right::

    keys:    [ prompt | hidden analysis | guidance ... | answer ... ]
    region 0 = prompt + analysis queries: plain causal over [0, end of analysis)
    region 1 = guidance + answer queries: keys [prompt] + [guidance ... answer], i.e.
               sdpa(q_region, k_gathered, attn_mask=causal_lower_right(n, P + n))

so every region runs on the fast causal kernels and no ``T × T`` tensor exists. Packed
rows hold several sequences, each with its own regions; padding queries see only
themselves, as in the dense mask. :func:`plan_regions` computes the regions from the
same hidden-stage draw as the dense mask, and :func:`regions_to_mask` turns a plan back
into that mask: ``tests/test_attention.py`` checks the two agree exactly, and the
attention outputs too.

It runs as a transformers attention function (``AttentionInterface``, name
``mote_sdpa``), installed on the model by the plugin when ``attn_implementation: sdpa``
and step skipping is on. Without an active plan (evaluation, generation) it *is*
transformers' own sdpa attention. The plan of a micro-batch is active inside
:func:`regions_active`, which the trainer holds around forward and backward, so
gradient-checkpoint recomputation sees it too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

#: Name of the attention function (and its mask function) in transformers' interfaces.
ATTENTION_NAME = "mote_sdpa"


class StepSkipUnsupported(ValueError):
    """This attention implementation cannot run step skipping."""


Span = tuple[int, int]


@dataclass(frozen=True)
class Region:
    """Queries ``[start, end)`` of row ``row``; they see ``prefix`` then themselves."""

    row: int
    start: int
    end: int
    prefix: tuple[Span, ...]  # visible key spans before ``start``

    @property
    def prefix_len(self) -> int:
        return sum(e - s for s, e in self.prefix)


@dataclass(frozen=True)
class RegionPlan:
    """The regions of one batch ``[batch, length]``; ``pad`` rows/positions see only
    themselves."""

    batch: int
    length: int
    regions: tuple[Region, ...]
    pad: tuple[tuple[int, int], ...]  # (row, position) of padding tokens
    #: per-device index tensors of the plan (built by the first layer, reused by all)
    cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)


def plan_regions(
    step_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    hidden_content: torch.Tensor,
) -> RegionPlan:
    """Regions of a batch from its sequences and the tokens hidden from later ones.

    seq_ids: [B, T] sequence number (0 = padding, ``masks.sequence_ids``);
    hidden_content: [B, T] bool, the tokens later tokens of another stage cannot see
    (``masks._token_roles``: a hidden stage's content, its markers unless kept visible).
    A hidden span is a maximal run of hidden tokens of one stage.
    """
    b, t = step_ids.shape
    steps, seqs, hidden = step_ids.tolist(), seq_ids.tolist(), hidden_content.tolist()
    regions: list[Region] = []
    pad: list[tuple[int, int]] = []
    for row in range(b):
        pos = 0
        while pos < t:
            seq = seqs[row][pos]
            end = pos
            while end < t and seqs[row][end] == seq:
                end += 1
            if seq == 0:
                pad += [(row, p) for p in range(pos, end)]
            else:
                regions += _sequence_regions(row, pos, end, steps[row], hidden[row])
            pos = end
    return RegionPlan(b, t, tuple(regions), tuple(pad))


def _sequence_regions(
    row: int, start: int, end: int, steps: list[int], hidden: list[bool]
) -> list[Region]:
    """Regions of one sequence ``[start, end)``: a new one after each hidden span."""
    spans: list[Span] = []  # hidden spans, in order
    pos = start
    while pos < end:
        if hidden[pos]:
            run = pos
            while run < end and hidden[run] and steps[run] == steps[pos]:
                run += 1
            spans.append((pos, run))
            pos = run
        else:
            pos += 1
    out: list[Region] = []
    region_start = start
    visible: list[Span] = []  # visible key spans before the current region
    for a, z in spans:
        if z > region_start:
            out.append(Region(row, region_start, z, tuple(visible)))
        if a > region_start:  # the tokens between the last region start and the span
            visible.append((region_start, a))
        region_start = z
    if region_start < end:
        out.append(Region(row, region_start, end, tuple(visible)))
    return [r for r in out if r.end > r.start]


def regions_to_mask(plan: RegionPlan, device: Any = None) -> torch.Tensor:
    """The boolean ``[B, 1, T, T]`` mask a plan stands for (for tests and checks)."""
    mask = torch.zeros(plan.batch, 1, plan.length, plan.length, dtype=torch.bool)
    for reg in plan.regions:
        for s, e in reg.prefix:
            mask[reg.row, 0, reg.start : reg.end, s:e] = True
        n = reg.end - reg.start
        own = torch.ones(n, n, dtype=torch.bool).tril()
        mask[reg.row, 0, reg.start : reg.end, reg.start : reg.end] = own
    for row, pos in plan.pad:
        mask[row, 0, pos, pos] = True
    return mask.to(device) if device is not None else mask


class _PlanSlot:
    """The step-skipping plan of the micro-batch being trained, seen from every thread.

    Why not a ``ContextVar``: on CUDA, autograd runs backward on a worker thread per
    device, and gradient checkpointing recomputes the forward there. A new thread
    starts with an empty context, so a plan held in a ``ContextVar`` is invisible to
    the recomputation: reentrant checkpointing then silently recomputes plain causal
    attention (wrong gradients), non-reentrant raises ``CheckpointError``. One
    process-wide slot is what every thread reads; it is set for exactly one training
    step (forward, loss and backward) by the trainer, which never overlaps two.

    ``expected``: the trainer runs a region model (step skipping on). Inside, a
    training-mode attention call without a plan is an error, never plain attention.
    """

    __slots__ = ("plan", "expected", "lock")

    def __init__(self) -> None:
        self.plan: RegionPlan | None = None
        self.expected = False
        self.lock = threading.Lock()


_SLOT = _PlanSlot()


@contextlib.contextmanager
def regions_active(plan: RegionPlan | None, expected: bool = False) -> Iterator[None]:
    """Attention runs by ``plan`` inside the block, on every thread (None: plain).

    ``expected`` also expects plans inside the block (see :func:`plans_expected`).
    """
    with _SLOT.lock:
        before = (_SLOT.plan, _SLOT.expected)
        _SLOT.plan, _SLOT.expected = plan, expected or before[1]
    try:
        yield
    finally:
        with _SLOT.lock:
            _SLOT.plan, _SLOT.expected = before


@contextlib.contextmanager
def plans_expected(on: bool = True) -> Iterator[None]:
    """Step skipping is on for the block (a whole training run): a training-mode
    attention call that finds no plan (a forward or recomputation outside its training
    step) raises :class:`PlanMissingError` instead of running unmasked."""
    with _SLOT.lock:
        before = _SLOT.expected
        _SLOT.expected = on or before
    try:
        yield
    finally:
        with _SLOT.lock:
            _SLOT.expected = before


class PlanMissingError(RuntimeError):
    """A training forward of a step-skipping model found no plan: fail, never
    unmask."""


def active_plan(module: torch.nn.Module | None = None) -> RegionPlan | None:
    """The plan attention must follow now (None: plain attention).

    Raises :class:`PlanMissingError` when step skipping is expected and ``module`` is
    in training mode but no plan is visible.
    """
    plan = _SLOT.plan
    if plan is None and _SLOT.expected and getattr(module, "training", False):
        raise PlanMissingError(
            "MoTE: a training forward (or its gradient-checkpoint recomputation) of a "
            "step-skipping model found no step-skipping plan; it would silently train "
            "on unmasked attention. Hold `axolotl_mote.attention.regions_active(plan)` "
            "around forward *and* backward of every training step"
        )
    return plan


def region_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: RegionPlan,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention output ``[B, H, T, D]`` of q, k, v ``[B, H(kv), T, D]`` by ``plan``."""
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    b, h, t, d = query.shape
    if (b, t) != (plan.batch, plan.length):
        raise ValueError(
            f"step-skipping regions are for a [{plan.batch}, {plan.length}] batch, the "
            f"attention got [{b}, {t}]"
        )
    gqa = key.shape[1] != h
    out = query.new_zeros(b, h, t, value.shape[-1])
    for reg in plan.regions:  # 4D slices: 3D inputs miss sdpa's fast CPU kernel
        row = slice(reg.row, reg.row + 1)
        q = query[row, :, reg.start : reg.end]  # [1, H, n, D]
        spans = [*reg.prefix, (reg.start, reg.end)]
        k = torch.cat([key[row, :, s:e] for s, e in spans], dim=2)  # [1, Hk, P+n, D]
        v = torch.cat([value[row, :, s:e] for s, e in spans], dim=2)
        n = reg.end - reg.start
        if reg.prefix:
            mask = causal_lower_right(n, n + reg.prefix_len)
            o = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                     enable_gqa=gqa)  # fmt: skip
        else:
            o = sdpa(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling,
                     enable_gqa=gqa)  # fmt: skip
        out[row, :, reg.start : reg.end] = o  # [1, H, n, D]
    if plan.pad:  # a padding query sees only itself: its own value
        rows = torch.tensor([r for r, _ in plan.pad], device=query.device)
        pos = torch.tensor([p for _, p in plan.pad], device=query.device)
        vals = value[rows, :, pos]  # [N, Hkv, D]
        if gqa:
            vals = vals.repeat_interleave(h // value.shape[1], dim=1)
        out[rows, :, pos] = vals
    return out


def mote_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: regions when a plan is active, else sdpa."""
    plan = active_plan(module)
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout,
            scaling=scaling, **kwargs,
        )  # fmt: skip
    if getattr(module, "sliding_window", None) or kwargs.get("softcap"):
        raise StepSkipUnsupported(
            "step-skipping regions do not support sliding-window or soft-capped "
            "attention; set mote.step_skip_attention: dense for this model"
        )
    out = region_attention(query, key, value, plan, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None  # [B, T, H, D]


# --- flash attention: the same regions through one variable-length kernel call --------
#: The varlen kernel's signature (flash-attn's ``flash_attn_varlen_func``): q, k, v are
#: ``[N, H(kv), D]`` token-packed, ``cu_seqlens_*`` int32 ``[n_segments + 1]``.
VarlenFn = Callable[..., torch.Tensor]


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    **_: Any,
) -> torch.Tensor:
    """Pure-torch stand-in for flash-attn's ``flash_attn_varlen_func`` (CPU, tests).

    flash-attn's documented semantics: segment i attends queries
    ``q[cu_q[i]:cu_q[i+1]]`` to keys ``k[cu_k[i]:cu_k[i+1]]``; with ``causal`` the mask
    is aligned to the bottom right (query j of n sees the first ``m - n + j + 1`` of m
    keys, flash-attn >= 2.1); k/v may have fewer heads (GQA). Returns ``[Nq, H, D]``.
    """
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 == q0:
            continue
        qs = q[q0:q1].transpose(0, 1)[None]  # [1, H, n, D]
        ks = k[k0:k1].transpose(0, 1)[None]  # [1, Hkv, m, D]
        vs = v[k0:k1].transpose(0, 1)[None]
        mask = causal_lower_right(q1 - q0, k1 - k0) if causal else None
        gqa = ks.shape[1] != qs.shape[1]
        o = sdpa(qs, ks, vs, attn_mask=mask, dropout_p=dropout_p,
                 scale=softmax_scale, enable_gqa=gqa)  # fmt: skip
        rows = torch.arange(q0, q1, device=q.device)
        out = out.index_copy(0, rows, o[0].transpose(0, 1))  # [n, H, D] into place
    return out


@dataclass(frozen=True)
class VarlenLayout:
    """A plan as token-packed segments: region i's queries, then its gathered keys."""

    q_index: torch.Tensor  # [Nq] flat (row * T + position) of every region query
    k_index: torch.Tensor  # [Nk] flat positions of each region's prefix + own keys
    cu_q: torch.Tensor  # int32 [regions + 1]
    cu_k: torch.Tensor  # int32 [regions + 1]
    max_q: int
    max_k: int
    pad_index: torch.Tensor  # [Np] flat positions of padding tokens
    order: torch.Tensor  # [B*T]: output row of each flat position in cat(q, pad)


def varlen_layout(plan: RegionPlan, device: Any) -> VarlenLayout:
    """Index tensors that turn a plan into one varlen call (built once per batch)."""
    t = plan.length
    q_idx: list[int] = []
    k_idx: list[int] = []
    cu_q, cu_k = [0], [0]
    for reg in plan.regions:
        base = reg.row * t
        q_idx += range(base + reg.start, base + reg.end)
        for s, e in (*reg.prefix, (reg.start, reg.end)):
            k_idx += range(base + s, base + e)
        cu_q.append(len(q_idx))
        cu_k.append(len(k_idx))
    pad = [row * t + pos for row, pos in plan.pad]
    flat = torch.tensor(q_idx + pad, dtype=torch.long)
    order = torch.empty_like(flat)
    order[flat] = torch.arange(flat.numel())
    lengths_q = [b - a for a, b in zip(cu_q, cu_q[1:])] or [0]
    lengths_k = [b - a for a, b in zip(cu_k, cu_k[1:])] or [0]

    def dev(values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return VarlenLayout(
        q_index=dev(q_idx), k_index=dev(k_idx), cu_q=dev(cu_q, torch.int32),
        cu_k=dev(cu_k, torch.int32), max_q=max(lengths_q), max_k=max(lengths_k),
        pad_index=dev(pad), order=order.to(device),
    )  # fmt: skip


def varlen_region_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: RegionPlan,
    varlen: VarlenFn,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention by ``plan`` as one varlen call: q, k, v ``[B, H(kv), T, D]`` ->
    ``[B, T, H, D]`` (flash attention's output layout).

    Every region is one segment: its queries against its gathered visible keys, causal
    aligned to the bottom right, exactly what :func:`region_attention` runs with one
    sdpa call per region. Padding queries see only themselves (their own value).
    """
    b, h, t, d = query.shape
    if (b, t) != (plan.batch, plan.length):
        raise ValueError(
            f"step-skipping regions are for a [{plan.batch}, {plan.length}] batch, the "
            f"attention got [{b}, {t}]"
        )
    layout = plan.cache.get(("varlen", query.device))
    if layout is None:
        layout = plan.cache[("varlen", query.device)] = varlen_layout(
            plan, query.device
        )
    hkv, dv = key.shape[1], value.shape[-1]
    q = query.transpose(1, 2).reshape(b * t, h, d)  # [B*T, H, D]
    k = key.transpose(1, 2).reshape(b * t, hkv, d)  # [B*T, Hkv, D]
    v = value.transpose(1, 2).reshape(b * t, hkv, dv)
    # flash-attn 3's varlen kernel has no dropout_p: pass it only when it is used
    extra = {"dropout_p": dropout} if dropout else {}
    o = varlen(
        q.index_select(0, layout.q_index), k.index_select(0, layout.k_index),
        v.index_select(0, layout.k_index), layout.cu_q, layout.cu_k, layout.max_q,
        layout.max_k, softmax_scale=scaling, causal=True, **extra,
    )  # fmt: skip  # [Nq, H, Dv]
    if layout.pad_index.numel():  # a padding query sees only itself: its own value
        own = v.index_select(0, layout.pad_index)  # [Np, Hkv, Dv]
        if hkv != h:
            own = own.repeat_interleave(h // hkv, dim=1)
        o = torch.cat([o, own.to(o.dtype)])
    return o.index_select(0, layout.order).view(b, t, h, dv)  # [B, T, H, Dv]


def _flash_varlen(implementation: str) -> VarlenFn:
    """transformers' varlen kernel for a flash implementation (flash-attn 2/3, a hub
    kernel): the one its own flash attention uses."""
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    (_, varlen, *_), _ = lazy_import_flash_attention(implementation)
    if varlen is None:
        raise StepSkipUnsupported(
            f"attn_implementation {implementation} has no variable-length kernel, so "
            "step skipping cannot run through it; use attn_implementation: sdpa"
        )
    return varlen


def flash_with_regions(
    original: Callable[..., Any], implementation: str, varlen: VarlenFn | None = None
) -> Callable[..., Any]:
    """Wrap a flash attention function: regions through its varlen kernel while a
    training step holds a plan, the original function untouched otherwise."""
    kernel: list[VarlenFn] = [varlen] if varlen is not None else []

    def attention(module, query, key, value, attention_mask, dropout=0.0,
                  scaling=None, **kwargs):  # fmt: skip
        plan = active_plan(module)
        if plan is None:
            return original(module, query, key, value, attention_mask,
                            dropout=dropout, scaling=scaling, **kwargs)  # fmt: skip
        if getattr(module, "sliding_window", None) or kwargs.get("softcap"):
            raise StepSkipUnsupported(
                "step-skipping regions do not support sliding-window or soft-capped "
                "attention; set attn_implementation: sdpa and "
                "mote.step_skip_attention: dense for this model"
            )
        if not kernel:
            kernel.append(_flash_varlen(implementation))
        dtype = query.dtype
        if dtype == torch.float32:  # flash kernels take half precision only
            from transformers.integrations.flash_attention import get_target_dtype

            dtype = get_target_dtype(query, module) or dtype
        q, k, v = (x.to(dtype) for x in (query, key, value))
        out = varlen_region_attention(q, k, v, plan, kernel[0], scaling, dropout)
        return out, None

    attention.mote_regions_of = original  # type: ignore[attr-defined]
    return attention


def install_flash_regions(implementation: str, varlen: VarlenFn | None = None) -> None:
    """Route ``implementation``'s attention through regions while a plan is active.

    transformers' flash function looks its kernel up by the model's
    ``_attn_implementation`` name, so the model keeps that name and the registered
    function is wrapped in place (once; generation and evaluation, which hold no plan,
    call the original unchanged). ``varlen`` replaces the kernel (tests: the pure-torch
    :func:`reference_varlen_attention`).
    """
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS[implementation]
    original = getattr(current, "mote_regions_of", current)
    AttentionInterface.register(
        implementation, flash_with_regions(original, implementation, varlen)
    )


def is_flash(implementation: str | None) -> bool:
    """Whether an attention implementation is a flash-attention flavour."""
    return bool(implementation) and "flash" in str(implementation)


def supports_regions(config: Any) -> bool:
    """Whether a model's attention is plain enough for regions (no sliding window, no
    logit soft-capping): otherwise the dense mask stays."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None):
        return False
    window = getattr(text, "sliding_window", None)
    use = getattr(text, "use_sliding_window", window is not None)
    return not (window and use)


def uses_regions(model: Any) -> bool:
    """Whether ``model``'s attention runs region plans: :func:`mote_sdpa_attention`,
    or a flash function wrapped by :func:`install_flash_regions`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    while hasattr(base, "module") and not hasattr(base, "config"):
        base = base.module
    name = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if name == ATTENTION_NAME:
        return True
    if not is_flash(name):
        return False
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return hasattr(ALL_ATTENTION_FUNCTIONS.get(name), "mote_regions_of")


def register() -> str:
    """Register the attention function and its (sdpa) mask builder; returns its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, mote_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
