"""FSDP2's final save, with the marker rows.

Under ``fsdp_version: 2`` Axolotl's ``save_trained_model`` writes a LoRA run's final
adapter with ``axolotl.integrations.expert_parallel.shard.save_fsdp2_lora_adapter``:
it all-gathers every parameter whose name holds ``lora_`` and hands them to PEFT's
``get_peft_model_state_dict``. A MoTE run also trains the marker rows, as PEFT
trainable tokens (``trainable_tokens_delta``); PEFT's state dict asks for them, finds
nothing and raises ``KeyError`` after the whole run has trained (Axolotl 0.19 to 0.21,
any config with ``trainable_token_indices``).

:func:`install_final_save` wraps that one function for FSDP2 runs: when the model has
trainable-token deltas, every trainable parameter is all-gathered (a collective, in the
same order on every rank) and rank 0 writes the adapter through the model's own
``save_pretrained`` (so the compact layout of :class:`~axolotl_mote.tuner.model.
CompactSaving` applies, as in every other save path). Without trainable tokens,
Axolotl's function runs unchanged. Checkpoints during training do not go through it:
with ``SHARDED_STATE_DICT`` they hold the sharded model and optimizer (what resumes),
with ``FULL_STATE_DICT`` the HF Trainer gathers a full state dict and calls
``save_pretrained`` itself.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from axolotl_mote.log import get_logger

LOG = get_logger("axolotl_mote")

SAVE_MODULE = "axolotl.integrations.expert_parallel.shard"
SAVE_FUNCTION = "save_fsdp2_lora_adapter"
TOKENS_PARAM = "trainable_tokens_delta"
# activation checkpointing wraps modules; their parameter names gain this part
CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."


def fsdp_version(cfg: Any) -> str | None:
    """The FSDP version the config asks for ("1", "2", "unset"), or None without FSDP.

    ``fsdp_config`` (or the old ``fsdp`` list) decides whether FSDP is on: Axolotl
    0.21 defaults ``fsdp_version`` to 2 without it. The version may also sit inside
    ``fsdp_config``.
    """
    fsdp = cfg.get("fsdp_config") or {}
    if not (fsdp or cfg.get("fsdp")):
        return None
    version = cfg.get("fsdp_version") or fsdp.get("fsdp_version") or fsdp.get("version")
    return "unset" if version is None else str(version)


def is_fsdp2(cfg: Any) -> bool:
    """Whether the run shards with FSDP2 (what Axolotl's final save checks)."""
    return fsdp_version(cfg) == "2"


def gathered_trainable_state_dict(model: Any) -> dict[str, Any]:
    """Every trainable parameter as a whole tensor, by its PEFT name.

    An FSDP2 parameter is a DTensor shard: ``full_tensor`` all-gathers it, so every
    rank must call this, with the same parameters in the same order (named_parameters
    order is the module tree's, identical on every rank).
    """
    state: dict[str, Any] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name.replace(CHECKPOINT_WRAPPER, "")] = full.detach().cpu()
    return state


def save_adapter_gathered(model: Any, output_dir: str | os.PathLike) -> None:
    """All ranks gather; rank 0 writes the adapter with ``save_pretrained``."""
    import torch.distributed as dist

    state = gathered_trainable_state_dict(model)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        model.save_pretrained(str(output_dir), state_dict=state)
        LOG.info(
            "MoTE: FSDP2 final save: %d gathered tensors (experts and marker rows) "
            "written to %s",
            len(state),
            output_dir,
        )
    if distributed:
        dist.barrier()


def _has_trainable_tokens(model: Any) -> bool:
    return any(
        TOKENS_PARAM in name and param.requires_grad
        for name, param in model.named_parameters()
    )


def install_final_save() -> bool:
    """Wrap Axolotl's FSDP2 adapter save (idempotent). Returns whether it is wrapped.

    Axolotl imports the function inside ``save_trained_model`` at call time, so the
    module attribute is what it finds. A version without it is reported, not ignored.
    """
    import importlib

    try:
        module = importlib.import_module(SAVE_MODULE)
    except ImportError:
        module = None
    original = getattr(module, SAVE_FUNCTION, None)
    if original is None:
        LOG.warning(
            "MoTE: %s.%s not found in this Axolotl; the FSDP2 final save is Axolotl's "
            "own. If it fails on `trainable_tokens_delta`, save with "
            "`fsdp_config.state_dict_type: FULL_STATE_DICT` checkpoints instead.",
            SAVE_MODULE,
            SAVE_FUNCTION,
        )
        return False
    if getattr(original, "_mote_wrapped", False):
        return True

    @functools.wraps(original)
    def save_fsdp2_lora_adapter(model, output_dir, *args, **kwargs):
        if not _has_trainable_tokens(model):
            return original(model, output_dir, *args, **kwargs)
        save_adapter_gathered(model, output_dir)
        return True

    save_fsdp2_lora_adapter._mote_wrapped = True
    save_fsdp2_lora_adapter.__wrapped__ = original
    setattr(module, SAVE_FUNCTION, save_fsdp2_lora_adapter)
    return True
