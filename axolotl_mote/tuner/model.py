"""Attaching MoTE routing to a PEFT model, and finding it again behind wrappers."""

from __future__ import annotations

from typing import Any

import torch

from axolotl_mote.routing import RoutingError, RoutingState, start_position
from axolotl_mote.tuner.config import CATCH_ALL_KEYS, MoteConfig
from axolotl_mote.tuner.layer import RankMaskHook, check_supported

STATE_ATTR = "mote_routing_state"
_HANDLES_ATTR = "_mote_hook_handles"


def _inner_model(model: Any) -> torch.nn.Module:
    """The transformers model under a PeftModel (whose forward gets input_ids)."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def attach_mote(
    model: Any, config: MoteConfig, adapter_name: str = "default"
) -> RoutingState:
    """Hook every PEFT LoRA layer of ``model``; return the model's routing state.

    Each layer gets the ``lora_B`` mask hook (the masked path) and a
    :class:`~axolotl_mote.tuner.variant.MoteVariant` (the uniform fast path, merge
    refusal). Idempotent: attaching again replaces the previous hooks and state.
    """
    from peft.tuners.lora import LoraLayer

    from axolotl_mote.tuner.variant import install_variant

    detach_mote(model)
    state = RoutingState(
        num_experts=config.num_experts,
        alpha=config.alpha,
        shared_expert=config.shared_expert,
        prompt_routing=config.prompt_routing_index(),
        seed=config.seed,
    )
    # built by MoteConfig.peft_kwargs(): user rank patterns give other ranks per layer
    peft_config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
    ranks = getattr(peft_config, "rank_pattern", None) or {}
    catch_all = next((ranks[k] for k in CATCH_ALL_KEYS if k in ranks), None)
    checked = []  # every layer first: a refused one leaves no hooks behind
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        rank = check_supported(module, adapter_name, config.n_blocks, name)
        if rank != config.expert_rank and catch_all != config.peft_rank:
            raise ValueError(
                f"{name}: expert rank {rank} != mote expert_rank {config.expert_rank}; "
                "build the LoRA config with MoteConfig.peft_kwargs()"
            )
        checked.append((name, module, rank))
    if not checked:
        raise ValueError(
            "MoTE found no PEFT LoRA layers to route; check lora_target_modules / "
            "lora_target_linear"
        )
    handles, layers = [], []
    for name, module, rank in checked:
        hook = RankMaskHook(state, rank, name)
        handles.append(module.lora_B[adapter_name].register_forward_pre_hook(hook))
        handles.append(install_variant(module, adapter_name, state, rank, name))
        layers.append(module)
    state.num_layers = len(layers)
    inner = _inner_model(model)
    # Entry points: the transformers model (generate calls it) and the PEFT wrapper, whose
    # forward reaches the inner model through ``.forward`` and so skips the inner hooks.
    # Exactly one of them fires per call.
    for target in {id(model): model, id(inner): inner}.values():
        hook = _ResolveHook(state, layers)
        handles.append(target.register_forward_pre_hook(hook, with_kwargs=True))
        handles.append(target.register_forward_hook(_clear_auto(state)))
        object.__setattr__(target, STATE_ATTR, state)
    object.__setattr__(model, _HANDLES_ATTR, handles)
    return state


def detach_mote(model: Any) -> None:
    """Remove MoTE hooks and state (no-op if none)."""
    for handle in getattr(model, _HANDLES_ATTR, []) or []:
        handle.remove()
    for target in (model, _inner_model(model)):
        if STATE_ATTR in vars(target):
            delattr(target, STATE_ATTR)
    if _HANDLES_ATTR in vars(model):
        delattr(model, _HANDLES_ATTR)


def get_routing_state(model: Any) -> RoutingState:
    """The routing state behind DDP / DeepSpeed / accelerate / PEFT wrappers."""
    seen = set()
    current = model
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = vars(current).get(STATE_ATTR) if hasattr(current, "__dict__") else None
        if state is not None:
            return state
        for attr in ("module", "_orig_mod", "base_model", "model"):
            nxt = getattr(current, attr, None)
            if isinstance(nxt, torch.nn.Module) and id(nxt) not in seen:
                current = nxt
                break
        else:
            current = None
    raise ValueError(
        "this model has no MoTE routing: load it through the plugin "
        "(plugins: [axolotl_mote.MotePlugin]) or axolotl_mote.load_mote_model"
    )


class _ResolveHook:
    """Top-level pre-hook: validate explicit ids, or derive them with the resolver."""

    def __init__(self, state: RoutingState, layers: list) -> None:
        self.state = state
        self.layers = layers

    def __call__(self, module, args, kwargs):
        # a merged PEFT layer skips lora_B (and our hook): it would silently run unrouted
        if any(layer.merged for layer in self.layers):
            raise RoutingError(
                "MoTE LoRA layers are merged (merge_adapter / merge_and_unload): every "
                "expert's block was summed into the base weights, so routing cannot "
                "apply; call unmerge_adapter(), or export per-stage adapters with "
                "`axolotl-mote export` and merge one of those"
            )
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self.state.is_set and not self.state._auto:
            steps = self.state.step_ids
            ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if ref is not None and tuple(steps.shape) != tuple(ref.shape[:2]):
                raise RoutingError(
                    f"step_ids {tuple(steps.shape)} do not match the input "
                    f"{tuple(ref.shape[:2])}"
                )
            return None
        if self.state.resolver is not None and input_ids is not None:
            if (
                self.state._auto
                and getattr(self.state, "_auto_input", None) is input_ids
            ):
                return None  # nested entry point of the same call: already resolved
            steps = self.state.resolver(input_ids, kwargs)
            # a decode step continues the KV cache: the fast path's packed blocks of
            # this sequence stay valid (weights cannot change inside one generate call)
            self.state.set(steps, auto=True, same_sequence=start_position(kwargs) > 0)
            self.state._auto_input = input_ids
        return None


def _clear_auto(state: RoutingState):
    def hook(module, args, output):
        if state._auto:
            state.clear(end_sequence=False)  # the next decode step may reuse the packs
            state._auto_input = None
        return None

    return hook
