"""Export a MoTE adapter as one plain PEFT LoRA per stage, for serving.

Inside one stage every token of a MoTE layer computes

    y = W0·x + s·(α·B_k A_k + (1 − α)·B_sh A_sh)·x        (s: PEFT scaling of the layer)

which is one LoRA of rank 2r with the blocks stacked and α and s folded into B::

    A' = [ A_k  ;  A_sh ]                 [2r, in]
    B' = [ s·α·B_k | s·(1 − α)·B_sh ]     [out, 2r]        lora_alpha' = r' → scaling 1

Exact (up to one rounding of B in the adapter's dtype), uniform rank and alpha across
layers (per-layer ranks are zero-padded; no rank/alpha patterns, which vLLM ignores),
and computed from the saved tensors alone, so no model is loaded. Everything else in the
adapter (the marker rows of ``trainable_token_indices``, saved embeddings,
``modules_to_save``) is copied unchanged, with the tokenizer. The result loads with
``PeftModel.from_pretrained``, merges with ``axolotl merge-lora`` and serves with vLLM
multi-LoRA. It carries no ``mote_config.json``: it is not routed.

The one semantic difference: a server that switches adapters per request runs the
*whole* sequence — prompt and earlier stages included — through the adapter of the stage
it serves, whereas MoTE computed each earlier token with its own stage's expert.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from axolotl_mote.constants import EXPORT_INFO_NAME, MOTE_CONFIG_NAME
from axolotl_mote.tuner.config import CATCH_ALL_KEYS, ROUTED_ADAPTER_KEY

_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def layer_scaling(peft_config: dict[str, Any], module_key: str, rank: int) -> float:
    """PEFT's scaling of one layer: its (pattern-matched) alpha over r or sqrt(r).

    The catch-all key (``"|.*"``, or ``".*"`` in adapters saved by 0.1.0 development
    versions; ``MoteConfig.peft_kwargs``) is matched last, as when the adapter was
    created: PEFT writes adapter_config.json with sorted keys, which puts ``".*"`` first
    where it would shadow a user's more specific alpha pattern.
    """
    from peft.utils.other import get_pattern_key

    patterns = peft_config.get("alpha_pattern") or {}
    keys = [k for k in patterns if k not in CATCH_ALL_KEYS]
    keys += [k for k in patterns if k in CATCH_ALL_KEYS]
    alpha = patterns.get(get_pattern_key(keys, module_key), peft_config["lora_alpha"])
    if peft_config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


def fold_stage(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    stage: int,
    n_blocks: int,
    shared: bool,
    alpha: float,
    scaling: float,
    out_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage ``stage``'s expert (+ shared) of one layer as a plain LoRA of ``out_rank``.

    lora_a: [R, in], lora_b: [out, R] with R = n_blocks·r, blocks [e_0 .. e_{E-1},
    shared]. Returns A' [out_rank, in] and B' [out, out_rank], zero-padded beyond 2r
    (r).
    """
    r = lora_a.shape[0] // n_blocks
    a32, b32 = lora_a.float(), lora_b.float()
    blocks = [slice(stage * r, (stage + 1) * r)]
    weights = [alpha if shared else 1.0]
    if shared:
        blocks.append(slice((n_blocks - 1) * r, n_blocks * r))
        weights.append(1.0 - alpha)
    a = torch.cat([a32[s] for s in blocks], dim=0)  # [2r, in]
    b = torch.cat([b32[:, s] * (w * scaling) for s, w in zip(blocks, weights)], dim=1)
    pad = out_rank - a.shape[0]  # [out, 2r] -> zero-pad to the uniform rank
    if pad < 0:
        raise ValueError(f"out_rank {out_rank} < folded rank {a.shape[0]}")
    a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)  # [out_rank, in]
    b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)  # [out, out_rank]
    return a.to(lora_a.dtype), b.to(lora_b.dtype)


