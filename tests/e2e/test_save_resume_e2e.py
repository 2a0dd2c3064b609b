"""Saving, resuming and reloading a MoTE adapter through the real ``axolotl train``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.train import base_config, log_history, run_train

pytestmark = pytest.mark.slow


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path, reset_plugins):
    """2 steps + resume + 2 steps == 4 steps, in fp32 (random prompt routing on)."""
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-3)
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full_dir.mkdir()
    part_dir.mkdir()
    full = base_config(tiny_model_dir, full_dir, **common)
    run_train(full, full_dir)
    reset_plugins.plugins.clear()

    part = base_config(tiny_model_dir, part_dir, **common)
    run_train(part, part_dir)  # runs 4 steps and saves checkpoint-2 and -4
    out = Path(part["output_dir"])
    shutil.rmtree(out / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink(missing_ok=True)
    reset_plugins.plugins.clear()
    run_train(dict(part, resume_from_checkpoint=str(out / "checkpoint-2")), part_dir)

    a = _adapter_weights(Path(full["output_dir"]) / "checkpoint-4")
    b = _adapter_weights(out / "checkpoint-4")
    assert a.keys() == b.keys()
    # trained tensors: the expert blocks and the marker rows. (The full resized
    # embedding PEFT also saves holds random init rows for the markers that the marker
    # deltas override; they depend on the RNG state at load time, not on training.)
    trained = [k for k in a if "lora_" in k or "trainable_tokens" in k]
    assert any("trainable_tokens" in k for k in trained)
    for key in trained:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert (out / "checkpoint-2" / "mote_config.json").exists()
    assert (out / "checkpoint-4" / "mote_config.json").exists()


def test_reload_gives_identical_logits(tiny_model_dir, tmp_path, reset_plugins):
    """lora_model_dir through Axolotl and load_mote_model give the trained logits."""
    from axolotl_mote.loading import load_mote_model
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    cfg = base_config(
        tiny_model_dir,
        tmp_path,
        max_steps=4,
        learning_rate=5e-3,
        mote={"template": "aligncot", "prompt_routing": "safe_answer"},
    )
    run_train(cfg, tmp_path)
    out = Path(cfg["output_dir"])
    model, tok = load_mote_model(tiny_model_dir, out)
    ids = tok("hello there", return_tensors="pt")["input_ids"]
    steps = torch.full_like(ids, -2)
    steps[0, 2:] = torch.tensor([0, 1, 2])[: ids.shape[1] - 2].repeat(10)[
        : ids.shape[1] - 2
    ]
    with torch.no_grad(), route(get_routing_state(model), steps):
        logits_plain = model(input_ids=ids).logits

    # the same adapter through Axolotl's own loader (lora_model_dir -> post_lora_load)
    import yaml
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import ModelLoader, load_tokenizer

    reset_plugins.plugins.clear()
    reload_cfg = dict(cfg, lora_model_dir=str(out))
    path = tmp_path / "reload.yml"
    path.write_text(yaml.safe_dump(reload_cfg))
    parsed = load_cfg(str(path))
    ax_tok = load_tokenizer(parsed)
    ax_model, _ = ModelLoader(parsed, ax_tok, inference=True).load()
    ax_model.eval()
    with torch.no_grad(), route(get_routing_state(ax_model), steps):
        logits_axolotl = ax_model(input_ids=ids).logits
    torch.testing.assert_close(logits_plain, logits_axolotl, rtol=0, atol=1e-5)
    # and the marker rows were trained and restored (not the resize init)
    assert tok.convert_tokens_to_ids("<|response|>") == ax_tok.convert_tokens_to_ids(
        "<|response|>"
    )


def test_loss_falls_and_stage_metrics_are_logged(
    tiny_model_dir, tmp_path, reset_plugins
):
    cfg = base_config(
        tiny_model_dir,
        tmp_path,
        max_steps=20,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=20,
        gradient_checkpointing=True,
        val_set_size=0.25,
        eval_strategy="steps",
        eval_steps=10,
    )
    run_train(cfg, tmp_path)
    history = log_history(Path(cfg["output_dir"]))
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    train_logs = [h for h in history if "loss" in h]
    assert any("loss_safe_answer" in h for h in train_logs), train_logs[0].keys()
    assert all(h.get("tokens_safe_answer", 0) > 0 for h in train_logs)
    evals = [h for h in history if "eval_loss" in h]
    assert evals and any("eval_loss_safe_answer" in h for h in evals), evals
