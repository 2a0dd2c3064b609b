"""The real ``axolotl train`` + save + reload on seven architectures (tiny, random).

Each run trains a few steps with the plugin, saves, reloads with ``load_mote_model``
and must give the logits of the model training ended with: the experts sit on every
linear layer of the architecture (fused ones included), the marker rows train in the
input embedding and in the untied output head where there is one.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import ARCHITECTURES, save_tiny_architecture
from tests.helpers.train import base_config, run_train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_train_save_reload(arch, tmp_path, reset_plugins, monkeypatch):
    from transformers import AutoTokenizer

    from axolotl_mote.loading import load_mote_model
    from axolotl_mote.markers import marker_ids
    from axolotl_mote.plugin import MotePlugin
    from axolotl_mote.routing import route
    from axolotl_mote.templates import load_template
    from axolotl_mote.tiny import build_tiny_tokenizer
    from axolotl_mote.tuner.model import get_routing_state

    model_dir = save_tiny_architecture(arch, tmp_path / "model", build_tiny_tokenizer())
    trained = []
    original = MotePlugin.post_train

    def spy(self, cfg, model):
        trained.append(model) if not trained else None
        return original(self, cfg, model)

    monkeypatch.setattr(MotePlugin, "post_train", spy)
    cfg = base_config(
        model_dir, tmp_path, max_steps=2, learning_rate=5e-3, sequence_len=128,
        mote={"template": "aligncot", "prompt_routing": "random"},
    )  # fmt: skip
    run_train(cfg, tmp_path)
    out = tmp_path / "out"
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hi <|analysis|> a b <|/analysis|><|response|> c", return_tensors="pt")
    ids = ids["input_ids"]
    steps = torch.full_like(ids, -2)
    steps[0, 2:] = 0
    steps[0, -3:] = 2

    def logits(model):
        model.eval()
        with torch.no_grad(), route(get_routing_state(model), steps, draw_key=3):
            return model(input_ids=ids.to(model.device)).logits.float().cpu()

    expected = logits(trained[0])
    reloaded, _ = load_mote_model(model_dir, out, dtype="float32", device="cpu")
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)
    # the experts are on the architecture's linear layers, fused ones included
    from peft.tuners.lora import LoraLayer

    names = {
        n.split(".")[-1]
        for n, m in reloaded.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert names, arch
    if arch == "phi3":
        assert {"qkv_proj", "gate_up_proj"} <= names
    if arch == "gpt_neox":
        assert "query_key_value" in names and "embed_out" not in names
    # the marker rows train in the input embedding, and in an untied output head
    marker = sorted(marker_ids(tok, load_template("aligncot")))
    targets = reloaded.peft_config["default"].trainable_token_indices
    tied = reloaded.get_base_model().config.tie_word_embeddings
    assert tied == (arch == "gemma2")
    assert len(targets) == (1 if tied else 2), targets
    assert all(v == marker for v in targets.values()), targets
