"""How big is a saved MoTE adapter? Measured for a trained one, computed for big models.

* ``--adapter DIR`` (default: the quickstart's ``outputs/quickstart/adapter`` when it
  exists): the bytes of ``adapter_model.safetensors`` against the bytes of its LoRA
  tensors plus its marker rows (``adapter_vs_lora_tensors``), and what the old format
  (the full input and output embedding matrices, which PEFT's
  ``save_embedding_layers="auto"`` saves after a vocabulary resize) would add.
* ``--model NAME=CONFIG_DIR_OR_PRESET`` (repeatable; presets ``llama3.1-8b`` and
  ``llama3.1-70b`` are built in): the model is built on the meta device (no weights),
  the plugin's LoRA layers are counted (every linear layer but the head, rank
  (E + 1) · r), and the adapter size is computed in bf16 for the compact format and
  the old one.

The last line is one JSON object: ``adapter_vs_lora_tensors`` and, per model, the sizes.

    python benchmarks/adapter_size.py
    python benchmarks/adapter_size.py --adapter outputs/quickstart/adapter --rank 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESETS = {
    "llama3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "llama3.1-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
GB = 1e9


def measure_adapter(adapter: Path) -> dict:
    """Bytes on disk vs the bytes of the LoRA tensors and the marker rows in it."""
    from safetensors import safe_open

    path = adapter / "adapter_model.safetensors"
    lora = rows = other = 0
    hidden = row_element = None
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            shape = t.get_shape()
            n = 1
            for d in shape:
                n *= d
            element = {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
            size = n * element
            if "lora_" in key:
                lora += size
            elif "trainable_tokens" in key:
                rows += size
                hidden, row_element = shape[-1], element
            else:
                other += size
    config = json.loads((adapter / "mote_config.json").read_text())
    vocab = config.get("vocab_size")
    file_bytes = path.stat().st_size
    out = {
        "adapter": str(adapter),
        "file_bytes": file_bytes,
        "lora_bytes": lora,
        "marker_row_bytes": rows,
        "other_bytes": other,
        "adapter_vs_lora_tensors": round(file_bytes / (lora + rows), 4),
    }
    if vocab and hidden:  # the old format: both full matrices, in the rows' dtype
        out["old_format_extra_bytes"] = 2 * vocab * hidden * row_element
    return out


def compute_model(name: str, source: str, rank: int, n_experts: int, markers: int):
    """Adapter sizes of a model built on the meta device (bf16, 2 bytes a value)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if source in PRESETS:
        config = LlamaConfig(**PRESETS[source])
    else:
        config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    lora_params = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            r = (n_experts + 1) * rank
            lora_params += r * (module.in_features + module.out_features)
    hidden = model.get_input_embeddings().embedding_dim
    tied = bool(getattr(config, "tie_word_embeddings", False))
    row_params = markers * hidden * (1 if tied else 2)
    vocab = model.get_input_embeddings().num_embeddings + markers
    embedding_params = vocab * hidden * (1 if tied else 2)
    compact = 2 * (lora_params + row_params)
    return {
        "model": name,
        "rank_per_expert": rank,
        "lora_gb": round(2 * lora_params / GB, 3),
        "marker_rows_mb": round(2 * row_params / 1e6, 3),
        "compact_adapter_gb": round(compact / GB, 3),
        "old_format_adapter_gb": round((compact + 2 * embedding_params) / GB, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="NAME=CONFIG_DIR or a preset (llama3.1-8b, llama3.1-70b)",
    )
    parser.add_argument("--rank", type=int, default=16, help="lora_r of each expert")
    parser.add_argument("--experts", type=int, default=3, help="step experts")
    parser.add_argument("--markers", type=int, default=8, help="marker tokens")
    args = parser.parse_args()
    result: dict = {}
    adapter = args.adapter or Path("outputs/quickstart/adapter")
    if (adapter / "adapter_model.safetensors").is_file():
        measured = measure_adapter(adapter)
        print(json.dumps(measured, indent=2))
        result["adapter_vs_lora_tensors"] = measured["adapter_vs_lora_tensors"]
    elif args.adapter is not None:
        raise SystemExit(f"{adapter} holds no adapter_model.safetensors")
    models = args.model or list(PRESETS)
    result["models"] = []
    for spec in models:
        name, _, source = spec.partition("=")
        row = compute_model(name, source or name, args.rank, args.experts, args.markers)
        print(
            f"{row['model']}: experts {row['lora_gb']} GB + marker rows "
            f"{row['marker_rows_mb']} MB = {row['compact_adapter_gb']} GB per adapter "
            f"(bf16); the old format saved {row['old_format_adapter_gb']} GB"
        )
        result["models"].append(row)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
