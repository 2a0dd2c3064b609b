"""A serving bundle: what vLLM or SGLang need to serve a MoTE adapter, in one folder.

No inference server routes LoRA per token, so a served MoTE model switches adapters per
stage (``client.py``). That needs::

    DIR/base/               the base model with the marker tokens in its tokenizer and
                            the trained marker rows in its embeddings (nothing else
                            changed): servers load LoRA A/B tensors, not embedding rows
    DIR/adapters/<stage>/   one LoRA-only adapter per trained stage: that stage's
                            expert and the shared expert folded, rank 2r (export.py)
    DIR/adapters/prompt/    the prompt's routing, for choosing the first stage: every
                            step expert at alpha / E plus the shared expert (the
                            expected value of the random prompt expert), rank (E+1) r
    DIR/manifest.json       stages, markers and their token ids, which adapter serves
                            which stage, the chat format, the ranks
    DIR/README.md           the exact vLLM and SGLang command lines

Each adapter loads in plain PEFT on ``DIR/base``; tests check that base + stage adapter
gives MoTE's logits for that stage's tokens to 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from axolotl_mote.serving.engine import PROMPT_ADAPTER

MANIFEST_NAME = "manifest.json"
#: vLLM's accepted --max-lora-rank values
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def write_serving_bundle(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base_model: str | Path | None = None,
    dtype: str = "auto",
) -> Path:
    """Write the bundle for ``adapter_dir`` into ``out_dir``; returns the manifest
    path."""
    from axolotl_mote.export import export_stage_adapters
    from axolotl_mote.tuner.config import MoteConfig

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    config = MoteConfig.load(adapter_dir)
    template = config.prompt_template()
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_model = base_model or peft_config.get("base_model_name_or_path")
    if not base_model:
        raise ValueError(
            f"{adapter_dir}/adapter_config.json names no base model; pass base_model"
        )
    tokenizer = write_base_with_markers(adapter_dir, base_model, out / "base", dtype)
    stages = export_stage_adapters(adapter_dir, out / "adapters", lora_only=True)
    prompt_rank = export_prompt_adapter(adapter_dir, out / "adapters" / PROMPT_ADAPTER)
    stage_rank = json.loads(
        (next(iter(stages.values())) / "adapter_config.json").read_text()
    )["r"]
    trained = template.trained_stages
    manifest = {
        "format_version": 1,
        "template": template.name,
        **stage_manifest(template, tokenizer),
        "chat_template": template.chat_format.jinja or tokenizer.chat_template,
        "special_tokens": {
            k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token")
        },
        "eos_token_id": tokenizer.eos_token_id,
        "stage_rank": stage_rank,
        "prompt_rank": prompt_rank,
        "max_lora_rank": next(
            r for r in VLLM_RANKS if r >= max(stage_rank, prompt_rank)
        ),
        "max_loras": len(trained) + 1,
        "source_adapter": str(adapter_dir),
    }
    path = out / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(serving_readme(manifest, out))
    return path


def write_base_with_markers(
    adapter_dir: Path, base_model: str | Path, out: Path, dtype: str = "auto"
):
    """The base model resized to the adapter's vocabulary, with its trained rows.

    The rows come from the adapter's trainable tokens (the marker rows, and any row the
    resize added); every other weight is the base model's. Returns the tokenizer.
    """
    import torch
    from safetensors.torch import load_file

    from axolotl_mote.loading import load_base_model, load_mote_tokenizer
    from axolotl_mote.tuner.config import MoteConfig

    config = MoteConfig.load(adapter_dir)
    tokenizer = load_mote_tokenizer(adapter_dir, base_model)
    model = load_base_model(base_model, dtype=dtype, device="cpu")
    rows = config.vocab_size or len(tokenizer)
    if model.get_input_embeddings().num_embeddings < rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    indices: dict[str, list[int]] = peft_config.get("trainable_token_indices") or {}
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, delta in tensors.items():
            if "trainable_tokens_delta" not in key:
                continue
            path = key.removeprefix("base_model.model.").split(".token_adapter")[0]
            name = path.split(".")[-1]
            ids = indices.get(name) if isinstance(indices, dict) else indices
            module = modules.get(path)
            if module is None or ids is None:
                raise ValueError(f"{key}: no module {path} with token indices")
            module.weight[torch.tensor(ids)] = delta.to(module.weight.dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return tokenizer


def export_prompt_adapter(adapter_dir: Path, out: Path) -> int:
    """The expected prompt routing as one plain LoRA; returns its rank (E + 1) r.

    ``B' A' = s · (sum_k w/E · B_k A_k + (1 - alpha) · B_sh A_sh)``, w = alpha with a
    shared expert (else 1): every block of the MoTE layer, weighted.
    """
    from safetensors.torch import load_file, save_file

    from axolotl_mote.export import layer_scaling
    from axolotl_mote.tuner.config import ROUTED_ADAPTER_KEY, MoteConfig

    config = MoteConfig.load(adapter_dir)
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    n = config.n_blocks
    step_weight = (config.alpha if config.shared_expert else 1.0) / config.num_experts
    weights = [step_weight] * config.num_experts
    if config.shared_expert:
        weights.append(1.0 - config.alpha)
    out_tensors: dict[str, Any] = {}
    rank = 0
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        a, b = tensors[key], tensors[module + ".lora_B.weight"]  # [R, in], [out, R]
        r = a.shape[0] // n
        scaling = layer_scaling(
            peft_config, module.removeprefix("base_model.model."), a.shape[0]
        )
        scale = b.new_tensor([w * scaling for w in weights for _ in range(r)])
        out_tensors[key] = a.contiguous()
        out_tensors[module + ".lora_B.weight"] = (b.float() * scale.float()).to(b.dtype)
        rank = max(rank, a.shape[0])
    out.mkdir(parents=True, exist_ok=True)
    save_file(out_tensors, str(out / "adapter_model.safetensors"), {"format": "pt"})
    stage_config = dict(peft_config)
    stage_config.pop(ROUTED_ADAPTER_KEY, None)  # a plain LoRA: loads without a warning
    stage_config.update(
        r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
        inference_mode=True, trainable_token_indices=None, modules_to_save=None,
    )  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(stage_config, indent=2) + "\n")
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (adapter_dir / file).is_file():
            shutil.copy2(adapter_dir / file, out / file)
    return rank


def serving_readme(manifest: dict[str, Any], out: Path) -> str:
    """The README of a bundle: server command lines and how the client uses them."""
    base = out / "base"
    names = [s["adapter"] for s in manifest["stages"]] + [manifest["prompt_adapter"]]
    vllm_modules = " ".join(f"{n}={out / 'adapters' / n}" for n in names)
    rank, loras = manifest["max_lora_rank"], manifest["max_loras"]
    return f"""# Serving bundle for {manifest["source_adapter"]}

