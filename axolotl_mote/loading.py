"""Loading a trained MoTE adapter outside Axolotl: plain PEFT plus one attach call.

>>> model, tokenizer = load_mote_model("base/model", "outputs/mote")   # doctest: +SKIP

is ``PeftModel.from_pretrained`` on the resized base model, followed by
``attach_mote`` with the adapter's own ``mote_config.json``. Inside Axolotl the same
happens through ``lora_model_dir`` (the plugin attaches in ``post_lora_load``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from axolotl_mote.constants import MOTE_CONFIG_NAME


def load_mote_tokenizer(adapter_dir: str | Path, base_model: str | Path | None = None):
    """The tokenizer saved with the adapter (markers included), else base + markers."""
    from transformers import AutoTokenizer

    from axolotl_mote.tokens import add_marker_tokens
    from axolotl_mote.tuner.config import MoteConfig

    adapter_dir = Path(adapter_dir)
    source = (
        adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_model
    )
    if source is None:
        raise ValueError(
            f"{adapter_dir} has no tokenizer; pass base_model so the markers can be added"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    add_marker_tokens(tokenizer, MoteConfig.load(adapter_dir).prompt_template())
    return tokenizer


def load_mote_model(
    base_model: str | Path | Any,
    adapter_dir: str | Path,
    *,
    tokenizer: Any = None,
    is_trainable: bool = False,
    torch_dtype: Any = None,
):
    """Load base model + MoTE adapter with routing attached; returns (model, tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from axolotl_mote.tuner.config import MoteConfig
    from axolotl_mote.tuner.model import attach_mote

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / MOTE_CONFIG_NAME).exists():
        raise FileNotFoundError(
            f"{adapter_dir} has no {MOTE_CONFIG_NAME}: it is not a MoTE adapter (for an "
            "exported per-stage adapter use plain PeftModel.from_pretrained)"
        )
    config = MoteConfig.load(adapter_dir)
    base_path = base_model if isinstance(base_model, (str, Path)) else None
    if tokenizer is None:
        tokenizer = load_mote_tokenizer(adapter_dir, base_path)
    if base_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            base_path, torch_dtype=torch_dtype or torch.float32
        )
    else:
        model = base_model
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(
        model, str(adapter_dir), is_trainable=is_trainable
    )
    attach_mote(model, config)
    if not is_trainable:
        model.eval()
    return model, tokenizer
