"""The grouped MoTE delta: each token through its own two blocks, not all of them.

The masked path (``tuner/layer.py``) computes every block for every token and zeroes
the others with a rank mask: ``n_blocks · r`` of rank per token, of which a routed
token uses two blocks (its step expert's and the shared expert's). Here the tokens are
sorted by step expert once per forward (``RoutingState.groups``) and each group meets
only its own block::

    xs  = x[perm]                                   [M, in]   tokens with a step expert
    h_k = (xs[g_k] @ A_k.T) · c_step[g_k]           [m_k, r]  g_k: expert k's slice
    y   = (x @ A_s.T · c_shared) @ B_s.T            [N, out]  shared block, every token
    y[perm] += concat_k(h_k @ B_k.T)                          scatter back

``c`` carries PEFT's scaling and the routing coefficients (alpha, 1 − alpha, 0 for
padding). The backward is written out below rather than left to autograd, so that
``xs`` is gathered again instead of kept: the grouped path saves only rank-sized
activations beyond the input the masked path also keeps. A weight block without tokens
gets an exact zero gradient, as on the masked path.

Numerically this is the masked path's sum in another order (fp32: equal to ~1e-6;
``tests/tuner/test_mote_grouped.py`` checks outputs and every gradient against the
masked path and the naive per-expert loop).
"""

from __future__ import annotations

from typing import Any

import torch

from axolotl_mote.routing import Groups


def _bounds(counts: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(k, lo, hi)`` of every expert with tokens: its rows ``lo:hi`` in ``perm``."""
    out, lo = [], 0
    for k, count in enumerate(counts):
        if count:
            out.append((k, lo, lo + count))
        lo += count
    return out


class RoutedLora(torch.autograd.Function):
    """``y [N, out]``: the MoTE delta of ``x [N, in]`` through the grouped blocks.

    Runs in ``x``'s dtype, or autocast's where autocast is on (as ``nn.Linear`` would);
    gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,  # [N, in]
        a: torch.Tensor,  # [n_blocks·r, in]
        b: torch.Tensor,  # [out, n_blocks·r]
        perm: torch.Tensor,  # [M]
        step_coef: torch.Tensor,  # [M], scaling folded in
        shared_coef: torch.Tensor | None,  # [N], scaling folded in
        counts: tuple[int, ...],
        rank: int,
    ) -> torch.Tensor:
        device = x.device.type
        dtype = (
            torch.get_autocast_dtype(device)
            if torch.is_autocast_enabled(device)
            else x.dtype
        )
        xc, ac, bc = x.to(dtype), a.to(dtype), b.to(dtype)
        step_coef = step_coef.to(dtype)
        r, n_experts = rank, len(counts)
        xs = xc.index_select(0, perm)  # [M, in]
        h = xc.new_empty(perm.numel(), r)  # [M, r]
        ys = xc.new_empty(perm.numel(), b.shape[0])  # [M, out]
        for k, lo, hi in _bounds(counts):
            torch.mm(xs[lo:hi], ac[k * r : (k + 1) * r].t(), out=h[lo:hi])
        h.mul_(step_coef[:, None])
        for k, lo, hi in _bounds(counts):
            torch.mm(h[lo:hi], bc[:, k * r : (k + 1) * r].t(), out=ys[lo:hi])
        hs = None
        if shared_coef is not None:
            shared_coef = shared_coef.to(dtype)
            s = slice(n_experts * r, (n_experts + 1) * r)
            hs = torch.mm(xc, ac[s].t()).mul_(shared_coef[:, None])  # [N, r]
            y = torch.mm(hs, bc[:, s].t())  # [N, out]
        else:
            y = xc.new_zeros(x.shape[0], b.shape[0])
        y.index_add_(0, perm, ys)
        ctx.save_for_backward(x, a, b, perm, step_coef, shared_coef, h, hs)
        ctx.counts, ctx.rank, ctx.dtype = counts, rank, dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, a, b, perm, step_coef, shared_coef, h, hs = ctx.saved_tensors
        counts, r, dtype = ctx.counts, ctx.rank, ctx.dtype
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        n_experts = len(counts)
        g = grad.to(dtype)  # [N, out]
        xc, ac, bc = x.to(dtype), a.to(dtype), b.to(dtype)
        ga = torch.zeros_like(ac) if need_a else None
        gb = torch.zeros_like(bc) if need_b else None
        gs = g.index_select(0, perm)  # [M, out]
        xs = xc.index_select(0, perm) if need_a else None  # gathered again, not kept
        gxs = xc.new_empty(perm.numel(), x.shape[1]) if need_x else None
        for k, lo, hi in _bounds(counts):
            rows, cols = slice(k * r, (k + 1) * r), slice(k * r, (k + 1) * r)
            if gb is not None:
                gb[:, cols] = torch.mm(gs[lo:hi].t(), h[lo:hi])
            dh = torch.mm(gs[lo:hi], bc[:, cols]).mul_(step_coef[lo:hi, None])
            if ga is not None:
                torch.mm(dh.t(), xs[lo:hi], out=ga[rows])
            if gxs is not None:
                torch.mm(dh, ac[rows], out=gxs[lo:hi])
        gx = None
        if shared_coef is not None:
            s = slice(n_experts * r, (n_experts + 1) * r)
            if gb is not None:
                gb[:, s] = torch.mm(g.t(), hs)
            dhs = torch.mm(g, bc[:, s]).mul_(shared_coef[:, None])  # [N, r]
            if ga is not None:
                torch.mm(dhs.t(), xc, out=ga[s])
            if need_x:
                gx = torch.mm(dhs, ac[s])
        if need_x:
            if gx is None:
                gx = xc.new_zeros(x.shape)
            gx.index_add_(0, perm, gxs)
            gx = gx.to(x.dtype)
        return (
            gx,
            None if ga is None else ga.to(a.dtype),
            None if gb is None else gb.to(b.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def routed_lora_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    groups: Groups,
    rank: int,
    scaling: float,
) -> torch.Tensor:
    """The MoTE delta ``[..., out]`` of ``x [..., in]`` (PEFT's scaling included)."""
    flat = x.reshape(-1, x.shape[-1])
    shared = None if groups.shared_coef is None else groups.shared_coef * scaling
    y = RoutedLora.apply(
        flat,
        lora_a,
        lora_b,
        groups.perm,
        groups.step_coef * scaling,
        shared,
        groups.counts,
        rank,
    )
    return y.view(*x.shape[:-1], lora_b.shape[0])