def export_stage_adapters(
    adapter_dir: str | Path,
    out_dir: str | Path,
    stages: list[str] | None = None,
    lora_only: bool = False,
    overwrite: bool = True,
) -> dict[str, Path]:
    """Write ``out_dir/<stage name>/`` plain PEFT LoRA adapters; returns name -> dir.

    ``lora_only`` drops everything but the LoRA A/B tensors (marker rows, saved
    embeddings, ``modules_to_save``), for servers that load nothing else; the served
    base model must then already hold the marker tokens' rows. ``overwrite=False``
    raises ``FileExistsError`` before writing anything when a stage's folder exists
    (the CLI's default; ``--force`` replaces).
    """
    from safetensors.torch import load_file, save_file

    from axolotl_mote.tuner.config import MoteConfig

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = MoteConfig.load(adapter_dir)
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} not found: export reads safetensors adapters (save with "
            "safe_serialization, Axolotl's default)"
        )
    if config.experts == "single":
        raise ValueError(
            f"{adapter_dir} was trained with mote.experts: single: one LoRA on every "
            "token, no per-stage experts to export. It is a plain PEFT LoRA: load it "
            "with PeftModel.from_pretrained (or merge_and_unload) as it is"
        )
    tensors = load_file(str(weights_path))
    _check_supported(peft_config, tensors)
    wanted = stages or config.stage_names
    index = {}
    for name in wanted:
        if name not in config.stage_names:
            template = config.prompt_template()
            name = template.stage(name).name  # accept record keys ("analysis")
            if name not in config.stage_names:
                raise ValueError(
                    f"stage {name!r} has no expert; trained: {config.stage_names}"
                )
        index[name] = config.stage_names.index(name)
    existing = [str(out_dir / name) for name in index if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "pass overwrite=True to replace"
        )
    modules = sorted({k[: -len(_A)] for k in tensors if k.endswith(_A)})
    if not modules:
        raise ValueError(f"{weights_path} holds no LoRA A/B weights")
    per_expert = {m: tensors[m + _A].shape[0] // config.n_blocks for m in modules}
    out_rank = max(per_expert.values()) * (2 if config.shared_expert else 1)
    written: dict[str, Path] = {}
    for name, stage in index.items():
        folded = (
            {}
            if lora_only
            else {
                k: v
                for k, v in tensors.items()
                if not (k.endswith(_A) or k.endswith(_B))
            }
        )
        for module in modules:
            key = module[len(_PREFIX) :] if module.startswith(_PREFIX) else module
            rank = tensors[module + _A].shape[0]
            a, b = fold_stage(
                tensors[module + _A],
                tensors[module + _B],
                stage,
                config.n_blocks,
                config.shared_expert,
                config.alpha,
                layer_scaling(peft_config, key, rank),
                out_rank,
            )
            folded[module + _A], folded[module + _B] = a.contiguous(), b.contiguous()
        target = out_dir / name
        target.mkdir(parents=True, exist_ok=True)
        if (target / MOTE_CONFIG_NAME).exists():
            (target / MOTE_CONFIG_NAME).unlink()
        save_file(
            folded, str(target / "adapter_model.safetensors"), metadata={"format": "pt"}
        )
        stage_config = dict(peft_config)
        stage_config.pop(ROUTED_ADAPTER_KEY, None)  # plain: loads without a warning
        stage_config.update(
            r=out_rank,
            lora_alpha=out_rank,
            use_rslora=False,
            rank_pattern={},
            alpha_pattern={},
            inference_mode=True,
        )
        if lora_only:
            stage_config.update(trainable_token_indices=None, modules_to_save=None)
        (target / "adapter_config.json").write_text(
            json.dumps(stage_config, indent=2) + "\n"
        )
        info = {
            "stage": name,
            "expert": stage,
            "source": str(adapter_dir),
            "alpha": config.alpha,
            "shared_expert": config.shared_expert,
            "rank": out_rank,
            "formula": (
                "B' A' = s·alpha·B_stage A_stage + s·(1 - alpha)·B_shared A_shared"
            ),
        }
        (target / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        for file in _TOKENIZER_FILES:
            if (adapter_dir / file).is_file():
                shutil.copy2(adapter_dir / file, target / file)
        written[name] = target
    return written


def _check_supported(
    peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"not a LoRA adapter: peft_type {peft_config.get('peft_type')}"
        )
    if peft_config.get("use_dora"):
        raise ValueError("DoRA adapters are not MoTE adapters; nothing to export")
    if any(k.endswith(".lora_B.bias") for k in tensors):
        raise ValueError("lora_bias is not supported by MoTE export")
    if any("lora_embedding_" in k for k in tensors):
        raise ValueError("LoRA on embeddings is not supported by MoTE export")
