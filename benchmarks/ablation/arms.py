"""The six arms as Axolotl configs, and training one arm with the real
``axolotl train``.

Every arm gets the same YAML apart from the keys that define it: same base model, data
(the same chains, the same token ids and label positions), steps, batch size, learning
rate schedule, seed and LoRA targets (every linear layer, ``lora_alpha = 2 * lora_r``).

* ``lora_r`` / ``lora_4r``: **no plugin.** Axolotl's own ``type: chat_template`` over
  the same chains written as one assistant message with the markers as text; labels
  on the whole assistant turn: the same token ids and labels the plugin produces
  (checked by ``tests/evaluation/test_ablation.py``). Rank 4r equals MoTE's parameter
  count (3 step experts + the shared one, each rank r).
* ``mote``: the plugin with the paper's settings: alpha 0.5, shared expert, random
  prompt routing, step skipping with p = ``skip_prob``.
* ``mote_noskip`` / ``mote_noshared`` / ``mote_noboth``: ``step_skip_prob: 0`` and/or
  ``shared_expert: false``.

All MoTE arms set ``train_marker_embeddings: false``: the task tokenizer already has the
markers, so every arm trains LoRA weights only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.ablation.task import chat_record, write_jsonl

ARMS = ("lora_r", "lora_4r", "mote", "mote_noskip", "mote_noshared", "mote_noboth")
LABELS = {
    "lora_r": "single LoRA, rank r",
    "lora_4r": "single LoRA, rank 4r",
    "mote": "MoTE",
    "mote_noskip": "MoTE - step skipping",
    "mote_noshared": "MoTE - shared expert",
    "mote_noboth": "MoTE - both",
}
_MARKERS = {
    "analysis": ("<|analysis|>", "<|/analysis|>"),
    "guidance": ("<|guidance|>", "<|/guidance|>"),
    "answer": ("<|response|>", "<|/response|>"),
}


@dataclass(frozen=True)
class Budget:
    """What every arm gets: identical for all six."""

    steps: int = 300
    micro_batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 15
    scheduler: str = "cosine"
    lora_r: int = 4
    skip_prob: float = 0.3


def is_mote(arm: str) -> bool:
    return arm.startswith("mote")


def write_data(records: list[dict], data_dir: Path) -> dict[str, Path]:
    """The train chains in both formats (same chains, same order)."""
    return {
        "chains": write_jsonl(data_dir / "chains.jsonl", records),
        "chat": write_jsonl(
            data_dir / "chat.jsonl", [chat_record(r, _MARKERS) for r in records]
        ),
    }


def arm_config(
    arm: str,
    budget: Budget,
    model_dir: Path,
    data: dict[str, Path],
    run_dir: Path,
    seed: int,
) -> dict[str, Any]:
    """The Axolotl config of one arm (a plain dict; ``train_arm`` writes it as YAML)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")
    rank = budget.lora_r * (4 if arm == "lora_4r" else 1)
    cfg: dict[str, Any] = {
        "base_model": str(model_dir),
        "adapter": "lora",
        "lora_r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "lora_mlp_kernel": False,  # Axolotl's fused kernels are GPU-only and bypass
        "lora_qkv_kernel": False,  # MoTE's routing: off in every arm
        "lora_o_kernel": False,
        "dataset_prepared_path": str(run_dir / "prepared"),
        "output_dir": str(run_dir / "out"),
        "sequence_len": 64,
        "sample_packing": False,
        "micro_batch_size": budget.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": budget.steps,
        "num_epochs": 1000,
        "learning_rate": budget.learning_rate,
        "optimizer": "adamw_torch",
        "lr_scheduler": budget.scheduler,
        "warmup_steps": budget.warmup_steps,
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "attn_implementation": "sdpa",
        "val_set_size": 0,
        "logging_steps": 10,
        "save_strategy": "no",
        "seed": seed,
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
        "special_tokens": {"pad_token": "<pad>"},
        "save_safetensors": True,
    }
    if not is_mote(arm):
        cfg["chat_template"] = "tokenizer_default"
        cfg["datasets"] = [
            {
                "path": str(data["chat"]),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "roles_to_train": ["assistant"],
                "train_on_eos": "turn",
            }
        ]
        return cfg
    cfg["plugins"] = ["axolotl_mote.MotePlugin"]
    cfg["datasets"] = [
        {
            "path": str(data["chains"]),
            "ds_type": "json",
            "type": "axolotl_mote.aligncot",
        }
    ]
    cfg["mote"] = {
        "template": "aligncot",
        "alpha": 0.5,
        "prompt_routing": "random",
        "shared_expert": arm not in ("mote_noshared", "mote_noboth"),
        "step_skip_prob": (
            0.0 if arm in ("mote_noskip", "mote_noboth") else budget.skip_prob
        ),
        "train_marker_embeddings": False,
        "log_stage_metrics": True,
    }
    return cfg


def train_arm(cfg: dict[str, Any], run_dir: Path) -> Path:
    """``axolotl train`` in this process (load_cfg + do_train); returns the adapter
    directory."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train
    from axolotl.integrations.base import PluginManager

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    from transformers import set_seed

    manager = PluginManager.get_instance()  # process-wide: one arm's plugins only
    manager.plugins.clear()
    # Axolotl itself does not seed before PEFT initialises the LoRA weights (the MoTE
    # plugin does, in pre_model_load); seed here so every arm's init depends on its
    # seed alone, not on what ran earlier in this process.
    set_seed(int(cfg["seed"]))
    try:
        do_train(load_cfg(str(path)), TrainerCliArgs())
    finally:
        manager.plugins.clear()
    return Path(cfg["output_dir"])
