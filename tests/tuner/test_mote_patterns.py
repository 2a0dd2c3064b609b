"""User rank/alpha patterns survive PEFT's save and reload (sorted keys, first match
wins)."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from axolotl_mote.tuner.config import CATCH_ALL, MoteConfig

LAYERS = {
    "model.layers.0.self_attn.q_proj": ("q_proj", 8 * 4, 64.0 * 4),
    "model.layers.1.mlp.down_proj": (CATCH_ALL, 4 * 4, 16.0 * 4),
    "model.layers.3.self_attn.v_proj": ("layers.3.self_attn.v_proj", 2 * 4, 8.0 * 4),
}


def _kwargs() -> dict:
    cfg = MoteConfig(stage_names=["analysis", "guidance", "answer"], expert_rank=4)
    return cfg.peft_kwargs(
        lora_alpha=16,
        rank_pattern={"q_proj": 8, "layers.3.self_attn.v_proj": 2},
        alpha_pattern={"q_proj": 64, "layers.3.self_attn.v_proj": 8},
    )


def _resolve(config: LoraConfig, name: str) -> tuple[str, int, float]:
    rank_key = get_pattern_key(list(config.rank_pattern), name)
    alpha_key = get_pattern_key(list(config.alpha_pattern), name)
    assert rank_key == alpha_key
    return rank_key, config.rank_pattern[rank_key], config.alpha_pattern[alpha_key]


@pytest.mark.parametrize("reload", [False, True], ids=["created", "reloaded"])
def test_user_patterns_win_over_the_catch_all(tmp_path, reload):
    config = LoraConfig(
        r=16,
        lora_alpha=64,
        target_modules=["q_proj", "v_proj", "down_proj"],
        **_kwargs(),
    )
    if reload:
        config.save_pretrained(tmp_path)
        config = LoraConfig.from_pretrained(tmp_path)
        assert list(config.rank_pattern)[-1] == CATCH_ALL  # sorted: catch-all last
    for name, expected in LAYERS.items():
        assert _resolve(config, name) == expected


def test_a_plain_dot_star_would_shadow_after_reload(tmp_path):
    """Why CATCH_ALL is not ".*": sorted on save, ".*" comes first and wins."""
    kwargs = _kwargs()
    kwargs = {
        k: {(".*" if key == CATCH_ALL else key): v for key, v in d.items()}
        for k, d in kwargs.items()
    }
    LoraConfig(
        r=16, lora_alpha=64, target_modules=["q_proj"], **kwargs
    ).save_pretrained(tmp_path)
    config = LoraConfig.from_pretrained(tmp_path)
    assert _resolve(config, "model.layers.0.self_attn.q_proj")[0] == ".*"
