"""Per-stage export: each exported plain PEFT LoRA == MoTE on that stage's tokens."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny import build_mote

CASES = [
    # name, build_mote kwargs
    ("plain", {}),
    (
        "rslora_patterns_markers",
        {
            "use_rslora": True,
            "alpha_pattern": {"down_proj": 3},
            "train_markers": True,
        },
    ),
]


@pytest.fixture(scope="module")
def tokenizer_and_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.templates import load_template

    template = load_template("aligncot")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    add_marker_tokens(tokenizer, template)
    return tokenizer, template


def _fresh_base(model_dir, tokenizer, mote_model):
    """The base model as the exported adapter expects it: resized, same marker rows."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))
    inner = mote_model.get_base_model()
    with torch.no_grad():
        for name in ("get_input_embeddings", "get_output_embeddings"):
            src = getattr(inner, name)()
            weight = getattr(src, "weight", None)
            if weight is None:  # a PEFT TrainableTokens wrapper
                weight = src.token_adapter.base_layer.weight
            getattr(base, name)().weight.copy_(weight)
    return base


@pytest.mark.parametrize("name, kwargs", CASES, ids=[c[0] for c in CASES])
def test_exported_stage_adapter_equals_mote_on_its_tokens(
    tiny_model_dir, tokenizer_and_template, tmp_path, name, kwargs
):
    from peft import PeftModel

    from axolotl_mote.constants import MOTE_CONFIG_NAME
    from axolotl_mote.export import export_stage_adapters
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    tokenizer, template = tokenizer_and_template
    mote, config = build_mote(tiny_model_dir, tokenizer, template, **kwargs)
    adapter = tmp_path / "adapter"
    mote.save_pretrained(adapter)
    config.save(adapter)
    tokenizer.save_pretrained(adapter)
    written = export_stage_adapters(adapter, tmp_path / "export")
    assert list(written) == config.stage_names

    ids = torch.tensor(
        [tokenizer("<|analysis|> How do I bake bread at home?")["input_ids"]]
    )
    state = get_routing_state(mote)
    for stage, directory in written.items():
        assert not (directory / MOTE_CONFIG_NAME).exists()  # plain, not routed
        saved = json.loads((directory / "adapter_config.json").read_text())
        assert saved["r"] == saved["lora_alpha"] == 2 * config.expert_rank
        assert saved["rank_pattern"] == {} and saved["alpha_pattern"] == {}
        assert (directory / "tokenizer.json").exists()
        steps = torch.full_like(ids, config.stage_names.index(stage))
        with torch.no_grad(), route(state, steps):
            expected = mote(input_ids=ids).logits
        plain = PeftModel.from_pretrained(
            _fresh_base(tiny_model_dir, tokenizer, mote), directory
        )
        plain.eval()
        with torch.no_grad():
            got = plain(input_ids=ids).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=stage)
            merged = plain.merge_and_unload()  # what `axolotl merge-lora` does
            torch.testing.assert_close(
                merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4, msg=stage
            )


def test_export_selects_stages_by_name_or_key(
    tiny_model_dir, tokenizer_and_template, tmp_path
):
    from axolotl_mote.export import export_stage_adapters

    tokenizer, template = tokenizer_and_template
    mote, config = build_mote(tiny_model_dir, tokenizer, template)
    mote.save_pretrained(tmp_path / "a")
    config.save(tmp_path / "a")
    written = export_stage_adapters(tmp_path / "a", tmp_path / "out", stages=["answer"])
    assert list(written) == ["safe_answer"]
    with pytest.raises(KeyError, match="no stage 'nope'"):
        export_stage_adapters(tmp_path / "a", tmp_path / "out", stages=["nope"])
    with pytest.raises(FileNotFoundError, match="not a MoTE adapter"):
        export_stage_adapters(tmp_path / "out" / "safe_answer", tmp_path / "again")


