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
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

#: Name of the attention function (and its mask function) in transformers' interfaces.
ATTENTION_NAME = "mote_sdpa"

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


_ACTIVE: contextvars.ContextVar[RegionPlan | None] = contextvars.ContextVar(
    "mote_region_plan", default=None
)


@contextlib.contextmanager
def regions_active(plan: RegionPlan | None) -> Iterator[None]:
    """Attention runs by ``plan`` inside the block (None: plain sdpa)."""
    token = _ACTIVE.set(plan)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


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
    plan = _ACTIVE.get()
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout,
            scaling=scaling, **kwargs,
        )  # fmt: skip
    if getattr(module, "sliding_window", None) or kwargs.get("softcap"):
        raise ValueError(
            "step-skipping regions do not support sliding-window or soft-capped "
            "attention; set mote.step_skip_kernel: dense for this model"
        )
    out = region_attention(query, key, value, plan, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None  # [B, T, H, D]


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
    """Whether ``model`` runs its attention through :func:`mote_sdpa_attention`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    while hasattr(base, "module") and not hasattr(base, "config"):
        base = base.module
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == (
        ATTENTION_NAME
    )


def register() -> str:
    """Register the attention function and its (sdpa) mask builder; returns its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, mote_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
