"""Settings that must reduce to something simpler: base model, plain PEFT LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

from axolotl_mote.constants import PAD_STEP
from axolotl_mote.routing import route
from axolotl_mote.tuner.model import detach_mote
from tests.helpers.tiny import (
    TARGETS,
    P,
    X,
    expert_weights,
    input_ids_for,
    lora_layers,
    mote_config,
    mote_model,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}
MIXED = torch.tensor([[P, P, 0, 0, 1, 1, 2, 2, X, X], [P, 0, 0, 1, 1, 1, 2, 2, 2, 2]])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"shared_expert": False},
        {"prompt_routing": "shared", "alpha": 0.9},
        {"prompt_routing": "answer", "shared_expert": False},
    ],
    ids=["paper", "no-shared", "prompt-shared", "prompt-answer-no-shared"],
)
def test_at_initialisation_the_model_is_the_base_model(overrides):
    config = mote_config(**overrides)
    model, state, pristine = mote_model(config, randomize=False)
    for layer in lora_layers(model).values():  # PEFT's init: B = 0, A random
        assert not layer.lora_B["default"].weight.any()
        assert layer.lora_A["default"].weight.any()
    ids = input_ids_for(MIXED)
    mask = (MIXED != PAD_STEP).long()
    with torch.no_grad(), route(state, MIXED):
        logits = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        base = pristine(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, base, atol=0, rtol=0)


def _plain_lora(pristine, rank: int, lora_alpha: float, weights: dict):
    """A plain PEFT LoRA (no MoTE) of ``rank`` holding ``weights[name] = (A, B)``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(TARGETS)
    )
    plain = get_peft_model(copy.deepcopy(pristine), config)
    layers = lora_layers(plain)
    assert layers.keys() == weights.keys()
    with torch.no_grad():
        for name, (a, b) in weights.items():
            layers[name].lora_A["default"].weight.copy_(a)
            layers[name].lora_B["default"].weight.copy_(b)
    return plain.eval()


# (case id, MoteConfig overrides, token step id (all tokens), expected single LoRA)
# The expected LoRA is described per layer from the expert blocks (ea, eb, sa, sb):
#   "step k"        rank r:  A_k, B_k              (no shared expert, or alpha 1)
#   "step k+shared" rank 2r: [A_k; A_s], [alpha B_k | (1-alpha) B_s]
#   "shared"        rank r:  A_s, (1 - alpha) B_s
ONE_EXPERT_CASES = [
    ("no-shared-analysis", {"shared_expert": False}, 0, "step"),
    ("no-shared-guidance", {"shared_expert": False}, 1, "step"),
    ("no-shared-answer", {"shared_expert": False}, 2, "step"),
    ("alpha1-guidance", {"alpha": 1.0}, 1, "step"),
    ("shared-answer-alpha0.5", {}, 2, "step+shared"),
    ("shared-analysis-alpha0.3", {"alpha": 0.3}, 0, "step+shared"),
    ("prompt-shared-alpha0.6", {"prompt_routing": "shared", "alpha": 0.6}, P, "shared"),
    (
        "prompt-answer-no-shared",
        {"prompt_routing": "answer", "shared_expert": False},
        P,
        "step",
    ),
]


@pytest.mark.parametrize(
    "overrides, step, kind",
    [c[1:] for c in ONE_EXPERT_CASES],
    ids=[c[0] for c in ONE_EXPERT_CASES],
)
def test_one_expert_everywhere_is_a_plain_peft_lora(overrides, step, kind):
    lora_alpha = 12.0
    config = mote_config(**overrides)
    model, state, pristine = mote_model(config, lora_alpha=lora_alpha)
    expert = config.prompt_routing_index() if step == P else step
    alpha, r = config.alpha, config.expert_rank
    weights = {}
    for name, layer in lora_layers(model).items():
        ea, eb, sa, sb = expert_weights(layer, config)
        if kind == "step":
            weights[name] = (ea[expert], eb[expert])
        elif kind == "step+shared":
            weights[name] = (
                torch.cat([ea[expert], sa]),
                torch.cat([alpha * eb[expert], (1 - alpha) * sb], dim=1),
            )
        else:
            weights[name] = (sa, (1 - alpha) * sb)
    rank = 2 * r if kind == "step+shared" else r
    # the plain LoRA must scale like one rank-r expert: lora_alpha / r
    plain = _plain_lora(pristine, rank, lora_alpha * rank / r, weights)

    steps = torch.full((2, 10), step)
    ids = input_ids_for(steps)
    with torch.no_grad():
        with route(state, steps):
            logits = model(input_ids=ids).logits
        expected = plain(input_ids=ids).logits
        base = pristine(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, **TOL)
    assert not torch.allclose(logits, base, atol=1e-3)  # the experts do contribute


def _all_blocks(model) -> dict:
    """Per layer, (A, B) of the whole rank n_blocks * r LoRA (clones)."""
    return {
        name: (
            layer.lora_A["default"].weight.detach().clone(),
            layer.lora_B["default"].weight.detach().clone(),
        )
        for name, layer in lora_layers(model).items()
    }


def test_detached_model_is_the_plain_rank_R_lora():
    """detach_mote removes every hook: no routing needed, all blocks always active."""
    config = mote_config()
    model, state, pristine = mote_model(config)
    weights = _all_blocks(model)
    ids = input_ids_for(MIXED)
    detach_mote(model)
    plain = _plain_lora(pristine, config.peft_rank, 8.0 * config.n_blocks, weights)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, plain(input_ids=ids).logits, **TOL
        )


@pytest.mark.parametrize("shared_expert", [True, False])
def test_single_experts_is_the_plain_rank_R_lora_on_every_token(shared_expert):
    """``mote.experts: single`` (the single-LoRA baseline on full chains): any step ids,
    prompt routing random or not, give the plain rank n_blocks * r LoRA; padding gets
    nothing, exactly as in a routed model."""
    config = mote_config(experts="single", shared_expert=shared_expert)
    model, state, pristine = mote_model(config)
    weights = _all_blocks(model)
    plain = _plain_lora(pristine, config.peft_rank, 8.0 * config.n_blocks, weights)
    steps = MIXED.clone()
    steps[steps == X] = 1  # no padding: every token is a content token
    ids = input_ids_for(steps)
    with torch.no_grad():
        with route(state, steps):
            logits = model(input_ids=ids).logits
        with route(state, torch.full_like(steps, P)):  # the prompt routing is moot
            prompt_only = model(input_ids=ids).logits
        expected = plain(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, **TOL)
    torch.testing.assert_close(prompt_only, expected, **TOL)
    routed, routed_state, _ = mote_model(mote_config(shared_expert=shared_expert))
    with torch.no_grad(), route(routed_state, steps):
        assert not torch.allclose(routed(input_ids=ids).logits, expected, atol=1e-3)
    with pytest.raises(ValueError, match="mote.experts must be 'routed' or 'single'"):
        mote_config(experts="one")
