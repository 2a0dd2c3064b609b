"""The per-layer MoTE forward: a PEFT LoRA variant with a masked and a fast path.

PEFT's ``lora.Linear.forward`` (and the bitsandbytes 4-bit layer's) hands an adapter
that has a variant to ``lora_variant[adapter].forward(module, active_adapter=, x=,
result=, **kwargs)`` (peft 0.20 and 0.21 alike), its supported extension point.
:class:`MoteVariant` is MoTE's one forward per layer. It checks, in order: the routing
state is set (else :class:`~axolotl_mote.routing.RoutingError`), the input matches the
step ids, then picks one of two computations of the same delta:

* **masked** (the reference path; training, prefill, mixed batches)::

      h = lora_A(dropout(x))                  [B, T, R]     R = n_blocks · r
      y = addmm(result, h * (s · mask), B.T)   mask [B, T, R]: block k repeated r times

  where ``mask`` holds each token's block coefficients (``RoutingState.rank_mask``):
  the routed step block × alpha and the shared block × (1 − alpha). PEFT's scaling
  ``s`` rides in the rank-sized mask and the sum in the GEMM, so no full-width
  ``[B, T, out]`` temporary is made (PEFT's own form, ``result + lora_B(h * mask) * s``,
  makes two, and their backward); that form stays where the module call is needed: a
  ``lora_B`` bias, ZeRO-3 partitioned weights, mixed dtypes outside autocast, and with
  ``RoutingState.fast_path`` off (the reference form for A/B runs). Shapes are
  static, every parameter joins every step (an expert without tokens gets an exact zero
  gradient), and gradient-checkpoint recomputation reads the same, unchanged state.
  Computing only each token's two blocks instead (tokens sorted by expert, a GEMM per
  expert, scattered back) was measured slower on CPU: the gathers cost more than the
  rank they save at r = 16 (docs/benchmarks.md).
* **uniform** (decode fast path): when every token of the forward has the same
  coefficients ``c`` (``RoutingState.uniform_row``: batch-1 decoding, or all rows in
  one stage), only the blocks K with ``c_k != 0`` are computed, from a packed copy::

      A_K = [A_k for k in K]                   [|K|·r, in]   rows k·r .. (k+1)·r
      B_K = [s · c_k · B[:, k·r:(k+1)·r] ...]  [out, |K|·r]  s: PEFT scaling
      y   = result + (x @ A_K.T) @ B_K.T       [..., in] -> [..., |K|·r] -> [..., out]

  The zero blocks are never read. Packed (a copy), not sliced in place: the blocks of a
  step and of the shared expert are not adjacent, and the columns of ``lora_B`` are
  strided, which on CPU cost as much to read as all of them. Packs live in
  ``RoutingState.packs`` for one generated sequence and are rebuilt when a weight's
  storage or version, or the scaling, changed. Taken only outside autograd and in eval
  mode: gradients always come from the masked path.
  ``tests/tuner/test_mote_fast_path.py`` checks both paths against the naive
  per-expert loop (``reference.py``).

Merging is refused: a merge sums every expert's block into the base weight, which no
routing can undo at run time.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import LoraVariant

from axolotl_mote.routing import RoutingError, RoutingState

MERGE_REFUSED = (
    "cannot merge a MoTE adapter (merge_adapter / merge_and_unload): merging sums "
    "every expert's block into the base weights, after which no routing can apply. "
    "Export per-stage adapters with `axolotl-mote export` and merge one of those"
)

#: ``(key, A_K, B_K)``: the weights' (data_ptr, version) x2 and scaling it was built
#: from, A_K [|K|·r, in] and B_K [out, |K|·r]; A_K is None when every c_k is 0.
Pack = tuple[tuple, torch.Tensor | None, torch.Tensor | None]


class MoteVariant(LoraVariant):
    """The per-layer MoTE variant: uniform fast path, else the masked PEFT forward.

    Unlike PEFT's built-in variants (static methods, chosen from LoraConfig fields)
    this one is an instance: it holds the model's routing state and the layer's expert
    rank, and ``attach_mote`` installs it in ``layer.lora_variant`` after PEFT built
    the layer.
    """

    def __init__(self, state: RoutingState, expert_rank: int, layer_name: str) -> None:
        self.state = state
        self.expert_rank = expert_rank
        self.layer_name = layer_name

    # --- PEFT's variant interface ---------------------------------------------------
    @staticmethod
    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to initialise: MoTE's parameters are the plain LoRA's."""

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> Any:
        raise RoutingError(MERGE_REFUSED)

    @staticmethod
    def merge_unsafe(module: Any, active_adapter: str, orig_weight: Any) -> None:
        raise RoutingError(MERGE_REFUSED)

    @staticmethod
    def unmerge(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> Any:
        """Vanilla unmerge: only a layer merged before MoTE was attached gets here."""
        delta = module.get_delta_weight(active_adapter)
        return orig_weight.data - delta.to(orig_weight.dtype)

    def supports_lora_conversion(self) -> bool:
        """peft >= 0.21 ``convert_to_lora``: a plain LoRA would lose the routing."""
        return False

    def forward(
        self,
        module: Any,
        active_adapter: str,
        x: torch.Tensor,
        result: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``result`` plus the routed LoRA delta of ``x`` [B, T, in] (PEFT cast x)."""
        steps = self.state.require(self.layer_name)  # [B, T]
        if tuple(x.shape[:-1]) != tuple(steps.shape):
            raise RoutingError(
                f"{self.layer_name}: input {tuple(x.shape[:-1])} does not match the "
                f"step_ids {tuple(steps.shape)}; step_ids must be [batch, seq] of the "
                "same input"
            )
        pack = self._uniform_pack(module, active_adapter, x)
        if pack is not None:  # uniform path: the non-zero blocks, packed
            _, a_k, b_k = pack
            if a_k is None:  # every token is padding: no delta
                return result
            linear = torch.nn.functional.linear
            return result + linear(linear(x, a_k), b_k)  # [..., |K|·r] -> [..., out]
        lora_a = module.lora_A[active_adapter]
        lora_b = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        h = lora_a(dropout(x))  # masked path  [B, T, R]
        if not (self.state.fast_path and _fusable(lora_b, result, h)):  # PEFT's form
            mask = self.state.rank_mask(self.expert_rank, h.dtype, h.device)
            return result + lora_b(h * mask) * scaling
        # result + (h ⊙ s·mask) @ B.T as one GEMM: the scaling rides in the rank-sized
        # mask and the sum in addmm, so no full-width [B, T, out] temporaries
        mask = self.state.rank_mask(self.expert_rank, h.dtype, h.device, scaling)
        hm = (h * mask).reshape(-1, h.shape[-1])  # [B·T, R]
        out = result.shape[-1]
        fused = torch.addmm(result.reshape(-1, out), hm, lora_b.weight.t())
        return fused.view(result.shape)

    # --- the fast path ----------------------------------------------------------------
    def _uniform_pack(self, module: Any, adapter: str, x: torch.Tensor) -> Pack | None:
        """The pack of the forward's shared coefficients, or None (masked path).

        Checked in order: autograd or train mode (the masked path trains), the fast
        path switched off (``RoutingState.fast_path``), coefficients that differ
        between tokens, then the cached pack (its weights' storage and version, and
        the scaling, unchanged) or a new one.
        """
        state = self.state
        if torch.is_grad_enabled() or module.training or not state.fast_path:
            return None
        row = state.uniform_row(x.dtype, x.device)
        if row is None:
            return None
        a = module.lora_A[adapter].weight  # [R, in]
        b = module.lora_B[adapter].weight  # [out, R]
        scaling = module.scaling[adapter]
        key = (a.data_ptr(), a._version, b.data_ptr(), b._version, scaling)
        pack = state.packs.get((self, row))
        if pack is None or pack[0] != key:
            pack = self._pack(module, adapter, row, key)
            if pack is None:
                return None
            state.packs[(self, row)] = pack
        return pack

    def _pack(
        self, module: Any, adapter: str, row: tuple[float, ...], key: tuple
    ) -> Pack | None:
        """Copy the blocks with ``c_k != 0`` of ``row``, ``s·c_k`` folded into B.

        None where only the module calls are right: a ``lora_B`` bias, or weights that
        only their modules may read (ZeRO-3, FSDP2, hooks: :func:`_plain`).
        """
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        if lora_b.bias is not None or not (_plain(lora_a) and _plain(lora_b)):
            return None
        blocks = [k for k, c in enumerate(row) if c != 0.0]
        if not blocks:
            return (key, None, None)
        r, scaling = self.expert_rank, module.scaling[adapter]
        a, b = lora_a.weight.detach(), lora_b.weight.detach()
        a_k = torch.cat([a[k * r : (k + 1) * r] for k in blocks])  # [|K|·r, in]
        b_k = b.new_empty(b.shape[0], len(blocks) * r)  # [out, |K|·r]
        for j, k in enumerate(blocks):  # s·c_k applied in fp32 at least, rounded once
            torch.mul(
                b[:, k * r : (k + 1) * r],
                row[k] * scaling,
                out=b_k[:, j * r : (j + 1) * r],
            )
        return (key, a_k, b_k)


def _plain(linear: torch.nn.Module) -> bool:
    """Whether ``linear``'s weight may be read without calling the module.

    Not where a wrapper owns the weight and makes it whole only inside the module's
    forward: ZeRO-3 (partitioned, ``ds_id``, gathered by forward hooks), Axolotl's
    FSDP2 (``fully_shard`` on each ``lora_A`` / ``lora_B``: another class, DTensor
    shards, hooks), or any other forward hook.
    """
    return (
        type(linear) is torch.nn.Linear
        and not hasattr(linear.weight, "ds_id")
        and not linear._forward_pre_hooks
        and not linear._forward_hooks
    )


def _fusable(lora_b: torch.nn.Linear, result: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether ``result + lora_b(h ⊙ mask)`` may run as one ``addmm`` on the weight.

    Not with a ``lora_B`` bias, nor a weight only its module may read (:func:`_plain`),
    nor ``result`` and ``h`` in different dtypes outside autocast (PEFT adds them with
    type promotion and casts back afterwards), nor a ``result`` that autocast's dtype
    would round.
    """
    if lora_b.bias is not None or not _plain(lora_b):
        return False
    if result.dtype == h.dtype == lora_b.weight.dtype:
        return True
    device = result.device.type  # autocast: fused only if it would not round result
    return torch.is_autocast_enabled(device) and (
        result.dtype == h.dtype == torch.get_autocast_dtype(device)
    )


class VariantHandle:
    """Removes an installed :class:`MoteVariant` (kept with the hook handles)."""

    def __init__(self, layer: Any, adapter_name: str, variant: MoteVariant) -> None:
        self.layer = layer
        self.adapter_name = adapter_name
        self.variant = variant

    def remove(self) -> None:
        if self.layer.lora_variant.get(self.adapter_name) is self.variant:
            del self.layer.lora_variant[self.adapter_name]


def install_variant(
    layer: Any, adapter_name: str, state: RoutingState, expert_rank: int, name: str
) -> VariantHandle:
    """Route ``layer``'s adapter through a :class:`MoteVariant`; return its handle.

    ``layer.check_supported`` has refused any other variant on the adapter.
    """
    variant = MoteVariant(state, expert_rank, name)
    layer.lora_variant[adapter_name] = variant
    return VariantHandle(layer, adapter_name, variant)


def check_supported(layer: Any, adapter_name: str, n_blocks: int, name: str) -> int:
    """Validate one PEFT LoRA layer for MoTE; return its expert rank."""
    if (
        getattr(layer, "lora_embedding_A", None)
        and adapter_name in layer.lora_embedding_A
    ):
        raise TypeError(
            f"{name}: LoRA on embeddings is not supported by MoTE; target linear "
            "layers only (lora_target_linear / lora_target_modules without embeddings)"
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
    if getattr(layer, "merged", False):
        raise RoutingError(
            f"{name}: the LoRA layer is merged into its base weights, which sums every "
            "expert's block; call unmerge_adapter() before attaching MoTE"
        )
    rank = int(layer.r[adapter_name])
    if rank % n_blocks:
        raise ValueError(
            f"{name}: LoRA rank {rank} is not a multiple of the {n_blocks} MoTE "
            "blocks; build the LoRA config with MoteConfig.peft_kwargs()"
        )
    return rank // n_blocks
