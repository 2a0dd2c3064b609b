"""Run the six arms over several seeds and collect the held-out measurements.

Each (arm, seed) trains with the real ``axolotl train`` in this process, is scored on
the held-out split, and its result is written at once to
``<work_dir>/results/<arm>-<seed>.json``, so an interrupted run resumes where it
stopped (``resume=True``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.ablation.arms import (
    ARMS,
    Budget,
    arm_config,
    is_mote,
    train_arm,
    write_data,
)
from benchmarks.ablation.task import TaskSpec, build_model, make_split


@dataclass(frozen=True)
class Experiment:
    """Everything that defines one ablation run."""

    spec: TaskSpec = field(default_factory=TaskSpec)
    budget: Budget = field(default_factory=Budget)
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    hidden_size: int = 64
    num_layers: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Experiment()
QUICK = Experiment(
    spec=TaskSpec(n_train=32, n_eval=8),
    budget=Budget(steps=3, micro_batch_size=4, warmup_steps=0),
    seeds=(0,),
)


def quiet_environment() -> None:
    """Offline, no telemetry, one CPU thread (reproducible, and far faster than two
    threads on a shared machine)."""
    from axolotl_mote.constants import OFFLINE_ENV

    for key, value in {
        **OFFLINE_ENV,
        "MPLBACKEND": "Agg",
    }.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(1)


def lora_parameters(adapter_dir: Path) -> int:
    """Number of trained adapter parameters saved in ``adapter_model.safetensors``."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        for key in handle.keys():
            n = 1
            for size in handle.get_slice(key).get_shape():
                n *= int(size)
            total += n
    return total


def run_one(
    exp: Experiment, arm: str, seed: int, work_dir: Path, model_dir: Path
) -> dict:
    """Train and score one arm for one seed."""
    from benchmarks.ablation.scoring import score_arm

    train, held_out = make_split(exp.spec, seed)
    seed_dir = work_dir / f"seed{seed}"
    data = write_data(train, seed_dir / "data")
    run_dir = seed_dir / arm
    cfg = arm_config(arm, exp.budget, model_dir, data, run_dir, seed)
    start = time.perf_counter()
    adapter = train_arm(cfg, run_dir)
    trained = time.perf_counter()
    scores = score_arm(model_dir, adapter, is_mote(arm), held_out)
    return {
        "arm": arm,
        "seed": seed,
        "adapter_parameters": lora_parameters(adapter),
        "train_seconds": round(trained - start, 1),
        "score_seconds": round(time.perf_counter() - trained, 1),
        **scores,
    }


def run(exp: Experiment, work_dir: Path, resume: bool = True, log=print) -> list[dict]:
    """All arms x seeds; returns one result dict per run."""
    quiet_environment()
    work_dir = Path(work_dir)
    (work_dir / "results").mkdir(parents=True, exist_ok=True)
    model_dir = build_model(
        work_dir / "model",
        exp.spec,
        hidden_size=exp.hidden_size,
        num_layers=exp.num_layers,
    )
    stamp = json.dumps(exp.to_dict(), sort_keys=True)
    results = []
    for seed in exp.seeds:
        for arm in exp.arms:
            path = work_dir / "results" / f"{arm}-{seed}.json"
            if resume and path.exists():
                saved = json.loads(path.read_text())
                if saved.get("experiment") == stamp:
                    results.append(saved["result"])
                    log(f"[ablation] {arm} seed {seed}: reused {path}")
                    continue
            log(f"[ablation] {arm} seed {seed}: training")
            result = run_one(exp, arm, seed, work_dir, model_dir)
            saved = {"experiment": stamp, "result": result}
            path.write_text(json.dumps(saved, indent=1))
            log(f"[ablation] {arm} seed {seed}: {json.dumps(result)}")
            results.append(result)
    return results
