"""Routing state: coefficients per token kind, random prompt draws, routing errors."""

from __future__ import annotations

import re

import pytest
import torch

from axolotl_mote.routing import RoutingError, RoutingState, route
from axolotl_mote.tuner.config import MoteConfig
from tests.helpers.tiny import (
    P,
    X,
    input_ids_for,
    lora_layers,
    mote_config,
    mote_model,
)

CPU = torch.device("cpu")


def _state(**kwargs) -> RoutingState:
    args = {"num_experts": 3, "alpha": 0.3, "shared_expert": True, "prompt_routing": 1}
    args.update(kwargs)
    return RoutingState(**args)


# (case id, state kwargs, expected coefficients of the tokens [P, 0, 1, 2, X])
COEF_CASES = [
    (
        "prompt-to-stage",
        {},
        [
            [0, 0.3, 0, 0.7],
            [0.3, 0, 0, 0.7],
            [0, 0.3, 0, 0.7],
            [0, 0, 0.3, 0.7],
            [0, 0, 0, 0],
        ],
    ),
    (
        "prompt-shared",
        {"prompt_routing": "shared", "alpha": 0.5},
        [
            [0, 0, 0, 0.5],
            [0.5, 0, 0, 0.5],
            [0, 0.5, 0, 0.5],
            [0, 0, 0.5, 0.5],
            [0, 0, 0, 0],
        ],
    ),
    (
        "no-shared",
        {"shared_expert": False, "prompt_routing": 2, "alpha": 0.5},
        [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]],
    ),
    (
        "alpha1",
        {"alpha": 1.0, "prompt_routing": 0},
        [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
    ),
]


@pytest.mark.parametrize(
    "kwargs, expected", [c[1:] for c in COEF_CASES], ids=[c[0] for c in COEF_CASES]
)
def test_coefficients_per_token_kind(kwargs, expected):
    state = _state(**kwargs)
    state.set(torch.tensor([[P, 0, 1, 2, X]]))
    coef = state.coefficients(torch.float32, CPU)  # [1, 5, n_blocks]
    torch.testing.assert_close(coef[0], torch.tensor(expected, dtype=torch.float32))
    mask = state.rank_mask(2, torch.float32, CPU)  # [1, 5, 2 * n_blocks]
    torch.testing.assert_close(mask, coef.repeat_interleave(2, dim=-1))


def _prompt_draws(state, steps):
    coef = state.coefficients(torch.float32, CPU)
    return coef[..., : state.num_experts].argmax(-1)[steps == P]


def test_random_prompt_routing_one_expert_per_prompt_run():
    steps = torch.tensor([[P, P, P, 0, 1, P, P, 2, X], [P, 0, 0, P, P, P, P, 1, 2]])
    runs = [
        [(0, 0), (0, 1), (0, 2)],
        [(0, 5), (0, 6)],
        [(1, 0)],
        [(1, 3), (1, 4), (1, 5), (1, 6)],
    ]
    for key in range(10):
        state = _state(prompt_routing="random", alpha=0.5)
        state.set(steps, draw_key=key)
        coef = state.coefficients(torch.float32, CPU)
        prompt = coef[steps == P]  # [n_prompt, 4]
        # one step expert at alpha, the shared one at 1 - alpha, nothing else
        assert torch.all((prompt[:, :3] == 0.5).sum(-1) == 1)
        assert torch.all((prompt[:, :3] == 0).sum(-1) == 2)
        assert torch.all(prompt[:, 3] == 0.5)
        experts = coef[..., :3].argmax(-1)
        for run in runs:
            assert len({int(experts[b, t]) for b, t in run}) == 1, (key, run)


def test_random_prompt_draws_are_seeded_and_vary():
    steps = torch.tensor([[P, 0, P, 1, P, 2, P, 0, P, 1, P, 2, P, 0, P, 2]])  # 8 runs

    def draws(seed, key):
        state = _state(prompt_routing="random", seed=seed)
        state.set(steps, draw_key=key)
        return tuple(_prompt_draws(state, steps).tolist())

    assert draws(42, 5) == draws(42, 5)  # reproducible from (seed, draw key)
    by_key = {draws(42, key) for key in range(24)}
    by_seed = {draws(seed, 0) for seed in range(24)}
    # 8 runs over 3 experts: 24 keys almost surely give far more than a few sequences
    assert len(by_key) > 12, by_key
    assert len(by_seed) > 12, by_seed
    assert {e for seq in by_key for e in seq} == {0, 1, 2}


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, message",
    [
        (
            [[0, 1, 3]],
            r"step id 3 is out of range: valid are -2 \(prompt\), "
            r"-1 \(padding\), 0\.\.2 \(experts\), -4 \(expected value\) and, "
            r"with a shared expert, -3 \(shared only\)",
        ),
        ([[0, 7, 1]], "step id 7 is out of range"),
        ([[-5, 0, 0]], "step id -5 is out of range"),
        ([[-100, 0, 0]], "step id -100 is out of range"),
        ([0, 1, 2], r"step_ids must be \[batch, seq\], got shape \(3,\)"),
        ([[[0, 1, 2]]], r"step_ids must be \[batch, seq\], got shape \(1, 1, 3\)"),
    ],
    ids=["one-past-last", "far-out", "below-prompt", "ignore-index", "1d", "3d"],
)
def test_bad_step_ids_raise_routing_error(steps, message):
    state = _state()
    with pytest.raises(RoutingError, match=message):
        state.set(torch.tensor(steps))
    assert not state.is_set


