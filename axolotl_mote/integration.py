"""What the plugin's hooks do to Axolotl's config and model, one function per hook.

Kept apart from ``plugin.py`` so the hooks stay one-liners and each step can be tested
without a PluginManager.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from axolotl_mote.constants import MOTE_CONFIG_NAME
from axolotl_mote.log import get_logger
from axolotl_mote.templates import load_template

LOG = get_logger("axolotl_mote")

_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


def prepare_raw_config(cfg: dict) -> None:
    """``register``: defaults on the raw YAML dict, before Axolotl validates it.

    - turns Axolotl's fused LoRA kernels off when unset (they bypass routing; an explicit
      ``true`` is rejected by validation with the fix);
    - adds the template's stage markers to ``special_tokens.additional_special_tokens``
      so Axolotl's tokenizer and embedding resize include them;
    - refuses ``axolotl merge-lora`` on a routed MoTE adapter;
    - checks local JSONL datasets record by record (``mote.validate_files``).
    """
    if cfg.get("mote") is None:
        cfg["mote"] = {}
    opts = cfg["mote"]
    for key in _KERNEL_KEYS:
        if cfg.get(key) is None:
            cfg[key] = False
    template = load_template(opts.get("template") or "aligncot")
    special = cfg.get("special_tokens") or {}
    extra = list(special.get("additional_special_tokens") or [])
    extra += [m for m in template.markers if m not in extra]
    special["additional_special_tokens"] = extra
    cfg["special_tokens"] = special
    _refuse_merging_routed_adapter(cfg)
    if opts.get("validate_files", True):
        validate_dataset_files(cfg, template)


def _refuse_merging_routed_adapter(cfg: dict) -> None:
    lora_dir = cfg.get("lora_model_dir")
    exported = lora_dir and (Path(lora_dir) / "mote_export.json").exists()
    if cfg.get("merge_lora") and exported and not cfg.get("merge_method"):
        # Axolotl's default memory-efficient merge folds only LoRA A/B into the base
        # shards: it would drop the trained marker rows and the vocabulary resize.
        cfg["merge_method"] = "legacy"
        LOG.info(
            "MoTE: merging exported stage adapter %s with merge_method: legacy "
            "(keeps the marker token rows)",
            lora_dir,
        )
    if (
        cfg.get("merge_lora")
        and lora_dir
        and (Path(lora_dir) / MOTE_CONFIG_NAME).exists()
    ):
        raise ValueError(
            f"{lora_dir} is a routed MoTE adapter: merging it would sum every stage "
            "expert into one LoRA. Export per-stage adapters first with `axolotl-mote "
            f"export --adapter {lora_dir} --out <dir>`, then merge one of them."
        )


def validate_dataset_files(cfg: dict, template) -> None:
    """Pre-flight check of local ``.jsonl`` datasets of type ``axolotl_mote.*``."""
    from axolotl_mote.data.schema import validate_jsonl

    for group in ("datasets", "test_datasets"):
        for ds in cfg.get(group) or []:
            if not isinstance(ds, dict) or not str(ds.get("type", "")).startswith(
                "axolotl_mote."
            ):
                continue
            path = Path(str(ds.get("path", "")))
            files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
            for file in files:
                if file.suffix == ".jsonl" and file.is_file():
                    counts = validate_jsonl(file, template)
                    LOG.info("MoTE: %s passed the record check: %s", file, counts)


def seed_model_init(cfg: Any) -> None:
    """``pre_model_load``: make the marker-row init and the expert init reproducible.

    The embedding resize and PEFT's LoRA init draw from the global RNG; whatever ran
    before (data preparation or not) would otherwise change them between two runs with
    the same seed, e.g. between a run and its resumption.
    """
    from transformers import set_seed

    from axolotl_mote.runtime import mote_options, resolve_seed

    set_seed(resolve_seed(cfg, mote_options(cfg)))


def prepare_marker_rows(cfg: Any, model: Any) -> dict[str, Any]:
    """``pre_lora_load``: initialise new marker rows, then make them trainable.

    Returns the LoRA config kwargs (``trainable_token_indices``). Nothing to do when a
    trained adapter is loaded: its saved rows replace the base model's.
    """
    from axolotl_mote.runtime import mote_options

    opts = mote_options(cfg)
    if cfg.get("lora_model_dir") or (
        opts["marker_init"] != "describe" and not opts["train_marker_embeddings"]
    ):
        return {}
    from axolotl.loaders import load_tokenizer

    tokenizer = load_tokenizer(cfg)  # Axolotl's, markers included
    init_new_marker_rows(cfg, model, tokenizer)
    return marker_trainable_token_indices(cfg, model, tokenizer)


def marker_trainable_token_indices(
    cfg: Any, model: Any, tokenizer: Any
) -> dict[str, Any]:
    """PEFT ``trainable_token_indices`` for the marker rows.

    Only the marker rows of the input embedding (and of an untied ``lm_head``) train, so
    the model learns to read and emit stage markers without unfreezing the vocabulary.
    """
    from axolotl_mote.runtime import mote_options

    if not mote_options(cfg)["train_marker_embeddings"]:
        return {}
    from axolotl_mote.tokens import marker_ids

    ids = sorted(marker_ids(tokenizer, load_template(mote_options(cfg)["template"])))
    names = {id(m): n.split(".")[-1] for n, m in model.named_modules() if n}
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    targets = {names[id(emb)]: ids}
    if out is not None and out.weight is not emb.weight and id(out) in names:
        targets[names[id(out)]] = ids
    user = cfg.get("peft_trainable_token_indices")
    if isinstance(user, list):
        targets[names[id(emb)]] = sorted(set(user) | set(ids))
    elif isinstance(user, dict):
        for key, values in user.items():
            targets[key] = sorted(set(values) | set(targets.get(key, [])))
    return {"trainable_token_indices": targets}


def init_new_marker_rows(cfg: Any, model: Any, tokenizer: Any) -> dict[str, str]:
    """Describe-initialise the rows of markers new to the tokenizer.

    Only markers the base tokenizer lacks are touched (their rows come from the resize,
    or are unused padding rows of a padded vocabulary); existing rows, e.g. of a model
    already trained with these markers, keep their values. Off for
    ``marker_init: resize``.
    """
    from axolotl_mote.runtime import mote_options

    opts = mote_options(cfg)
    if opts["marker_init"] != "describe":
        return {}
    from transformers import AutoTokenizer

    from axolotl_mote.tokens import init_marker_rows

    template = load_template(opts["template"])
    source = (
        cfg.get("tokenizer_config") or cfg.get("base_model_config") or cfg.base_model
    )
    base_vocab = AutoTokenizer.from_pretrained(
        source, trust_remote_code=bool(cfg.get("trust_remote_code"))
    ).get_vocab()
    new = [m for m in template.markers if m not in base_vocab]
    done = init_marker_rows(model, tokenizer, template, new)
    if done:
        LOG.info(
            "MoTE: initialised %d new marker rows from their stage words: %s",
            len(done),
            done,
        )
    return done


def attach_to_axolotl_model(cfg: Any, model: Any) -> None:
    """``post_lora_load``: route the PEFT LoRA layers Axolotl just built or loaded."""
    from peft import PeftModel

    from axolotl_mote.runtime import build_mote_config
    from axolotl_mote.tuner.config import MoteConfig
    from axolotl_mote.tuner.model import attach_mote

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"MoTE expected a PEFT model after LoRA loading, got {type(model).__name__}; "
            "set `adapter: lora`"
        )
    config = build_mote_config(cfg)
    lora_dir = cfg.get("lora_model_dir")
    if lora_dir and (Path(lora_dir) / "mote_export.json").exists():
        # an exported per-stage adapter (axolotl-mote export) is a plain LoRA: no routing,
        # so `axolotl merge-lora` / `inference` work on it with the same config
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
    state = attach_mote(model, config)
    state.mote_config = config  # generate_chains reads the template from here
    if loading_for_inference(cfg):  # `axolotl inference`: route by the emitted markers
        from axolotl.loaders import load_tokenizer

        from axolotl_mote.generation import install_router

        install_router(model, load_tokenizer(cfg), config.prompt_template())
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        LOG.info(
            "MoTE: %d experts (%s)%s, rank %d each, alpha %.2f, prompt routing %s",
            len(config.stage_names),
            ", ".join(config.stage_names),
            " + shared" if config.shared_expert else "",
            config.expert_rank,
            config.alpha,
            config.prompt_routing,
        )
    del state


def loading_for_inference(cfg: Any) -> bool:
    """Whether Axolotl is loading the model for ``axolotl inference`` (or ``chat``).

    The plugin hooks do not receive the loader's ``inference`` flag and the validated
    config drops an ``inference`` key, so read it from the ``ModelLoader`` that is
    calling the hook (one stack walk per model load).
    """
    import sys

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