Written by `axolotl-mote export --serving`. The base model in `base/` holds the marker
tokens and their trained rows; `adapters/` holds one LoRA per stage (rank
{manifest["stage_rank"]}) and `prompt` (rank {manifest["prompt_rank"]}).

## vLLM

```bash
vllm serve {base} --enable-lora --max-lora-rank {rank} --max-loras {loras} \\
    --lora-modules {vllm_modules}
```

## SGLang

```bash
python -m sglang.launch_server --model-path {base} --enable-lora \\
    --max-lora-rank {rank} --max-loras-per-batch {loras} \\
    --lora-paths {vllm_modules}
```

## Generating

```bash
axolotl-mote client --bundle {out} --url http://localhost:8000/v1 \\
    --prompt "How do I pick a lock?"            # SGLang: --adapter-field lora_path
```

The client renders the prompt with the chat format, lets the `prompt` adapter choose
the first stage (or follows `--plan`), generates each stage with its own adapter until
the stage's end marker, then continues. This approximates MoTE: the server recomputes
the earlier stages' tokens with the current stage's adapter (docs/serving.md gives the
measured fidelity). For the exact model use `axolotl-mote serve`.
"""


def stage_manifest(template: Any, tokenizer: Any) -> dict[str, Any]:
    """What the stage client reads of a bundle's manifest: the template, the answer
    stage, the prompt adapter and each trained stage's markers and adapter. The bundle
    writes it (with more); a client on an unexported adapter builds it the same way."""
    ids = {m: tokenizer.convert_tokens_to_ids(m) for m in template.markers}
    return {
        "template_data": template.model_dump(mode="json", exclude={"source"}),
        "answer_stage": template.answer_stage,
        "prompt_adapter": PROMPT_ADAPTER,
        "stages": [
            {
                "name": s.name,
                "key": s.key,
                "start": s.start,
                "end": s.end,
                "start_id": ids[s.start],
                "end_id": ids[s.end],
                "skippable": s.skippable,
                "adapter": s.name,
            }
            for s in template.trained_stages
        ],
    }
