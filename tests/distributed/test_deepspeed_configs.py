"""The shipped DeepSpeed JSON files: found offline, parsed by DeepSpeed, written by the
CLI.

Each file is loaded the way a training run loads it: the HF Trainer integration fills
the ``"auto"`` values from the TrainingArguments (``HfTrainerDeepSpeedConfig``), then
DeepSpeed's own parser (``deepspeed.runtime.config.DeepSpeedConfig``) reads the result.
The CPU-runnable ones are also trained in 2 processes in test_distributed_train.py:
zero1, zero2, zero3, and zero3_bf16_cpuoffload with bf16 switched off. bf16 itself needs
a GPU (the HF Trainer refuses ``bf16`` without one), so zero3_bf16 is checked here only.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from axolotl_mote.deepspeed import (
    CONFIG_DIR,
    DEEPSPEED_CONFIGS,
    deepspeed_config_names,
    deepspeed_config_path,
    write_deepspeed_config,
)

# name -> (ZeRO stage, bf16 forced on, parameters and optimizer offloaded to CPU)
EXPECTED = {
    "zero1": (1, False, False),
    "zero2": (2, False, False),
    "zero3": (3, False, False),
    "zero3_bf16": (3, True, False),
    "zero3_bf16_cpuoffload": (3, True, True),
}

MICRO_BATCH, GRAD_ACC, MAX_GRAD_NORM = 2, 4, 0.7


def test_registry_matches_the_shipped_files():
    assert set(DEEPSPEED_CONFIGS) == set(EXPECTED)
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.json")) == deepspeed_config_names()
    assert deepspeed_config_path("zero3.json") == deepspeed_config_path("zero3")
    assert deepspeed_config_path("zero3").is_absolute()
    with pytest.raises(ValueError, match="zero1, zero2, zero3"):
        deepspeed_config_path("zero4")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_raw_file_leaves_batch_values_to_the_trainer(name):
    raw = json.loads(deepspeed_config_path(name).read_text())
    # DeepSpeed derives train_batch_size = micro x accumulation x its world size;
    # "auto" would be filled from the Trainer's world size, which is wrong on CPU runs
    assert "train_batch_size" not in raw
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert raw[key] == "auto", key
    stage, bf16, _ = EXPECTED[name]
    assert raw["zero_optimization"]["stage"] == stage
    assert raw["bf16"]["enabled"] == (True if bf16 else "auto")
    if stage == 3:
        # MoTE's adapter save needs the gathered 16-bit weights
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def _auto_values(node, path: str = "") -> list[str]:
    """Dotted paths of every value still "auto"."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_values(v, f"{path}{k}.")]
    return [path.rstrip(".")] if node == "auto" else []


def _trainer_filled(name: str, tmp_path):
    """The config as the HF Trainer hands it to DeepSpeed (every "auto" resolved)."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    _, bf16, _ = EXPECTED[name]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GRAD_ACC,
        max_grad_norm=MAX_GRAD_NORM,
        learning_rate=2e-4,
        bf16=bf16,
        use_cpu=True,
        report_to=[],
    )
    hf_config = HfTrainerDeepSpeedConfig(str(deepspeed_config_path(name)))
    hf_config.trainer_config_process(args)
    # the model's hidden size fills the ZeRO-3 bucket sizes
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=4096))
    hf_config.trainer_config_finalize(args, model, num_training_steps=100)
    return hf_config.config


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_deepspeed_parses_each_shipped_config(name, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    filled = _trainer_filled(name, tmp_path)
    assert not _auto_values(filled), _auto_values(filled)
    parsed = DeepSpeedConfig(filled)  # DeepSpeed's own parser and sanity checks

    stage, bf16, offload = EXPECTED[name]
    assert parsed.zero_enabled
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_micro_batch_size_per_gpu == MICRO_BATCH
    assert parsed.gradient_accumulation_steps == GRAD_ACC
    # no train_batch_size in the file: DeepSpeed derives it (world size 1 here)
    assert parsed.train_batch_size == MICRO_BATCH * GRAD_ACC * parsed.world_size
    assert parsed.gradient_clipping == pytest.approx(MAX_GRAD_NORM)
    assert parsed.bfloat16_config.enabled == bf16
    assert not parsed.float16_config.enabled
    zero = parsed.zero_config
    if stage == 3:
        assert zero.gather_16bit_weights_on_model_save
        assert zero.reduce_bucket_size == 4096 * 4096
    assert (zero.offload_param is not None) == offload
    assert (zero.offload_optimizer is not None) == offload
    if offload:
        assert str(zero.offload_param.device).endswith("cpu")
        assert str(zero.offload_optimizer.device).endswith("cpu")


def test_write_deepspeed_config(tmp_path):
    written = write_deepspeed_config("zero3", tmp_path)
    assert written == tmp_path / "zero3.json"
    assert written.read_bytes() == deepspeed_config_path("zero3").read_bytes()
    with pytest.raises(FileExistsError):
        write_deepspeed_config("zero3", written)
    other = write_deepspeed_config("zero2", written, overwrite=True)
    assert other.read_bytes() == deepspeed_config_path("zero2").read_bytes()


def test_cli_lists_locates_and_writes(tmp_path):
    from click.testing import CliRunner

    from axolotl_mote.cli.main import main

    runner = CliRunner()
    listed = runner.invoke(main, ["deepspeed-config"])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.output.splitlines()] == (
        deepspeed_config_names()
    )

    located = runner.invoke(main, ["deepspeed-config", "zero3_bf16_cpuoffload"])
    assert located.exit_code == 0, located.output
    assert located.output.strip() == str(deepspeed_config_path("zero3_bf16_cpuoffload"))

    dest = tmp_path / "ds" / "my_zero3.json"
    wrote = runner.invoke(main, ["deepspeed-config", "zero3", "-o", str(dest)])
    assert wrote.exit_code == 0, wrote.output
    assert wrote.output.strip() == str(dest)
    assert json.loads(dest.read_text()) == json.loads(
        deepspeed_config_path("zero3").read_text()
    )

    again = runner.invoke(main, ["deepspeed-config", "zero2", "-o", str(dest)])
    assert again.exit_code != 0 and "--force" in again.output
    forced = runner.invoke(
        main, ["deepspeed-config", "zero2", "-o", str(dest), "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert json.loads(dest.read_text())["zero_optimization"]["stage"] == 2

    bad = runner.invoke(main, ["deepspeed-config", "zero9"])
    assert bad.exit_code != 0
