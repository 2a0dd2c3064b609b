"""The Llama example configs pass Axolotl's own validation with the plugin, offline.

Each YAML goes through what ``axolotl train`` does before loading a model:
``prepare_plugins`` (the plugin's ``register``: kernel defaults, marker tokens, the
record check of the bundled chains) and ``validate_config`` (Axolotl's schema merged
with ``MoteArgs``), with the capabilities of the GPUs the example is written for. The
model itself (gated, 8B/70B) is never loaded. DeepSpeed paths must name a shipped
config, and the header must say how to get a copy outside a source checkout.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from axolotl_mote.deepspeed import deepspeed_config_path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "example_configs").glob("llama*.yml"))

# example -> (GPUs it is written for, ZeRO stage or None, adapter)
EXPECTED = {
    "llama3.1-8b-1gpu": (1, None, "lora"),
    "llama3.1-8b-2x8-zero3": (16, 3, "lora"),
    "llama3.1-8b-8gpu-fsdp2": (8, None, "lora"),
    "llama3.1-8b-qlora": (1, None, "qlora"),
    "llama3.1-70b-zero3-offload": (8, 3, "lora"),
}


def test_every_scenario_has_an_example():
    assert sorted(p.stem for p in EXAMPLES) == sorted(EXPECTED)


def _validate(raw: dict, n_gpu: int):
    import torch
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(copy.deepcopy(raw))
    prepare_plugins(cfg)
    capabilities = {
        "bf16": True,
        "fp8": False,
        "tf32": True,
        "n_gpu": n_gpu,
        "compute_capability": "sm_90",
    }
    env = {"torch_version": torch.__version__.split("+")[0]}
    return validate_config(cfg, capabilities=capabilities, env_capabilities=env)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_llama_example_validates(path, monkeypatch, reset_plugins):
    from axolotl_mote.args import MoteArgs

    monkeypatch.chdir(REPO)  # dataset and deepspeed paths are checkout-relative
    n_gpu, stage, adapter = EXPECTED[path.stem]
    text = path.read_text()
    raw = yaml.safe_load(text)

    MoteArgs.model_validate(raw)  # the plugin's own cross-key rules
    cfg = _validate(raw, n_gpu)

    assert cfg.plugins == ["axolotl_mote.MotePlugin"]
    assert cfg.adapter == adapter
    assert cfg.base_model.startswith("meta-llama/Llama-3.1-")
    assert cfg.mote["template"] == "aligncot"
    # the plugin's register() ran: kernels off, markers added as special tokens
    assert cfg.lora_mlp_kernel is False and cfg.lora_qkv_kernel is False
    assert "<|analysis|>" in cfg.special_tokens["additional_special_tokens"]
    assert cfg.attn_implementation == "sdpa"
    assert cfg.bf16 is True
    if adapter == "qlora":
        assert cfg.load_in_4bit is True

    # the header starts with the launch command(s)
    header = text.split("\nbase_model:")[0]
    assert "axolotl train example_configs/" + path.name in header

    if stage is None:
        assert not raw.get("deepspeed")
        # Axolotl 0.21 defaults fsdp_version to 2 without FSDP: fsdp_config decides
        if cfg.fsdp_config:  # the checkpoints that resume (check_fsdp2_resume)
            assert str(cfg.fsdp_version) == "2"
            assert cfg.fsdp_config["state_dict_type"] == "SHARDED_STATE_DICT"
        return
    ds_path = Path(raw["deepspeed"])
    shipped = deepspeed_config_path(ds_path.stem)
    assert ds_path.resolve() == shipped, "deepspeed: must point at a shipped config"
    assert json.loads(shipped.read_text())["zero_optimization"]["stage"] == stage
    assert f"axolotl-mote deepspeed-config {ds_path.stem} -o" in header
    if n_gpu > 8:
        assert re.search(r"--nnodes \d+ --nproc_per_node 8", header)
        assert "--rdzv_endpoint" in header


def test_a_rejected_example_names_the_fix(monkeypatch, reset_plugins):
    """The validation really runs MoteArgs: xformers + step skipping fails."""
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load((REPO / "example_configs/llama3.1-8b-1gpu.yml").read_text())
    raw["attn_implementation"] = "xformers"
    with pytest.raises(ValueError, match="step_skip_prob"):
        _validate(raw, 1)


# (config, GPUs it is written for): the paper's settings, or a stated deviation
PAPER_EXAMPLES = [
    ("llama3.1-8b-1gpu.yml", 1),
    ("llama3.1-8b-2x8-zero3.yml", 16),
    ("llama3.1-8b-8gpu-fsdp2.yml", 8),
    ("llama3.1-8b-qlora.yml", 1),
]


@pytest.mark.parametrize("name, gpus", PAPER_EXAMPLES)
def test_8b_examples_use_the_papers_settings(name, gpus):
    path = REPO / "example_configs" / name
    cfg = yaml.safe_load(path.read_text())
    assert cfg["learning_rate"] == 2e-5 and cfg["num_epochs"] == 3
    assert cfg["lora_r"] == 16 and cfg["mote"]["alpha"] == 0.5
    assert cfg["micro_batch_size"] * cfg["gradient_accumulation_steps"] * gpus == 16
    assert "Paper settings" in path.read_text()


@pytest.mark.parametrize("name", ["llama3.1-70b-zero3-offload.yml", "quickstart.yml"])
def test_other_examples_state_their_deviations(name):
    text = (REPO / "example_configs" / name).read_text()
    assert "Deviations" in text or "Deliberately not the paper's" in text


def test_the_readme_minimal_config_validates(monkeypatch, reset_plugins):
    """The YAML a new user copies from the README passes Axolotl's own validation."""
    monkeypatch.chdir(REPO)
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Minimal config")[1].split("```yaml\n")[1].split("```")[0]
    cfg = _validate(yaml.safe_load(block), 1)
    assert cfg.plugins == ["axolotl_mote.MotePlugin"] and cfg.mote is not None


def test_flash_attention_keeps_step_skipping_on(monkeypatch, reset_plugins):
    """The usual GPU config (flash attention, packing) with p unset: step skipping on,
    run as regions through the flash varlen kernel; xformers turns it off, with a
    note."""
    from axolotl_mote.settings import resolve_settings

    monkeypatch.chdir(REPO)
    raw = yaml.safe_load((REPO / "example_configs/llama3.1-8b-1gpu.yml").read_text())
    raw.pop("attn_implementation", None)
    raw["flash_attention"] = True
    del raw["mote"]["step_skip_prob"]
    settings = resolve_settings(_validate(raw, 1))
    assert settings.step_skip_prob == 0.3 and settings.step_skip_note is None
    raw.pop("flash_attention")
    raw["attn_implementation"] = "xformers"
    settings = resolve_settings(_validate(raw, 1))
    assert settings.step_skip_prob == 0 and "sdpa" in settings.step_skip_note
