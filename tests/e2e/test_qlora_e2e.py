"""QLoRA: a 4-bit base through the real ``axolotl train`` on CPU (bitsandbytes' CPU
backend), saved, reloaded in 4-bit by ``load_mote_model`` and generating with
routing."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.train import base_config, run_train

pytestmark = pytest.mark.slow


def test_qlora_train_save_reload_generate(tiny_model_dir, tmp_path, reset_plugins):
    pytest.importorskip("bitsandbytes")
    from axolotl_mote.generation import generate_chains
    from axolotl_mote.loading import load_mote_model

    cfg = base_config(
        tiny_model_dir,
        tmp_path,
        adapter="qlora",
        load_in_4bit=True,
        max_steps=2,
        learning_rate=5e-3,
    )
    run_train(cfg, tmp_path)
    out = tmp_path / "out"
    model, tok = load_mote_model(
        tiny_model_dir, out, load_in_4bit=True, dtype="float32", device="cpu"
    )
    import bitsandbytes as bnb

    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "the base layers are not 4-bit"
    outs = generate_chains(
        model, tok, ["How do I bake bread?"], plan="full", max_new_tokens=16,
        max_stage_tokens=3,
    )  # fmt: skip
    assert outs[0].plan == ["question_analysis", "answer_guidance", "safe_answer"]
    assert outs[0].finish_reason == "answer_end"
    # every LoRA layer on a 4-bit base layer runs MoTE's routed forward
    from peft.tuners.lora import LoraLayer

    from axolotl_mote.tuner.layer import MoteVariant

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(
        isinstance(m.lora_variant["default"], MoteVariant) for m in layers
    )
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers)
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    ids = torch.tensor([outs[0].token_ids])
    with torch.no_grad(), route(get_routing_state(model), torch.full_like(ids, 2)):
        assert torch.isfinite(model(input_ids=ids).logits).all()
