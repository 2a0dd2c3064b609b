"""The trainer's per-batch step-skipping draws (``integration.trainer.skip_steps``)."""

from __future__ import annotations

import pytest
import torch

from axolotl_mote.constants import PROMPT_STEP
from axolotl_mote.integration.trainer import skip_steps
from axolotl_mote.settings import resolve_settings


def _settings(seed: int = 7, p: float | None = 0.5, attn: str = "sdpa"):
    mote = {"template": "aligncot", "seed": seed}
    if p is not None:
        mote["step_skip_prob"] = p
    return resolve_settings({"mote": mote, "lora_r": 4, "attn_implementation": attn})


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One packed row of 16 chains: Q A A G G R."""
    chain = [PROMPT_STEP, 0, 0, 1, 1, 2]
    steps = torch.tensor([chain * 16])
    pos = torch.arange(6).repeat(16)[None]
    return {"input_ids": torch.zeros_like(steps), "position_ids": pos}, steps


def _mask(settings, key: int) -> torch.Tensor | None:
    inputs, steps = _batch()
    skip_steps(settings, inputs, steps, key, marker_ids=set())
    return inputs.get("attention_mask")


def test_draws_repeat_for_a_key_and_vary_across_keys():
    settings = _settings()
    assert torch.equal(_mask(settings, 3), _mask(_settings(), 3))
    # 32 independent p=0.5 draws per batch: 8 keys giving one pattern would be a bug
    patterns = {tuple(_mask(settings, key).flatten().tolist()) for key in range(8)}
    assert len(patterns) == 8
    assert not torch.equal(_mask(settings, 3), _mask(_settings(seed=8), 3))


def test_p0_batches_are_untouched():
    assert _mask(_settings(p=0.0), 1) is None


def test_step_skipping_is_on_by_default_where_attention_allows_it():
    on = _settings(p=None)
    assert on.step_skip_prob == 0.3 and on.step_skip_note is None
    assert _settings(p=None, attn="flash_attention_2").step_skip_prob == 0.3
    off = _settings(p=None, attn="xformers")
    assert off.step_skip_prob == 0.0
    assert "cannot take step-skipping masks" in off.step_skip_note
    assert _mask(off, 1) is None


def test_settings_are_resolved_once_per_config():
    assert _settings() is _settings()
    assert _settings(seed=1) is not _settings(seed=2)


@pytest.mark.parametrize(
    "attn, kernel, p, expected",
    [
        ("sdpa", "regions", None, "regions"),
        ("sdpa", "dense", None, "dense"),
        ("eager", "regions", None, "dense"),
        ("flex_attention", "regions", None, "flex"),
        ("flash_attention_2", "regions", None, "regions"),
        ("xformers", "regions", None, "off"),
        ("sdpa", "regions", 0.0, "off"),
    ],
)
def test_the_step_skipping_backend_is_decided_once_in_the_settings(
    attn, kernel, p, expected
):
    mote = {"step_skip_attention": kernel}
    if p is not None:
        mote["step_skip_prob"] = p
    settings = resolve_settings({"mote": mote, "attn_implementation": attn})
    assert settings.step_skip == expected


def test_held_settings_belong_to_their_config_object_only():
    """The plugin holds the run's settings; another config (equal or not) is resolved
    from its own values, and release() forgets the held one."""
    from axolotl_mote.settings import hold, release, settings_of

    run = {"mote": {"alpha": 0.3}, "lora_r": 4}
    other = {"mote": {"alpha": 0.7}, "lora_r": 4}
    try:
        held = hold(run)
        assert settings_of(run) is held and held.config.alpha == 0.3
        assert settings_of(other).config.alpha == 0.7
        assert hold(run) is held  # resolved once
    finally:
        release()
    assert settings_of(run).config.alpha == 0.3
