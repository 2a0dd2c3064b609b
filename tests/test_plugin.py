"""The plugin's hooks, one at a time, without training."""

from __future__ import annotations

import json

import pytest
from axolotl.utils.dict import DictDefault

from axolotl_mote.plugin import MotePlugin


def _raw(tmp_path, **extra):
    return {
        "plugins": ["axolotl_mote.MotePlugin"],
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "mote": {"template": "aligncot"},
        **extra,
    }


def test_register_sets_kernel_defaults_and_markers(tmp_path):
    cfg = _raw(tmp_path, special_tokens={"pad_token": "<pad>"})
    MotePlugin().register(cfg)
    assert cfg["lora_mlp_kernel"] is False
    assert cfg["lora_qkv_kernel"] is False
    assert cfg["lora_o_kernel"] is False
    extra = cfg["special_tokens"]["additional_special_tokens"]
    assert extra[:2] == ["<|analysis|>", "<|/analysis|>"]
    assert "<|response|>" in extra and "<|/check|>" in extra
    assert cfg["special_tokens"]["pad_token"] == "<pad>"
    MotePlugin().register(cfg)  # idempotent: no duplicate markers
    assert cfg["special_tokens"]["additional_special_tokens"] == extra


def test_register_keeps_explicit_kernel_setting_for_validation_to_reject(tmp_path):
    cfg = _raw(tmp_path, lora_mlp_kernel=True)
    MotePlugin().register(cfg)
    assert cfg["lora_mlp_kernel"] is True  # args.py then rejects it with the fix


def test_register_reports_bad_record_with_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        json.dumps({"id": "ok", "prompt": "hi", "answer": "hello"})
        + "\n"
        + json.dumps({"id": "bad", "prompt": "hi", "answr": "typo"})
        + "\n"
    )
    cfg = _raw(
        tmp_path, datasets=[{"path": str(data), "type": "axolotl_mote.aligncot"}]
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*unknown key\(s\) \['answr'\]"):
        MotePlugin().register(cfg)
    cfg["mote"]["validate_files"] = False
    MotePlugin().register(cfg)  # opt-out: the strategy still checks while tokenizing


def test_register_refuses_merging_a_routed_adapter(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "mote_config.json").write_text("{}")
    cfg = _raw(tmp_path, merge_lora=True, lora_model_dir=str(adapter))
    with pytest.raises(ValueError, match="axolotl-mote export"):
        MotePlugin().register(cfg)


@pytest.mark.parametrize(
    "sample_packing, eval_sample_packing, train_cls, eval_cls",
    [
        (False, False, "MoteDataCollator", "MoteDataCollator"),
        (True, True, "MotePackedDataCollator", "MotePackedDataCollator"),
        (True, False, "MotePackedDataCollator", "MoteDataCollator"),
    ],
)
def test_collator_matches_packing_per_split(
    sample_packing, eval_sample_packing, train_cls, eval_cls
):
    cfg = DictDefault(
        sample_packing=sample_packing, eval_sample_packing=eval_sample_packing
    )
    plugin = MotePlugin()
    train, kwargs = plugin.get_collator_cls_and_kwargs(cfg, is_eval=False)
    evaluation, _ = plugin.get_collator_cls_and_kwargs(cfg, is_eval=True)
    assert (train.__name__, evaluation.__name__) == (train_cls, eval_cls)
    assert kwargs == {}


def test_lora_kwargs_give_rank_blocks_and_per_expert_scaling():
    cfg = DictDefault(lora_r=16, lora_alpha=32, mote={"template": "aligncot"})
    kwargs = MotePlugin().get_lora_config_kwargs(cfg)
    assert kwargs["rank_pattern"] == {"|.*": 64}
    assert kwargs["alpha_pattern"] == {"|.*": 128.0}  # 128 / 64 == 32 / 16
    no_shared = DictDefault(
        lora_r=16, lora_alpha=32, mote={"template": "aligncot", "shared_expert": False}
    )
    assert MotePlugin().get_lora_config_kwargs(no_shared)["rank_pattern"] == {"|.*": 48}


def test_trainer_class_is_mote_trainer():
    from axolotl_mote.integration.trainer import MoteTrainer

    assert MotePlugin().get_trainer_cls(DictDefault()) is MoteTrainer


def test_strategy_resolves_through_axolotl_loader(tiny_tokenizer):
    from axolotl.prompt_strategies import load

    from axolotl_mote.data.strategy import ChainDatasetStrategy

    cfg = DictDefault(mote={"template": "aligncot"}, sequence_len=128)
    strategy = load("axolotl_mote.aligncot", tiny_tokenizer, cfg, DictDefault(path="x"))
    assert isinstance(strategy, ChainDatasetStrategy)
    alias = load("axolotl_mote.chains", tiny_tokenizer, cfg, DictDefault(path="x"))
    assert isinstance(alias, ChainDatasetStrategy)
