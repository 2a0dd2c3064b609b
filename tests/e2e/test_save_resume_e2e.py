"""Saving, resuming and reloading a MoTE adapter through the real ``axolotl train``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.train import REPO, base_config, log_history, run_train

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


def _capture_trained_model(monkeypatch) -> list:
    """The model as training left it: the first ``post_train`` call receives it."""
    from axolotl_mote.plugin import MotePlugin

    seen: list = []
    original = MotePlugin.post_train

    def spy(self, cfg, model):
        if not seen:
            seen.append(model)
        return original(self, cfg, model)

    monkeypatch.setattr(MotePlugin, "post_train", spy)
    return seen


def _a_training_row(cfg, tokenizer_dir, template):
    """input_ids and step_ids of the first chain, as the strategy builds them."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from axolotl_mote.integration.strategy import ChainDatasetStrategy
    from axolotl_mote.markers import add_marker_tokens

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    add_marker_tokens(tok, template)
    raw = load_dataset("json", data_files=cfg["datasets"][0]["path"], split="train")
    row = ChainDatasetStrategy(template, tok, 512).wrap_dataset(raw)[0]
    return torch.tensor([row["input_ids"]]), torch.tensor([row["step_ids"]])


def _logits(model, ids, steps):
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    model.eval()
    with torch.no_grad(), route(get_routing_state(model), steps, draw_key=5):
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


@pytest.mark.parametrize("template", ["aligncot", "plan_solve_verify"])
def test_reload_gives_the_trained_models_logits(
    template, tiny_model_dir, tmp_path, reset_plugins, monkeypatch
):
    """The saved adapter, reloaded by load_mote_model and by Axolotl's own loader
    (lora_model_dir -> post_lora_load), gives the logits of the model training ended
    with: experts, marker rows and random prompt routing (same draws) included."""
    import yaml
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import ModelLoader, load_tokenizer

    from axolotl_mote.loading import load_mote_model
    from axolotl_mote.templates import load_template

    records = None
    if template == "plan_solve_verify":
        records = [
            json.loads(line)
            for line in (REPO / "data" / "math_chains.jsonl").read_text().splitlines()
        ][:4]
    cfg = base_config(
        tiny_model_dir,
        tmp_path,
        max_steps=4,
        learning_rate=5e-3,
        records=records,
        mote={"template": template, "prompt_routing": "random"},
    )
    trained = _capture_trained_model(monkeypatch)
    run_train(cfg, tmp_path)
    out = Path(cfg["output_dir"])
    ids, steps = _a_training_row(cfg, tiny_model_dir, load_template(template))
    assert (steps == -2).any() and (steps >= 0).any()
    expected = _logits(trained[0], ids, steps)

    model, tok = load_mote_model(tiny_model_dir, out, dtype="float32", device="cpu")
    torch.testing.assert_close(_logits(model, ids, steps), expected, rtol=0, atol=1e-5)

    reset_plugins.plugins.clear()
    path = tmp_path / "reload.yml"
    path.write_text(yaml.safe_dump(dict(cfg, lora_model_dir=str(out))))
    parsed = load_cfg(str(path))
    ax_tok = load_tokenizer(parsed)
    ax_model, _ = ModelLoader(parsed, ax_tok, inference=True).load()
    assert ax_tok.get_vocab() == tok.get_vocab()
    from axolotl_mote.generation.auto import uninstall

    uninstall(ax_model)  # `inference=True` installed the marker router
    torch.testing.assert_close(
        _logits(ax_model, ids, steps), expected, rtol=0, atol=1e-5
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


def test_markers_on_reserved_tokens_need_no_resize(
    tmp_path, reset_plugins, monkeypatch
):
    """mote.marker_tokens: reserved renames unused reserved tokens to the markers:
    the vocabulary keeps its size, and the adapter still reloads to the trained
    model."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from axolotl_mote.loading import load_mote_model
    from axolotl_mote.templates import load_template
    from axolotl_mote.tiny import build_tiny_tokenizer, save_random_llama

    tok = build_tiny_tokenizer()
    reserved = [
        AddedToken(f"<|reserved_special_token_{i}|>", special=True, normalized=False)
        for i in range(10)
    ]
    tok.add_tokens(reserved)  # as Llama-3 has them: special added tokens, unlisted
    rows = len(tok)
    model_dir = save_random_llama(tmp_path / "model", tok)
    cfg = base_config(
        model_dir,
        tmp_path,
        max_steps=2,
        learning_rate=5e-3,
        mote={"template": "aligncot", "marker_tokens": "reserved"},
    )
    trained = _capture_trained_model(monkeypatch)
    run_train(cfg, tmp_path)
    out = Path(cfg["output_dir"])
    saved = AutoTokenizer.from_pretrained(out)
    assert len(saved) == rows  # nothing added
    first = tok.convert_tokens_to_ids("<|reserved_special_token_0|>")
    assert saved.convert_tokens_to_ids("<|analysis|>") == first
    assert json.loads((out / "mote_config.json").read_text())["vocab_size"] == rows
    template = load_template("aligncot")
    ids, steps = _a_training_row(cfg, out, template)
    expected = _logits(trained[0], ids, steps)
    model, _ = load_mote_model(model_dir, out, dtype="float32", device="cpu")
    assert model.get_base_model().config.vocab_size == rows
    torch.testing.assert_close(_logits(model, ids, steps), expected, rtol=0, atol=1e-5)
