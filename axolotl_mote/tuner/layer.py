"""The per-layer routing hook on a PEFT LoRA layer.

PEFT's ``lora.Linear`` computes ``result + lora_B(lora_A(dropout(x))) * scaling``. MoTE
registers a forward pre-hook on ``lora_B`` that multiplies the rank-R intermediate
``h = lora_A(dropout(x))`` by the per-token block mask of the routing state:

    h: [B, T, R]   mask: [B, T, R] (block k repeated r times)   ->   h * mask

so only the routed step block (x alpha) and the shared block (x (1 - alpha)) reach
``lora_B``. Shapes stay static, every parameter joins every step, and the hook runs again
during gradient-checkpoint recomputation, reading the same (unchanged) state.
"""

from __future__ import annotations

from typing import Any

import torch

from axolotl_mote.routing import _NO_STATE, RoutingError, RoutingState


class RankMaskHook:
    """Forward pre-hook for ``lora_B``: scale each rank block per token."""

    def __init__(self, state: RoutingState, expert_rank: int, layer_name: str) -> None:
        self.state = state
        self.expert_rank = expert_rank
        self.layer_name = layer_name

    def __call__(
        self, module: torch.nn.Module, args: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        (h, *rest) = args  # h: [B, T, R]
        if not self.state.is_set:
            raise RoutingError(f"{self.layer_name}: {_NO_STATE}")
        mask = self.state.rank_mask(self.expert_rank, h.dtype, h.device)  # [B, T, R]
        if h.shape != mask.shape:
            raise RoutingError(
                f"{self.layer_name}: LoRA intermediate {tuple(h.shape)} does not match "
                f"the routing mask {tuple(mask.shape)}; step_ids must be [batch, seq] "
                "of the same input"
            )
        return (h * mask, *rest)


def check_supported(layer: Any, adapter_name: str, n_blocks: int, name: str) -> int:
    """Validate one PEFT LoRA layer; return its expert rank."""
    from axolotl_mote.tuner.variant import MoteVariant  # imports peft: lazily

    if (
        getattr(layer, "lora_embedding_A", None)
        and adapter_name in layer.lora_embedding_A
    ):
        raise TypeError(
            f"{name}: LoRA on embeddings is not supported by MoTE; target linear layers "
            "only (lora_target_linear / lora_target_modules without embeddings)"
        )
    if adapter_name not in getattr(layer, "lora_B", {}):
        raise TypeError(f"{name}: no LoRA adapter {adapter_name!r}")
    lora_b = layer.lora_B[adapter_name]
    if not isinstance(lora_b, torch.nn.Linear):
        raise TypeError(
            f"{name}: {type(layer).__name__} is not supported (lora_B is "
            f"{type(lora_b).__name__}); MoTE routes linear LoRA layers"
        )
    if getattr(layer, "use_dora", {}).get(adapter_name, False):
        raise ValueError(f"{name}: DoRA is not supported by MoTE; remove peft_use_dora")
    variant = getattr(layer, "lora_variant", {}).get(adapter_name)
    if variant is not None and not isinstance(variant, MoteVariant):
        raise TypeError(
            f"{name}: the LoRA adapter {adapter_name!r} already uses the PEFT variant "
            f"{type(variant).__name__}; MoTE routes plain LoRA layers only (turn the "
            "variant's LoraConfig option off)"
        )
    rank = int(layer.r[adapter_name])
    if rank % n_blocks:
        raise ValueError(
            f"{name}: LoRA rank {rank} is not a multiple of the {n_blocks} MoTE blocks; "
            "build the LoRA config with MoteConfig.peft_kwargs()"
        )
    return rank // n_blocks