def test_model_without_routing_state_raises():
    model, _, _ = mote_model(mote_config())
    ids = input_ids_for(torch.zeros(1, 4, dtype=torch.long))
    message = r"without step ids.*route\(state, step_ids\)"
    with pytest.raises(RoutingError, match=message):
        model(input_ids=ids)


@pytest.mark.parametrize(
    "step_shape, input_shape",
    [((2, 7), (2, 8)), ((1, 8), (2, 8)), ((8, 2), (2, 8))],
    ids=["shorter", "fewer-rows", "transposed"],
)
def test_step_ids_not_shaped_like_the_input_raise(step_shape, input_shape):
    model, state, _ = mote_model(mote_config())
    ids = input_ids_for(torch.zeros(input_shape, dtype=torch.long))
    steps = torch.zeros(step_shape, dtype=torch.long)
    with route(state, steps):
        expected = re.escape(
            f"input {input_shape} does not match the step_ids {step_shape}"
        )
        with pytest.raises(RoutingError, match=expected):
            model(input_ids=ids)
        embeds = model.get_input_embeddings()(ids)
        with pytest.raises(RoutingError, match="does not match the step_ids"):
            model(inputs_embeds=embeds)
    assert not state.is_set


def test_layer_called_with_other_shape_raises():
    """A layer reached with another batch than the routed one: each layer checks."""
    model, state, _ = mote_model(mote_config())
    name, layer = next(iter(lora_layers(model).items()))
    with route(state, torch.zeros(2, 5, dtype=torch.long)):
        with pytest.raises(RoutingError, match=r"does not match the step_ids"):
            layer(torch.randn(2, 6, layer.in_features))
        layer(torch.randn(2, 5, layer.in_features))  # the routed shape works


def test_route_clears_state_even_on_error():
    state = _state()
    with pytest.raises(KeyError):
        with route(state, torch.tensor([[0, 1]])):
            assert state.is_set
            raise KeyError("boom")
    assert not state.is_set
    with pytest.raises(RoutingError):
        state.coefficients(torch.float32, CPU)


def test_merged_adapter_is_refused_not_run_unrouted():
    """A merge sums every expert into the base weights: refuse it, and never run one.

    The MoTE variant refuses the merge itself (nothing is merged); a layer merged before
    MoTE is attached is refused by ``attach_mote``, which then changes nothing.
    """
    from axolotl_mote.tuner.model import attach_mote, detach_mote

    config = mote_config(prompt_routing="shared")
    model, state, _ = mote_model(config)
    steps = torch.tensor([[P, P, 0, 1, 2, X]])
    ids = input_ids_for(steps)
    with torch.no_grad(), route(state, steps):
        routed = model(input_ids=ids).logits
        for merge in (model.merge_adapter, model.merge_and_unload):
            with pytest.raises(RoutingError, match=r"cannot merge a MoTE adapter"):
                merge()
        assert not any(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(model(input_ids=ids).logits, routed)
    detach_mote(model)
    model.merge_adapter()  # a plain rank-R LoRA merges as usual
    with pytest.raises(RoutingError, match=r"merged.*unmerge_adapter\(\)"):
        attach_mote(model, config)
    assert not any(layer.lora_variant for layer in lora_layers(model).values())
    model.unmerge_adapter()
    state = attach_mote(model, config)
    with torch.no_grad(), route(state, steps):
        torch.testing.assert_close(model(input_ids=ids).logits, routed)


@pytest.mark.parametrize(
    "routing, expected",
    [
        ("random", "random"),
        ("shared", "shared"),
        ("question_analysis", 0),  # a stage name
        ("safe_answer", 2),
        ("guidance", 1),  # a record key, resolved through the saved template
        ("answer", 2),
    ],
)
def test_prompt_routing_resolves_stage_names_and_record_keys(routing, expected):
    from axolotl_mote.templates import load_template

    template = load_template("aligncot")
    config = MoteConfig(
        stage_names=[s.name for s in template.trained_stages],
        expert_rank=4,
        prompt_routing=routing,
        template_data=template.model_dump(mode="json", exclude={"source"}),
    )
    assert config.prompt_routing_index() == expected
    from axolotl_mote.tuner.model import attach_mote

    model, _, _ = mote_model(mote_config(), randomize=False)
    assert attach_mote(model, config).prompt_routing == expected


def test_prompt_routing_to_an_untrained_stage_is_refused():
    from axolotl_mote.templates import load_template

    template = load_template("aligncot")
    with pytest.raises(ValueError, match="prompt_routing: 'check' is not 'random'"):
        MoteConfig(
            stage_names=[s.name for s in template.trained_stages],
            prompt_routing="check",  # the omitted safety_check stage
            template_data=template.model_dump(mode="json", exclude={"source"}),
        )
