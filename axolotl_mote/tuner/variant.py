"""MoTE as a PEFT LoRA variant: the decode fast path, and no silent merging.

PEFT's ``lora.Linear.forward`` hands an adapter that has a variant to
``lora_variant[adapter].forward(module, active_adapter=, x=, result=, **kwargs)``
(peft 0.20 and 0.21 alike), its supported extension point. :class:`MoteVariant` uses it
to choose, per layer call, between two computations of the same delta:

* **masked** (the reference path; training, prefill, mixed batches): exactly PEFT's
  vanilla ``result + lora_B(lora_A(dropout(x))) * scaling``; the ``lora_B`` pre-hook
  (``layer.RankMaskHook``) masks the rank-R intermediate per token. Every rank row is
  read and multiplied, the zero blocks included.
* **uniform** (decode fast path): when every token of the forward has the same
  coefficients ``c`` (``RoutingState.uniform_row``: batch-1 decoding, or all rows in
  one stage), only the blocks K with ``c_k != 0`` are computed, from a packed copy::

      A_K = [A_k for k in K]                   [|K|·r, in]   rows k·r .. (k+1)·r
      B_K = [s · c_k · B[:, k·r:(k+1)·r] ...]  [out, |K|·r]  s: PEFT scaling
      y   = result + (x @ A_K.T) @ B_K.T       [..., in] -> [..., |K|·r] -> [..., out]

  The zero blocks are never read. Packed (a copy), not sliced in place: the blocks of a
  step and of the shared expert are not adjacent, and the columns of ``lora_B`` are
  strided, which on CPU cost as much to read as all of them. Packed, a decode step
  reads 2r rank rows instead of (E+1)·r, in two matmuls and one add (PEFT's vanilla
  LoRA: three module calls, two matmuls, a multiply and an add). Packs live in
  ``RoutingState.packs`` for one generated sequence (any forward that does not
  continue the KV cache drops them) and are rebuilt when a weight's storage or
  version, or the scaling, changed.

  Taken only outside autograd and in eval mode (``torch.no_grad`` generation): a
  training step never syncs with the host for it, and gradients always come from the
  masked path. ``tests/tuner/test_mote_fast_path.py`` checks it against the masked
  path and the naive per-expert loop (``reference.py``).

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
        """``result`` plus the routed LoRA delta of ``x`` [..., in] (PEFT cast x)."""
        pack = self._uniform_pack(module, active_adapter, x)
        if pack is None:  # masked path: PEFT's own expression, the lora_B hook masks
            lora_a = module.lora_A[active_adapter]
            lora_b = module.lora_B[active_adapter]
            dropout = module.lora_dropout[active_adapter]
            return result + lora_b(lora_a(dropout(x))) * module.scaling[active_adapter]
        _, a_k, b_k = pack
        if a_k is None:  # every token is padding: no delta
            return result
        linear = torch.nn.functional.linear
        return result + linear(linear(x, a_k), b_k)  # [..., |K|·r] -> [..., out]

    # --- the fast path ----------------------------------------------------------------
    def _uniform_pack(self, module: Any, adapter: str, x: torch.Tensor) -> Pack | None:
        """The pack of the forward's shared coefficients, or None (masked path).

        Checked in order: autograd or train mode (the masked path trains), the fast
        path switched off (``RoutingState.fast_path``), no routing state or an input
        not shaped like the step ids (the masked path raises the error), coefficients
        that differ between tokens, then the cached pack (its weights' storage and
        version, and the scaling, unchanged) or a new one.
        """
        state = self.state
        if torch.is_grad_enabled() or module.training or not state.fast_path:
            return None
        steps = state.step_ids
        if steps is None or x.shape[:-1] != steps.shape:
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

        None where only the module calls are right: a ``lora_B`` bias, or ZeRO-3
        partitioned weights (gathered by the modules' own hooks).
        """
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        if lora_b.bias is not None or hasattr(lora_a.weight, "ds_id"):
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
