"""Marker rows start at the mean embedding of their stage's words (``marker_init``).

Unit level on a tiny Llama, tied and untied; and through the real ``axolotl train``:
with learning rate 0 the saved marker rows are exactly the described init, and
``marker_init: resize`` keeps the resize's rows instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.train import base_config, run_train


def _model_and_tokenizer(tiny_tokenizer, tied: bool):
    from axolotl_mote.tiny import random_llama

    model = random_llama(
        len(tiny_tokenizer), hidden_size=32, num_layers=1, tie_word_embeddings=tied
    )
    return model, tiny_tokenizer


@pytest.mark.parametrize("tied", [True, False])
def test_rows_are_the_mean_of_the_stage_words(tiny_tokenizer, aligncot, tied):
    from axolotl_mote.markers import init_marker_rows, marker_ids

    model, tok = _model_and_tokenizer(tiny_tokenizer, tied)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    out0 = model.get_output_embeddings().weight.detach().clone()
    markers = aligncot.markers
    done = init_marker_rows(model, tok, aligncot, markers)
    assert done["<|response|>"] == "Safe Answer:"
    assert done["<|/response|>"] == "End of safe answer."
    emb = model.get_input_embeddings().weight.detach()
    out = model.get_output_embeddings().weight.detach()
    ids = dict(zip(markers, marker_ids(tok, aligncot)))
    for marker, text in done.items():
        words = tok(text, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(
            emb[ids[marker]], emb0[words].mean(0), rtol=0, atol=0
        )
        if not tied:
            torch.testing.assert_close(
                out[ids[marker]], out0[words].mean(0), rtol=0, atol=0
            )
    others = [i for i in range(len(tok)) if i not in ids.values()]
    assert torch.equal(emb[others], emb0[others])
    if not tied:
        assert torch.equal(out[others], out0[others])
    # start and end markers of one stage are now different vectors
    assert not torch.allclose(emb[ids["<|response|>"]], emb[ids["<|/response|>"]])


def test_only_the_given_markers_change(tiny_tokenizer, aligncot):
    from axolotl_mote.markers import init_marker_rows, marker_ids

    model, tok = _model_and_tokenizer(tiny_tokenizer, tied=False)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    init_marker_rows(model, tok, aligncot, ["<|analysis|>"])
    ids = dict(zip(aligncot.markers, marker_ids(tok, aligncot)))
    emb = model.get_input_embeddings().weight.detach()
    changed = (emb != emb0).any(-1).nonzero().flatten().tolist()
    assert changed == [ids["<|analysis|>"]]


def test_template_init_text_overrides_and_bad_text(tiny_tokenizer, aligncot):
    from axolotl_mote.markers import init_marker_rows

    stages = [s.model_copy() for s in aligncot.stages]
    stages[0] = stages[0].model_copy(update={"start_text": "Think"})
    custom = aligncot.model_copy(update={"stages": stages})
    model, tok = _model_and_tokenizer(tiny_tokenizer, tied=False)
    assert init_marker_rows(model, tok, custom, ["<|analysis|>"]) == {
        "<|analysis|>": "Think"
    }

    stages[0] = stages[0].model_copy(update={"start_text": "see <|response|>"})
    bad = aligncot.model_copy(update={"stages": stages})
    with pytest.raises(ValueError, match=r"<\|analysis\|>.*start_text/end_text"):
        init_marker_rows(model, tok, bad, ["<|analysis|>"])


def _saved_marker_rows(out_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(str(out_dir / "adapter_model.safetensors"))
    (key,) = [k for k in state if "embed_tokens" in k and "trainable_tokens_delta" in k]
    return state[key]


@pytest.mark.slow
@pytest.mark.parametrize("marker_init", ["describe", "resize"])
def test_axolotl_train_starts_from_the_described_rows(
    marker_init, tiny_model_dir, tmp_path, reset_plugins
):
    """lr 0: the saved trainable marker rows are exactly the init the plugin chose."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.templates import load_template

    cfg = base_config(
        tiny_model_dir,
        tmp_path,
        max_steps=1,
        learning_rate=0.0,
        mote={"template": "aligncot", "marker_init": marker_init},
    )
    run_train(cfg, tmp_path)
    rows = _saved_marker_rows(tmp_path / "out")  # [n_markers, hidden], sorted ids

    template = load_template("aligncot")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    add_marker_tokens(tok, template)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    emb = base.get_input_embeddings().weight.detach()
    texts = {}
    for stage in template.stages:
        texts.update(stage.marker_texts())
    by_id = sorted((tok.convert_tokens_to_ids(m), m) for m in template.markers)
    expected = torch.stack(
        [
            emb[tok(texts[m], add_special_tokens=False)["input_ids"]].mean(0)
            for _, m in by_id
        ]
    )
    if marker_init == "describe":
        torch.testing.assert_close(rows, expected, rtol=0, atol=1e-7)
    else:
        assert not torch.allclose(rows, expected, atol=1e-3)
