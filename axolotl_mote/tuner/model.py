"""Attaching MoTE routing to a PEFT model, and finding it again behind wrappers."""

from __future__ import annotations

from typing import Any

import torch

from axolotl_mote.routing import RoutingState
from axolotl_mote.tuner.config import CATCH_ALL_KEYS, MoteConfig
from axolotl_mote.tuner.layer import check_supported, install_variant

STATE_ATTR = "mote_routing_state"

#: Tags PEFT writes into the saved adapter's model card (README.md) from the base
#: model's ``model_tags``: they tell a reader (and the Hub) this is not a plain LoRA.
MODEL_TAGS = ("axolotl-mote", "mote", "routed-lora")


def inner_model(model: Any) -> torch.nn.Module:
    """The transformers model under a PeftModel (whose forward gets input_ids)."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def attach_mote(
    model: Any,
    config: MoteConfig,
    adapter_name: str = "default",
    compact_save: bool = True,
) -> RoutingState:
    """Route every PEFT LoRA layer of ``model``; return the model's routing state.

    Each layer gets a :class:`~axolotl_mote.tuner.layer.MoteVariant`, its one MoTE
    forward. Every layer is checked before any is changed, so a refused layer leaves
    the model untouched. Idempotent: attaching again replaces the previous state.
    ``compact_save``: ``save_pretrained`` leaves the full embedding matrices out
    (:class:`CompactSaving`); only right when every row a resize added is saved as
    trainable tokens.
    """
    from peft.tuners.lora import LoraLayer

    detach_mote(model)
    state = RoutingState(
        num_experts=config.num_experts,
        alpha=config.alpha,
        shared_expert=config.shared_expert,
        prompt_routing=config.prompt_routing_index(),
        seed=config.seed,
        config=config,
        single=config.experts == "single",
    )
    # built by MoteConfig.peft_kwargs(): user rank patterns give other ranks per layer
    peft_config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
    ranks = getattr(peft_config, "rank_pattern", None) or {}
    catch_all = next((ranks[k] for k in CATCH_ALL_KEYS if k in ranks), None)
    checked = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        rank = check_supported(module, adapter_name, config.n_blocks, name)
        if rank != config.expert_rank and catch_all != config.peft_rank:
            raise ValueError(
                f"{name}: expert rank {rank} != mote expert_rank "
                f"{config.expert_rank}; build the LoRA config with "
                "MoteConfig.peft_kwargs()"
            )
        checked.append((name, module, rank))
    if not checked:
        raise ValueError(
            "MoTE found no PEFT LoRA layers to route; check lora_target_modules / "
            "lora_target_linear"
        )
    for name, module, rank in checked:
        state.attachments.add(install_variant(module, adapter_name, state, rank, name))
    if compact_save:
        state.attachments.add(CompactSaving(model))
    inner = inner_model(model)
    for target in {id(model): model, id(inner): inner}.values():
        object.__setattr__(target, STATE_ATTR, state)
    if hasattr(inner, "add_model_tags"):
        inner.add_model_tags(list(MODEL_TAGS))
    return state


class CompactSaving:
    """``model.save_pretrained`` without the full embedding matrices (removable).

    The marker tokens resize the vocabulary, and PEFT's ``save_embedding_layers="auto"``
    then saves the whole input and output embedding matrices in every adapter: about
    2.1 GB in bf16 for Llama-3.1-8B, next to roughly 0.3 GB of experts. Everything a
    MoTE adapter changes in them is already saved as PEFT trainable tokens (the marker
    rows, and any other new row), and loaders rebuild the resized vocabulary from
    ``mote_config.json``'s ``vocab_size``. So the default here is
    ``save_embedding_layers=False``; passing it explicitly still wins. Installed on the
    one PeftModel instance (Axolotl's checkpoints, its final save and ZeRO-3's gathered
    save all call it), never on the class.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.original = vars(model).get("save_pretrained")
        bound = model.save_pretrained

        def save_pretrained(*args: Any, save_embedding_layers: Any = False, **kwargs):
            return bound(*args, save_embedding_layers=save_embedding_layers, **kwargs)

        save_pretrained.__doc__ = bound.__doc__
        object.__setattr__(model, "save_pretrained", save_pretrained)

    def remove(self) -> None:
        if self.original is None:
            vars(self.model).pop("save_pretrained", None)
        else:
            object.__setattr__(self.model, "save_pretrained", self.original)


def detach_mote(model: Any) -> None:
    """Remove MoTE's variants, hooks and state (no-op if none)."""
    state = vars(model).get(STATE_ATTR) if hasattr(model, "__dict__") else None
    if state is not None:
        state.attachments.remove_all()
    for target in (model, inner_model(model)):
        if STATE_ATTR in vars(target):
            delattr(target, STATE_ATTR)


def get_routing_state(model: Any) -> RoutingState:
    """The routing state behind DDP / DeepSpeed / accelerate / PEFT wrappers."""
    state = find_routing_state(model)
    if state is None:
        raise ValueError(
            "this model has no MoTE routing: load it through the plugin "
            "(plugins: [axolotl_mote.MotePlugin]) or axolotl_mote.load_mote_model"
        )
    return state


def find_routing_state(model: Any) -> RoutingState | None:
    """Like :func:`get_routing_state`, None for a model without MoTE."""
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
    return None