def test_lora_only_export_keeps_just_a_and_b(
    tiny_model_dir, tokenizer_and_template, tmp_path
):
    from safetensors.torch import load_file

    from axolotl_mote.export import export_stage_adapters

    tokenizer, template = tokenizer_and_template
    mote, config = build_mote(tiny_model_dir, tokenizer, template, train_markers=True)
    mote.save_pretrained(tmp_path / "a")
    config.save(tmp_path / "a")
    out = export_stage_adapters(
        tmp_path / "a", tmp_path / "out", ["answer"], lora_only=True
    )
    keys = load_file(str(out["safe_answer"] / "adapter_model.safetensors")).keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    saved = json.loads((out["safe_answer"] / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] is None


def test_merging_an_exported_adapter_uses_the_legacy_merge(tmp_path):
    """The memory-efficient merge would drop the marker rows; the plugin picks
    legacy."""
    from axolotl_mote.plugin import MotePlugin

    export = tmp_path / "safe_answer"
    export.mkdir()
    (export / "mote_export.json").write_text("{}")
    cfg = {
        "plugins": ["axolotl_mote.MotePlugin"],
        "adapter": "lora",
        "lora_r": 4,
        "mote": {"template": "aligncot"},
        "merge_lora": True,
        "lora_model_dir": str(export),
    }
    MotePlugin().register(cfg)
    assert cfg["merge_method"] == "legacy"
    cfg.pop("merge_method")
    cfg["merge_method"] = "memory_efficient"  # an explicit choice is kept
    MotePlugin().register(cfg)
    assert cfg["merge_method"] == "memory_efficient"


def test_a_mote_adapter_says_what_it_is_and_plain_loaders_refuse_it(tmp_path):
    """The saved card names the adapter as routed and how to load it; this package's
    plain-model loaders refuse the folder instead of running it unrouted."""
    from axolotl_mote.datagen.backends import HFChatGenerator
    from axolotl_mote.integration.saving import CARD_HEADING, write_model_card
    from axolotl_mote.loading import load_base_model

    (tmp_path / "mote_config.json").write_text("{}")
    card = write_model_card(tmp_path)
    write_model_card(tmp_path)  # idempotent
    text = card.read_text()
    assert text.count(CARD_HEADING) == 1
    assert "load_mote_model" in text and "- axolotl-mote" in text
    with pytest.raises(ValueError, match="is a MoTE adapter.*unrouted"):
        load_base_model(tmp_path)
    with pytest.raises(ValueError, match="is a MoTE adapter"):
        HFChatGenerator(str(tmp_path))


def test_attached_models_save_compact_adapters(
    tiny_model_dir, tokenizer_and_template, tmp_path
):
    """The resized vocabulary's embedding matrices stay out of the adapter unless asked
    for; detaching restores PEFT's own save_pretrained."""
    from safetensors.torch import load_file

    from axolotl_mote.tuner.model import detach_mote

    tokenizer, template = tokenizer_and_template
    model, _ = build_mote(tiny_model_dir, tokenizer, template, train_markers=True)
    model.save_pretrained(tmp_path / "compact")
    keys = load_file(str(tmp_path / "compact" / "adapter_model.safetensors")).keys()
    assert any("trainable_tokens" in k for k in keys)
    assert not any("base_layer" in k for k in keys)
    model.save_pretrained(tmp_path / "full", save_embedding_layers=True)
    keys = load_file(str(tmp_path / "full" / "adapter_model.safetensors")).keys()
    assert any("base_layer" in k for k in keys)
    detach_mote(model)
    assert "save_pretrained" not in vars(model)


def test_fold_stage_weights_against_hand_computed_values():
    """alpha = 0.3, scaling 2: the stage block at s·alpha = 0.6, the shared one at
    s·(1 - alpha) = 1.4; the numbers are written out, not recomputed by the code."""
    from axolotl_mote.export import fold_stage

    lora_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # e0, e1, shared (r=1)
    lora_b = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # [out=2, R=3]
    a, b = fold_stage(lora_a, lora_b, 1, 3, True, 0.3, 2.0, out_rank=3)
    torch.testing.assert_close(a, torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(b, torch.tensor([[1.2, 4.2, 0.0], [3.0, 8.4, 0.0]]))
    # no shared expert: the stage block alone at s·1
    a, b = fold_stage(lora_a[:2], lora_b[:, :2], 0, 2, False, 0.3, 2.0, out_rank=1)
    torch.testing.assert_close(a, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(b, torch.tensor([[2.0], [8.0]]))


def test_export_folds_the_adapters_own_alpha(
    tiny_model_dir, tokenizer_and_template, tmp_path
):
    """An adapter saved with alpha = 0.8: each exported B' is s·0.8·B_stage beside
    s·0.2·B_shared (at 0.5 the two weights could be swapped unseen)."""
    from safetensors.torch import load_file

    from axolotl_mote.export import export_stage_adapters

    tokenizer, template = tokenizer_and_template
    mote, config = build_mote(tiny_model_dir, tokenizer, template, r=2, lora_alpha=4)
    mote.save_pretrained(tmp_path / "a")
    saved = json.loads(config.save(tmp_path / "a").read_text())
    saved["alpha"] = 0.8
    (tmp_path / "a" / "mote_config.json").write_text(json.dumps(saved))
    written = export_stage_adapters(tmp_path / "a", tmp_path / "out")
    source = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    r, s = 2, 4 / 2  # expert rank; scaling lora_alpha / r per expert (4 / 2)
    for stage, directory in written.items():
        k = config.stage_names.index(stage)
        folded = load_file(str(directory / "adapter_model.safetensors"))
        keys = [key for key in source if key.endswith(".lora_B.weight")]
        assert keys
        for key in keys:
            b = source[key]  # [out, 4 blocks · r]
            expected = torch.cat(
                [s * 0.8 * b[:, k * r : (k + 1) * r], s * 0.2 * b[:, 3 * r : 4 * r]],
                dim=1,
            )
            torch.testing.assert_close(folded[key], expected, msg=f"{stage} {key}")


def test_saved_adapter_records_the_trained_vocab_size_and_loads_with_it(
    tiny_model_dir, tokenizer_and_template, tmp_path
):
    """The vocabulary after any resize (e.g. padded to a multiple of 32, beyond the
    tokenizer) goes into mote_config.json, and load_mote_model resizes the fresh base
    to it, not to len(tokenizer). (Was checked only by the slow e2e runs.)"""
    from axolotl_mote.integration.saving import write_mote_config
    from axolotl_mote.loading import load_mote_model

    tokenizer, template = tokenizer_and_template
    mote, _ = build_mote(tiny_model_dir, tokenizer, template, r=2)
    rows = len(tokenizer) + 32 - len(tokenizer) % 32  # padded beyond the tokenizer
    mote.get_base_model().resize_token_embeddings(rows)
    adapter = tmp_path / "a"
    mote.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    cfg = {"mote": {"template": "aligncot"}, "lora_r": 2}
    write_mote_config(cfg, adapter, mote)
    saved = json.loads((adapter / "mote_config.json").read_text())
    assert saved["vocab_size"] == rows != len(tokenizer)
    model, _ = load_mote_model(tiny_model_dir, adapter, dtype="float32", device="cpu")
    assert model.get_base_model().get_input_embeddings().num_embeddings == rows
    assert model.get_base_model().config.vocab_size == rows


def test_plain_peft_loading_of_a_mote_adapter_warns_naming_load_mote_model(
    tiny_model_dir, tokenizer_and_template, tmp_path
):
    """A plain PeftModel.from_pretrained warns (the adapter_config.json key PEFT does
    not know names load_mote_model); the package's loader, the plugin's Axolotl runs
    and the exported plain adapters load without that warning."""
    import warnings

    from peft import PeftModel

    from axolotl_mote.export import export_stage_adapters
    from axolotl_mote.loading import load_mote_model
    from axolotl_mote.plugin import MotePlugin

    tokenizer, template = tokenizer_and_template
    mote, config = build_mote(tiny_model_dir, tokenizer, template, r=2)
    adapter = tmp_path / "a"
    mote.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    config.save(adapter)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert any("load_mote_model" in key for key in saved)

    def peft_warnings(load):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load()
        return [str(w.message) for w in caught if "load_mote_model" in str(w.message)]

    def plain():
        PeftModel.from_pretrained(_fresh_base(tiny_model_dir, tokenizer, mote), adapter)

    with pytest.warns(UserWarning, match="load_mote_model"):
        plain()
    assert not peft_warnings(
        lambda: load_mote_model(tiny_model_dir, adapter, dtype="float32", device="cpu")
    )
    written = export_stage_adapters(adapter, tmp_path / "out", ["answer"])
    exported = written["safe_answer"]
    assert not any(
        "load_mote_model" in k
        for k in json.loads((exported / "adapter_config.json").read_text())
    )
    assert not peft_warnings(
        lambda: PeftModel.from_pretrained(
            _fresh_base(tiny_model_dir, tokenizer, mote), exported
        )
    )
    with warnings.catch_warnings():  # the plugin's filter is process-wide
        MotePlugin().register({"plugins": ["axolotl_mote.MotePlugin"],
                               "mote": {"template": "aligncot"}})  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            plain()  # what Axolotl's lora_model_dir does, before post_lora_load
        assert not [w for w in caught if "load_mote_model" in str(w.message)]
