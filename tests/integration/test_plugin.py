"""The plugin's hooks, one at a time, without training."""

from __future__ import annotations

import json

import pytest
import torch
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


FSDP2 = {"fsdp_version": 2, "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}


@pytest.mark.parametrize(
    "resume",
    [
        {"resume_from_checkpoint": "out/checkpoint-2"},
        {"auto_resume_from_checkpoints": True},
    ],
)
def test_register_refuses_resuming_fsdp2_full_state_dict(tmp_path, resume):
    cfg = _raw(tmp_path, **FSDP2, **resume)
    with pytest.raises(ValueError, match="state_dict_type: SHARDED_STATE_DICT"):
        MotePlugin().register(cfg)
    # the fix the error names, and the older `fsdp_` spelling of the key
    for fsdp in (
        {"state_dict_type": "SHARDED_STATE_DICT"},
        {"fsdp_state_dict_type": "SHARDED_STATE_DICT"},
    ):
        MotePlugin().register(
            _raw(tmp_path, fsdp_version=2, fsdp_config=fsdp, **resume)
        )
    # the version inside fsdp_config (Axolotl 0.21's spelling) counts too
    inside = {"fsdp_config": {"fsdp_version": 2, "state_dict_type": "FULL_STATE_DICT"}}
    with pytest.raises(ValueError, match="SHARDED_STATE_DICT"):
        MotePlugin().register(_raw(tmp_path, **inside, **resume))
    # the validated config (pre_model_load), where Axolotl 0.21 filled the version in
    validated = DictDefault(_raw(tmp_path, **resume))
    validated["fsdp_version"] = 2
    validated["fsdp_config"] = DictDefault({"state_dict_type": "FULL_STATE_DICT"})
    with pytest.raises(ValueError, match="SHARDED_STATE_DICT"):
        MotePlugin().pre_model_load(validated)
    # FSDP1 and DDP runs are not concerned
    fsdp1 = {"fsdp_version": 1, "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}
    MotePlugin().register(_raw(tmp_path, **fsdp1, **resume))
    MotePlugin().register(_raw(tmp_path, **resume))


def test_register_warns_once_fsdp2_full_checkpoints_do_not_resume(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="axolotl_mote"):
        MotePlugin().register(_raw(tmp_path, **FSDP2, save_strategy="steps"))
    assert "cannot resume training" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="axolotl_mote"):
        MotePlugin().register(_raw(tmp_path, **FSDP2, save_strategy="no"))
    assert "cannot resume" not in caplog.text


def test_register_warns_that_fsdp1_is_untested(tmp_path, caplog):
    fsdp1 = {"fsdp_version": 1, "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}
    inside = {"fsdp_config": {"fsdp_version": 1}}
    for cfg in (fsdp1, inside):
        caplog.clear()
        with caplog.at_level("WARNING", logger="axolotl_mote"):
            MotePlugin().register(_raw(tmp_path, **cfg))
        assert "FSDP1" in caplog.text and "fsdp_version: 2" in caplog.text
    # FSDP2, an unversioned fsdp_config (FSDP2 in Axolotl 0.21) and DDP: no warning
    fsdp2 = {
        "fsdp_version": 2,
        "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"},
    }
    unversioned = {"fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}}
    for cfg in (fsdp2, unversioned, {}):
        caplog.clear()
        with caplog.at_level("WARNING", logger="axolotl_mote"):
            MotePlugin().register(_raw(tmp_path, **cfg))
        assert "FSDP1" not in caplog.text


def test_fsdp2_final_save_wrapper_finds_axolotls_function():
    """The function exists in this Axolotl and is wrapped once."""
    import importlib

    from axolotl_mote.integration import fsdp

    module = importlib.import_module(fsdp.SAVE_MODULE)
    original = getattr(module, fsdp.SAVE_FUNCTION)
    try:
        assert fsdp.install_final_save() and fsdp.install_final_save()
        wrapped = getattr(module, fsdp.SAVE_FUNCTION)
        assert wrapped._mote_wrapped
        assert wrapped.__wrapped__ is getattr(original, "__wrapped__", original)
    finally:
        setattr(module, fsdp.SAVE_FUNCTION, original)


class _Saved(torch.nn.Module):
    """A stand-in PEFT model: records what ``save_pretrained`` is given."""

    def __init__(self, tokens: bool):
        super().__init__()
        self.lora_A = torch.nn.Linear(2, 3, bias=False)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        if tokens:
            self.trainable_tokens_delta = torch.nn.Parameter(torch.ones(2, 2))
        self.saved = []

    def save_pretrained(self, out, state_dict):
        self.saved.append((out, state_dict))


@pytest.mark.parametrize("tokens", [False, True])
def test_fsdp2_final_save_keeps_trainable_tokens(monkeypatch, tokens):
    """Axolotl's save runs unchanged without trainable tokens; with them, every
    trainable parameter (experts and marker rows, never a frozen one) goes to the
    model's own ``save_pretrained``."""
    import importlib

    from axolotl_mote.integration import fsdp

    module = importlib.import_module(fsdp.SAVE_MODULE)
    axolotl_calls = []
    monkeypatch.setattr(
        module, fsdp.SAVE_FUNCTION, lambda m, out: axolotl_calls.append(out) or True
    )
    assert fsdp.install_final_save()
    model = _Saved(tokens)
    assert getattr(module, fsdp.SAVE_FUNCTION)(model, "out") is True
    if not tokens:
        assert axolotl_calls == ["out"] and model.saved == []
        return
    assert axolotl_calls == []
    [(out, state)] = model.saved
    assert out == "out"
    assert sorted(state) == ["lora_A.weight", "trainable_tokens_delta"]
    assert torch.equal(state["lora_A.weight"], model.lora_A.weight.detach())


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

    from axolotl_mote.integration.strategy import ChainDatasetStrategy

    cfg = DictDefault(mote={"template": "aligncot"}, sequence_len=128)
    strategy = load("axolotl_mote.aligncot", tiny_tokenizer, cfg, DictDefault(path="x"))
    assert isinstance(strategy, ChainDatasetStrategy)
    alias = load("axolotl_mote.chains", tiny_tokenizer, cfg, DictDefault(path="x"))
    assert isinstance(alias, ChainDatasetStrategy)
