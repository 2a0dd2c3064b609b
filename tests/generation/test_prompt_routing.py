"""Prompt routing is parsed once into one value, and a bad choice is refused early.

``PromptRouting`` is what the routing state, the generation router and the CLI share;
the step values below are the constants' documented ones, written out. A
``--prompt-routing`` the adapter cannot take is refused before any model loads, naming
the choices (it used to fail at the first forward: "step id -3 is out of range").
"""

from __future__ import annotations

import click
import pytest

from axolotl_mote.cli.options import check_prompt_routing
from axolotl_mote.routing import PromptRouting, RoutingError, RoutingState
from axolotl_mote.tuner.config import MoteConfig

STAGES = ["question_analysis", "answer_guidance", "safe_answer"]


@pytest.mark.parametrize(
    "value, step",
    [("random", None), ("shared", -3), ("expected", -4), (0, 0), (2, 2)],
)
def test_parse_gives_the_step_every_prompt_token_takes(value, step):
    parsed = PromptRouting.parse(value, num_experts=3, shared_expert=True)
    assert parsed.step == step and parsed.value == value
    assert parsed.is_random == (value == "random")


@pytest.mark.parametrize(
    "value, shared, message",
    [
        ("shared", False, "needs a shared expert"),
        (3, True, "expert index 0..2"),
        (-1, True, "expert index 0..2"),
        ("answer", True, "is not 'random', 'shared', 'expected'"),
        (True, True, "is not"),
    ],
)
def test_parse_refuses_what_the_experts_cannot_take(value, shared, message):
    with pytest.raises(RoutingError, match=message):
        PromptRouting.parse(value, num_experts=3, shared_expert=shared)


def test_the_state_and_the_router_read_one_value():
    from axolotl_mote.generation.router import StageRouter

    state = RoutingState(3, 0.5, True, "expected")
    router = StageRouter({100: 0, 101: 1, 102: 2}, state.prompt, 3)
    assert state.prompt == router.prompt == PromptRouting("expected", -4)
    assert router.prompt_step([5, 6, 7]) == -4
    with pytest.raises(RoutingError, match="needs a shared expert"):
        RoutingState(3, 0.5, False, "shared")


def _adapter(tmp_path, shared: bool):
    tmp_path.mkdir(parents=True, exist_ok=True)
    MoteConfig(stage_names=STAGES, expert_rank=4, shared_expert=shared).save(tmp_path)
    return tmp_path


def test_a_stage_name_resolves_to_its_index(tmp_path):
    config = MoteConfig.load(_adapter(tmp_path, shared=True))
    assert config.resolve_prompt_routing("safe_answer") == 2
    assert config.resolve_prompt_routing(None) == "random"  # the adapter's own
    assert config.resolve_prompt_routing("shared") == "shared"


@pytest.mark.parametrize(
    "value, message",
    [
        ("shared", "needs a shared expert"),
        ("bogus", "question_analysis, answer_guidance, safe_answer"),
    ],
)
def test_the_cli_refuses_a_bad_choice_before_loading(tmp_path, value, message):
    adapter = _adapter(tmp_path, shared=False)
    with pytest.raises(click.BadParameter, match=message):
        check_prompt_routing(value, adapter)
    check_prompt_routing("expected", adapter)  # a valid one passes
    check_prompt_routing(None, adapter)


def test_generate_refuses_shared_without_a_shared_expert_before_loading(tmp_path):
    """Through the real command: exit 2 with the reason, and no model is loaded (the
    base model path does not exist)."""
    from click.testing import CliRunner

    from axolotl_mote.cli.main import main

    adapter = _adapter(tmp_path / "adapter", shared=False)
    result = CliRunner().invoke(
        main,
        ["generate", "--adapter", str(adapter), "--base-model", str(tmp_path / "none"),
         "--prompt", "hi", "--prompt-routing", "shared"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "needs a shared expert" in result.output
