"""Multi-process CPU runs of the real ``axolotl train`` (DDP / DeepSpeed) for tests.

One call = one ``torchrun --nproc_per_node N tests/distributed/launcher.py cfg.yml`` in
a subprocess, with the environment each mode needs (see ``MODES``)::

    model = tiny_model(tmp_path / "model")
    cfg = plain_lora_config(model, tmp_path, max_steps=2)
    run = run_distributed(cfg, tmp_path, mode="zero3")
    run.check()                      # rc 0, else raise with the log tail
    run.loss_history()               # [{'loss': ..., 'step': 1}, ...]
    run.output_dir / "adapter_model.safetensors"

Tests that add MoTE pass extra keys through ``plain_lora_config(..., **overrides)`` (for
example ``plugins``, ``mote``, ``datasets``); a ``None`` value deletes a key.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from axolotl_mote.constants import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "tests" / "distributed" / "launcher.py"
REPORT_ENV = "MOTE_LAUNCHER_REPORT_DIR"  # read by launcher.py

# Set for every run (offline, no telemetry: a missing AXOLOTL_DO_NOT_TRACK hangs at
# exit).
BASE_ENV = {
    **OFFLINE_ENV,
    "OMP_NUM_THREADS": "1",
    "DS_BUILD_OPS": "0",
}


@dataclass(frozen=True)
class Mode:
    """How one kind of multi-process CPU run is launched."""

    env: dict[str, str]
    unset: tuple[str, ...] = ()
    deepspeed: str | None = None  # shipped config name (axolotl_mote.deepspeed)


# DDP needs ACCELERATE_USE_CPU (gloo DDP); DeepSpeed needs DS_ACCELERATOR=cpu and must
# NOT see ACCELERATE_USE_CPU (ZeRO-2 would silently drop DeepSpeed, ZeRO-3 crash).
MODES: dict[str, Mode] = {
    "ddp": Mode(env={"ACCELERATE_USE_CPU": "true"}, unset=("DS_ACCELERATOR",)),
    "fsdp2": Mode(env={"ACCELERATE_USE_CPU": "true"}, unset=("DS_ACCELERATOR",)),
    **{
        name: Mode(
            env={"DS_ACCELERATOR": "cpu"}, unset=("ACCELERATE_USE_CPU",), deepspeed=name
        )
        for name in ("zero1", "zero2", "zero3")
    },
}


# --------------------------------------------------------------------------------------
# model and data


def tiny_model(out_dir: str | Path) -> Path:
    """The project's tiny Llama + ChatML BPE tokenizer (idempotent)."""
    from axolotl_mote.tiny import build_tiny_model

    return build_tiny_model(out_dir)


_TOPICS = [
    "bread",
    "recursion",
    "rivers",
    "chess",
    "tea",
    "bicycles",
    "stars",
    "gardens",
]
_VERBS = ["explain", "describe", "summarise", "compare"]


