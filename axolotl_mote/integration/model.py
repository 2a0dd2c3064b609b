"""The model-loading hooks: seed, marker rows, LoRA rank blocks, routing attached."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from axolotl_mote.constants import EXPORT_INFO_NAME, MOTE_CONFIG_NAME
from axolotl_mote.log import get_logger
from axolotl_mote.settings import settings_of

LOG = get_logger("axolotl_mote")


def seed_model_init(cfg: Any) -> None:
    """``pre_model_load``: make the marker-row init and the expert init reproducible.

    The embedding resize and PEFT's LoRA init draw from the global RNG; whatever ran
    before (data preparation or not) would otherwise change them between two runs with
    the same seed, e.g. between a run and its resumption.
    """
    from transformers import set_seed

    set_seed(settings_of(cfg).seed)


def keep_experts_off_the_output_head(cfg: Any, model: Any) -> None:
    """``pre_lora_load``: never put experts on the output embedding (``lm_head``).

    Axolotl drops the head from ``lora_target_linear`` by its usual name per model
    type; where the name differs (GPT-NeoX in transformers 5 calls it ``lm_head``, not
    ``embed_out``) the head would become a LoRA layer, and PEFT cannot then train its
    marker rows (``trainable_token_indices cannot be applied to ... lora.Linear``).
    Added to ``lora_exclude_modules`` before Axolotl builds the LoraConfig.
    """
    from axolotl_mote.markers import output_embedding_name

    name = output_embedding_name(model)
    if name is None or not cfg.get("lora_target_linear"):
        return
    excluded = cfg.get("lora_exclude_modules") or []
    excluded = [excluded] if isinstance(excluded, str) else list(excluded)
    if name not in excluded:
        cfg["lora_exclude_modules"] = [*excluded, name]
        LOG.info("MoTE: no experts on the output head %r (lora_exclude_modules)", name)


def prepare_marker_rows(cfg: Any, model: Any) -> dict[str, Any]:
    """``pre_lora_load``: initialise new marker rows, then make them trainable.

    Returns the LoRA config kwargs (``trainable_token_indices``). Nothing to do when a
    trained adapter is loaded: its saved rows replace the base model's.
    """
    keep_experts_off_the_output_head(cfg, model)
    opts = settings_of(cfg).options
    if cfg.get("lora_model_dir") or (
        opts.marker_init != "describe" and not opts.train_marker_embeddings
    ):
        return {}
    from axolotl.loaders import load_tokenizer

    tokenizer = load_tokenizer(cfg)  # Axolotl's, markers included
    init_new_marker_rows(cfg, model, tokenizer)
    return marker_trainable_token_indices(cfg, model, tokenizer)


def marker_trainable_token_indices(
    cfg: Any, model: Any, tokenizer: Any
) -> dict[str, Any]:
    """PEFT ``trainable_token_indices`` for the marker rows (and the user's own)."""
    from axolotl_mote.markers import marker_ids, trainable_token_indices

    settings = settings_of(cfg)
    if not settings.options.train_marker_embeddings:
        return {}
    ids = set(marker_ids(tokenizer, settings.template))
    # every row the resize added (e.g. resize_token_embeddings_to_32x padding) is saved
    # with the markers: adapters leave the embedding matrices out (tuner/model.py)
    rows = model.get_input_embeddings().num_embeddings
    ids |= set(range(min(_base_vocab_rows(cfg), rows), rows))
    user = cfg.get("peft_trainable_token_indices")
    return {"trainable_token_indices": trainable_token_indices(model, ids, user)}


def _base_vocab_rows(cfg: Any) -> int:
    """Embedding rows of the base checkpoint, before any resize."""
    from transformers import AutoConfig

    source = cfg.get("base_model_config") or cfg.base_model
    config = AutoConfig.from_pretrained(
        source, trust_remote_code=bool(cfg.get("trust_remote_code"))
    )
    text = getattr(config, "get_text_config", lambda: config)()
    return int(getattr(text, "vocab_size", 0) or 0)


def init_new_marker_rows(cfg: Any, model: Any, tokenizer: Any) -> dict[str, str]:
    """Describe-initialise the rows of markers new to the base tokenizer.

    Markers the base tokenizer already has keep their rows (e.g. a model already
    trained with these markers). Off for ``marker_init: resize``.
    """
    settings = settings_of(cfg)
    if settings.options.marker_init != "describe":
        return {}
    from transformers import AutoTokenizer

    from axolotl_mote.markers import init_marker_rows, new_markers

    source = (
        cfg.get("tokenizer_config") or cfg.get("base_model_config") or cfg.base_model
    )
    base_vocab = AutoTokenizer.from_pretrained(
        source, trust_remote_code=bool(cfg.get("trust_remote_code"))
    ).get_vocab()
    new = new_markers(settings.template, base_vocab)
    done = init_marker_rows(model, tokenizer, settings.template, new)
    if done:
        LOG.info(
            "MoTE: initialised %d new marker rows from their stage words: %s",
            len(done),
            done,
        )
    return done


def lora_config_kwargs(cfg: Any, marker_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``get_lora_config_kwargs``: the rank blocks of every expert, and marker rows."""
    config = settings_of(cfg).config
    kwargs = config.peft_kwargs(
        lora_alpha=cfg.lora_alpha or cfg.lora_r or 8,
        use_rslora=bool(cfg.peft_use_rslora),
        rank_pattern=cfg.lora_rank_pattern,
        alpha_pattern=cfg.lora_alpha_pattern,
    )
    return {**kwargs, **marker_kwargs}


def attach_to_axolotl_model(cfg: Any, model: Any) -> None:
    """``post_lora_load``: route the PEFT LoRA layers Axolotl just built or loaded."""
    from peft import PeftModel

    from axolotl_mote.tuner.config import MoteConfig
    from axolotl_mote.tuner.model import attach_mote

    if not isinstance(model, PeftModel):
        raise TypeError(
            "MoTE expected a PEFT model after LoRA loading, got "
            f"{type(model).__name__}; set `adapter: lora`"
        )
    settings = settings_of(cfg)
    config = settings.config
    lora_dir = cfg.get("lora_model_dir")
    if lora_dir and (Path(lora_dir) / EXPORT_INFO_NAME).exists():
        # an exported per-stage adapter (axolotl-mote export) is a plain LoRA: no
        # routing, so `axolotl merge-lora` / `inference` work on it with the same config
        LOG.info(
            "MoTE: %s is an exported stage adapter; loaded as plain LoRA", lora_dir
        )
        return
    if lora_dir and (Path(lora_dir) / MOTE_CONFIG_NAME).exists():
        saved = MoteConfig.load(lora_dir)
        for field in ("stage_names", "expert_rank", "shared_expert"):
            if getattr(saved, field) != getattr(config, field):
                raise ValueError(
                    f"lora_model_dir {lora_dir} was trained with {field}="
                    f"{getattr(saved, field)!r} but the config gives "
                    f"{getattr(config, field)!r}; use the same template, lora_r and "
                    "mote.shared_expert as in training"
                )
    # compact adapters need the new rows saved as trainable tokens: without marker
    # training the full embedding matrices are saved, or a reload could not be exact
    attach_mote(model, config, compact_save=settings.options.train_marker_embeddings)
    use_step_skip_regions(settings, model)
    if loading_for_inference(cfg):  # `axolotl inference`: route by the emitted markers
        from axolotl.loaders import load_tokenizer

        from axolotl_mote.generation import install_router

        install_router(model, load_tokenizer(cfg))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        LOG.info(
            "MoTE: %d experts (%s)%s, rank %d each, alpha %.2f, prompt routing %s, "
            "step skipping p=%.2f",
            len(config.stage_names),
            ", ".join(config.stage_names),
            " + shared" if config.shared_expert else "",
            config.expert_rank,
            config.alpha,
            config.prompt_routing,
            settings.step_skip_prob,
        )
        if settings.step_skip_note:
            LOG.warning(settings.step_skip_note)


def use_step_skip_regions(settings: Any, model: Any) -> bool:
    """Run step skipping as attention regions (``attention.py``) when it is on.

    sdpa (``step_skip_attention: regions``) becomes ``mote_sdpa``; a flash attention
    keeps its name and its registered function is wrapped, so its training steps run
    the regions through the flash varlen kernel. Without an active plan (evaluation,
    generation) both are the original attention. Models with sliding-window or
    soft-capped attention keep sdpa's dense mask; under flash attention they cannot
    step-skip, which is an error (never a silent fallback to unmasked training).
    """
    from axolotl_mote.attention import (
        StepSkipUnsupported,
        install_flash_regions,
        is_flash,
        register,
        supports_regions,
    )

    attention = settings.attn_implementation
    if settings.step_skip != "regions":  # off, dense or flex: no attention to swap
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supports_regions(base.config):
        if is_flash(attention):
            raise StepSkipUnsupported(
                f"mote.step_skip_prob {settings.step_skip_prob} with {attention}: this "
                "model has sliding-window or soft-capped attention, which "
                "step-skipping regions cannot run; use attn_implementation: sdpa with "
                "mote.step_skip_attention: dense, or set mote.step_skip_prob: 0"
            )
        LOG.info(
            "MoTE: step skipping uses the dense mask (sliding-window or soft-capped "
            "attention)"
        )
        return False
    if is_flash(attention):
        # the name the model actually runs (transformers may swap in a hub kernel)
        install_flash_regions(base.config._attn_implementation)
        LOG.info("MoTE: step skipping runs as regions through %s's varlen kernel",
                 base.config._attn_implementation)  # fmt: skip
        return True
    base.set_attn_implementation(register())
    return True


def loading_for_inference(cfg: Any) -> bool:
    """Whether Axolotl is loading the model for ``axolotl inference`` (or ``chat``).

    The plugin hooks do not receive the loader's ``inference`` flag and the validated
    config drops an ``inference`` key, so read it from the ``ModelLoader`` that is
    calling the hook (one stack walk per model load).
    """
    if cfg.get("inference"):
        return True
    try:
        from axolotl.loaders.model import ModelLoader
    except ImportError:  # pragma: no cover - axolotl is a hard dependency
        return False
    frame = sys._getframe(1)
    while frame is not None:
        loader = frame.f_locals.get("self")
        if isinstance(loader, ModelLoader):
            return bool(getattr(loader, "inference", False))
        frame = frame.f_back
    return False
