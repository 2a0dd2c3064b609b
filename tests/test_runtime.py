"""MoteRuntime: the trainer's per-batch step-skipping draws."""

from __future__ import annotations

import torch

from axolotl_mote.constants import PROMPT_STEP
from axolotl_mote.runtime import MoteRuntime
from axolotl_mote.templates import load_template


def _runtime(seed: int = 7, p: float = 0.5) -> MoteRuntime:
    return MoteRuntime(
        template=load_template("aligncot"),
        seed=seed,
        step_skip_prob=p,
        hideable=[0, 1],
        marker_ids=set(),
        markers_visible=False,
        shift_positions=True,
        attn_implementation="sdpa",
        log_stage_metrics=False,
    )


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One packed row of 16 chains: Q A A G G R."""
    chain = [PROMPT_STEP, 0, 0, 1, 1, 2]
    steps = torch.tensor([chain * 16])
    pos = torch.arange(6).repeat(16)[None]
    return {"input_ids": torch.zeros_like(steps), "position_ids": pos}, steps


def _mask(runtime: MoteRuntime, key: int, training: bool = True) -> torch.Tensor:
    inputs, steps = _batch()
    runtime.skip_steps(inputs, steps, key, training)
    return inputs.get("attention_mask")


def test_draws_repeat_for_a_key_and_vary_across_keys():
    rt = _runtime()
    assert torch.equal(_mask(rt, 3), _mask(_runtime(), 3))
    # 32 independent p=0.5 draws per batch: 8 keys giving one pattern would be a bug
    patterns = {tuple(_mask(rt, key).flatten().tolist()) for key in range(8)}
    assert len(patterns) == 8
    assert not torch.equal(_mask(rt, 3), _mask(_runtime(seed=8), 3))


def test_evaluation_and_p0_batches_are_untouched():
    assert _mask(_runtime(), 1, training=False) is None
    assert _mask(_runtime(p=0.0), 1) is None