def write_chat_jsonl(path: str | Path, n: int = 32, seed: int = 0) -> Path:
    """``n`` short two-turn conversations in the ``messages`` (role/content) format."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            topic, verb = rng.choice(_TOPICS), rng.choice(_VERBS)
            answer = " ".join(
                f"{topic} fact {rng.randint(0, 99)} is "
                f"{rng.choice(['simple', 'useful', 'old'])}."
                for _ in range(rng.randint(2, 5))
            )
            messages = [
                {"role": "user", "content": f"Please {verb} {topic} ({i})."},
                {"role": "assistant", "content": answer},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def plain_lora_config(
    model_dir: str | Path, tmp: str | Path, **overrides: Any
) -> dict[str, Any]:
    """A plain (no MoTE) LoRA config for the tiny model; ``overrides`` win, None
    deletes."""
    tmp = Path(tmp).resolve()
    data = write_chat_jsonl(tmp / "chat.jsonl")
    cfg: dict[str, Any] = {
        "base_model": str(model_dir),
        "tokenizer_type": "AutoTokenizer",
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        # Axolotl auto-enables fused LoRA kernels for adapter: lora; they need
        # Triton/GPU and bypass module wrappers.
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "datasets": [
            {
                "path": str(data),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "chat_template": "tokenizer_default",
            }
        ],
        "dataset_prepared_path": str(tmp / "prepared"),
        "output_dir": str(tmp / "out"),
        "sequence_len": 128,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 2,
        "save_steps": 1,
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
        "seed": 42,
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
        "special_tokens": {"pad_token": "<pad>"},
        "save_safetensors": True,
    }
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


# --------------------------------------------------------------------------------------
# running


@dataclass
class DistributedRun:
    """The result of one multi-process run."""

    mode: str
    returncode: int
    seconds: float
    config_path: Path
    output_dir: Path
    log_path: Path
    report_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def check(self) -> DistributedRun:
        """Raise with the end of the log unless the run exited 0."""
        if self.returncode != 0:
            tail = "\n".join(self.log.splitlines()[-80:])
            raise AssertionError(
                f"{self.mode} run failed (rc={self.returncode}, {self.seconds:.0f}s); "
                f"log {self.log_path}:\n{tail}"
            )
        return self

    def checkpoints(self) -> list[Path]:
        found = self.output_dir.glob("checkpoint-*")
        return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))

    def trainer_state(self) -> dict[str, Any]:
        """trainer_state.json of the output dir, else of the last checkpoint."""
        candidates = [self.output_dir / "trainer_state.json"]
        candidates += [c / "trainer_state.json" for c in reversed(self.checkpoints())]
        for path in candidates:
            if path.is_file():
                return json.loads(path.read_text())
        raise FileNotFoundError(f"no trainer_state.json under {self.output_dir}")

    def loss_history(self) -> list[dict[str, Any]]:
        """The per-step training log entries (those with a ``loss``)."""
        return [e for e in self.trainer_state()["log_history"] if "loss" in e]

    def reports(self) -> list[dict[str, Any]]:
        """Per-rank facts written by the launcher after training (see launcher.py)."""
        paths = sorted(self.report_dir.glob("rank*.json"))
        return [json.loads(p.read_text()) for p in paths]

    def rank_lines(self, marker: str) -> list[str]:
        """Log lines containing ``marker`` (torchrun prefixes nothing: raw
        interleaving)."""
        return [line for line in self.log.splitlines() if marker in line]


def write_config(cfg: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop torchrun and its workers (they run in their own sessions, so no killpg)."""
    import psutil  # a DeepSpeed and accelerate dependency

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass


def run_distributed(
    cfg: dict[str, Any],
    tmp: str | Path,
    mode: str = "ddp",
    *,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    python: str | None = None,
) -> DistributedRun:
    """Run ``torchrun --nproc_per_node nproc launcher.py cfg.yml`` for ``mode``.

    ``mode`` is a key of ``MODES``. For DeepSpeed modes, ``cfg['deepspeed']`` is set to
    the shipped JSON unless the caller set one. ``env`` adds or overrides variables.
    ``python`` picks another interpreter (default: this one). Never raises on a failed
    run: call ``.check()``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    spec = MODES[mode]
    tmp = Path(tmp).resolve()
    cfg = dict(cfg)
    if spec.deepspeed and not cfg.get("deepspeed"):
        from axolotl_mote.deepspeed import deepspeed_config_path

        cfg["deepspeed"] = str(deepspeed_config_path(spec.deepspeed))
    config_path = write_config(cfg, tmp / f"{mode}.yml")

    run_env = {k: v for k, v in os.environ.items() if k not in spec.unset}
    run_env.update(BASE_ENV)
    run_env.update(spec.env)
    report_dir = tmp / f"{mode}_report"
    run_env[REPORT_ENV] = str(report_dir)
    run_env.update(env or {})
    run_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [run_env.get("PYTHONPATH")])]
    )
    python = python or sys.executable
    # the interpreter's own bin first, so any helper executables come from the same env
    run_env["PATH"] = os.pathsep.join(
        [str(Path(python).parent), run_env.get("PATH", "")]
    )

    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(LAUNCHER),
        str(config_path),
    ]
    log_path = tmp / f"{mode}.log"
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=run_env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            returncode = -9
            log.write(f"\n[helpers] stopped after {timeout}s\n")
    seconds = time.monotonic() - start
    return DistributedRun(
        mode=mode,
        returncode=returncode,
        seconds=seconds,
        config_path=config_path,
        output_dir=Path(cfg["output_dir"]),
        log_path=log_path,
        report_dir=report_dir,
        env={k: run_env[k] for k in (*BASE_ENV, *spec.env) if k in run_env},
    )
