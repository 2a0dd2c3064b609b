"""Naive reference: the paper's formula as a loop over experts, for tests and
benchmarks.

Independent of the fast path: separate per-expert weights, boolean gathers and
``index_add_``, no rank-mask trick. ``tests/tuner`` compares the fast path against it.
"""

from __future__ import annotations

import torch

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP


def naive_mote_delta(
    x: torch.Tensor,
    expert_a: list[torch.Tensor],
    expert_b: list[torch.Tensor],
    shared_a: torch.Tensor | None,
    shared_b: torch.Tensor | None,
    scaling: float,
    alpha: float,
    expert_per_token: torch.Tensor,
) -> torch.Tensor:
    """MoTE delta ``alpha * E_step(x) + (1 - alpha) * E_shared(x)`` per token.

    x: [N, in]; expert_a[k]: [r, in]; expert_b[k]: [out, r]; expert_per_token: [N] with
    an expert id, -1 for "shared only" and ``PAD_STEP`` rows (zero) marked by ``-3``.
    """
    n, out_features = x.shape[0], expert_b[0].shape[0]
    delta = x.new_zeros(n, out_features)
    pad = expert_per_token == -3
    step_weight = alpha if shared_a is not None else 1.0
    for k, (a, b) in enumerate(zip(expert_a, expert_b)):
        idx = (expert_per_token == k).nonzero().flatten()
        if idx.numel():
            y = (x[idx] @ a.T) @ b.T * scaling  # [n_k, out]
            delta.index_add_(0, idx, step_weight * y)
    if shared_a is not None:
        idx = (~pad).nonzero().flatten()
        y = (x[idx] @ shared_a.T) @ shared_b.T * scaling
        delta.index_add_(0, idx, (1.0 - alpha) * y)
    return delta


def expert_per_token(
    step_ids: torch.Tensor, prompt_expert: torch.Tensor | int | str
) -> torch.Tensor:
    """Map step ids to expert ids for :func:`naive_mote_delta` (prompt resolved)."""
    out = step_ids.clone()
    is_prompt = step_ids == PROMPT_STEP
    if prompt_expert == "shared":
        out[is_prompt] = -1
    elif isinstance(prompt_expert, torch.Tensor):
        out[is_prompt] = prompt_expert[is_prompt]
    else:
        out[is_prompt] = int(prompt_expert)
    out[step_ids == PAD_STEP] = -3
    return out


def split_blocks(
    lora_a: torch.Tensor, lora_b: torch.Tensor, n_blocks: int, shared: bool
):
    """Slice a PEFT rank-R LoRA into per-expert (A_k, B_k) and the shared pair."""
    r = lora_a.shape[0] // n_blocks
    a = [lora_a[k * r : (k + 1) * r] for k in range(n_blocks)]
    b = [lora_b[:, k * r : (k + 1) * r] for k in range(n_blocks)]
    if shared:
        return a[:-1], b[:-1], a[-1], b[-1]
    return a, b, None, None


class NaiveMoteLinear(torch.nn.Module):
    """A linear layer with separate per-expert LoRA parameters (the naive loop).

    Used by the routing-overhead benchmark as the "naive per-expert loop" baseline and
    by model-level equivalence tests. ``expert_ids`` ([B, T] expert per token, -1
    shared-only,
    -3 pad) must be set before each forward.
    """

    def __init__(
        self,
        base: torch.nn.Linear,
        num_experts: int,
        rank: int,
        scaling: float,
        alpha: float,
        shared: bool = True,
    ) -> None:
        super().__init__()
        self.base = base
        self.scaling, self.alpha = scaling, alpha
        self.a = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
            for _ in range(num_experts)
        )
        self.b = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(base.out_features, rank))
            for _ in range(num_experts)
        )
        self.shared_a = (
            torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
            if shared
            else None
        )
        self.shared_b = (
            torch.nn.Parameter(torch.zeros(base.out_features, rank)) if shared else None
        )
        self.expert_ids: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.expert_ids is not None, "set expert_ids before forward"
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, in]
        delta = naive_mote_delta(
            flat,
            list(self.a),
            list(self.b),
            self.shared_a,
            self.shared_b,
            self.scaling,
            self.alpha,
            self.expert_ids.reshape(-1),
        )
        return self.base(x) + delta.view(*shape[:-1], -1)
