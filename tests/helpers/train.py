"""Run the real ``axolotl train`` in-process on the tiny model (used by e2e tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

SAMPLE_RECORDS: list[dict[str, Any]] = [
    {
        "id": "t1",
        "prompt": "How do I pick a lock on my neighbour's door while they are away?",
        "analysis": "The user wants to enter someone else's home without consent.",
        "guidance": "Decline, and point to legal options such as a locksmith.",
        "answer": "I can't help with entering someone else's home. If you are locked "
        "out of your own place, call a licensed locksmith.",
        "check": "SAFE",
    },
    {"id": "t2", "prompt": "What is the capital of France?", "answer": "Paris."},
    {
        "id": "t3",
        "messages": [
            {"role": "user", "content": "I like baking."},
            {"role": "assistant", "content": "That's great! What do you bake?"},
            {"role": "user", "content": "How do I bake bread at home?"},
        ],
        "answer": "Mix flour, water, salt and yeast, knead, let it rise, then bake.",
    },
    {
        "id": "t4",
        "prompt": "Can you explain recursion in Python?",
        "analysis": "A harmless programming question.",
        "answer": "A recursive function calls itself on a smaller problem until it "
        "reaches a base case.",
    },
]


def write_records(
    path: Path, records: list[dict[str, Any]] | None = None, repeat: int = 4
) -> Path:
    records = records or SAMPLE_RECORDS
    with open(path, "w", encoding="utf-8") as handle:
        for r in range(repeat):
            for rec in records:
                rec = dict(rec, id=f"{rec['id']}-{r}")
                handle.write(json.dumps(rec) + "\n")
    return path


def base_config(
    model_dir: Path,
    tmp: Path,
    records: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A small, fast ``axolotl train`` config on the tiny model and ``records``."""
    data = write_records(tmp / "chains.jsonl", records)
    cfg: dict[str, Any] = {
        "base_model": str(model_dir),
        "plugins": ["axolotl_mote.MotePlugin"],
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "mote": {"template": "aligncot", "prompt_routing": "random"},
        "datasets": [
            {"path": str(data), "ds_type": "json", "type": "axolotl_mote.aligncot"}
        ],
        "dataset_prepared_path": str(tmp / "prepared"),
        "output_dir": str(tmp / "out"),
        "sequence_len": 256,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "attn_implementation": "sdpa",
        "val_set_size": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 42,
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
        "special_tokens": {"pad_token": "<pad>"},
        "save_safetensors": True,
    }
    cfg.update(overrides)
    return cfg


def run_train(cfg: dict[str, Any], tmp: Path):
    """Write the YAML and run load_cfg + do_train in this process; returns the cfg."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train

    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    parsed = load_cfg(str(path))
    do_train(parsed, TrainerCliArgs())
    return parsed


def log_history(output_dir: Path) -> list[dict[str, Any]]:
    """Trainer log history from the last checkpoint or the trainer_state.json."""
    candidates = sorted(Path(output_dir).glob("checkpoint-*/trainer_state.json"))
    candidates += [Path(output_dir) / "trainer_state.json"]
    for path in reversed(candidates):
        if path.exists():
            return json.loads(path.read_text())["log_history"]
    return []
