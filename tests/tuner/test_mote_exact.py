"""Rank-block routing == the paper's formula, computed by the naive per-expert loop.

``y = W0 x + alpha * E_step(x) + (1 - alpha) * E_shared(x)`` per token, for one packed
batch that mixes stages, prompt runs and padding, checked layer by layer and on the
whole model's logits and gradients, in fp32 to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from axolotl_mote.constants import PAD_STEP
from axolotl_mote.routing import route
from axolotl_mote.tuner.reference import expert_per_token, naive_mote_delta
from tests.helpers.tiny import (
    PACKED_POSITIONS,
    PACKED_STEPS,
    expert_weights,
    input_ids_for,
    lora_layers,
    mote_config,
    mote_model,
    naive_model,
    prompt_experts_from_state,
    set_expert_ids,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}

# (case id, MoteConfig overrides, lora_alpha, use_rslora)
CASES = [
    ("paper-random", {}, 8.0, False),
    ("prompt-shared-alpha0.3", {"prompt_routing": "shared", "alpha": 0.3}, 8.0, False),
    ("prompt-answer-alpha0.8", {"prompt_routing": "answer", "alpha": 0.8}, 16.0, False),
    (
        "prompt-analysis-alpha1",
        {"prompt_routing": "analysis", "alpha": 1.0},
        8.0,
        False,
    ),
    ("no-shared-random", {"shared_expert": False}, 8.0, False),
    (
        "no-shared-guidance",
        {"shared_expert": False, "prompt_routing": "guidance"},
        4.0,
        False,
    ),
    ("rslora-alpha0.25", {"alpha": 0.25, "prompt_routing": "shared"}, 8.0, True),
]


def _prompt_expert(config, state, steps):
    routing = config.prompt_routing_index()
    if routing == "random":
        return prompt_experts_from_state(state, steps)
    return routing


def _batch():
    steps = PACKED_STEPS.clone()
    return {
        "input_ids": input_ids_for(steps),
        "attention_mask": (steps != PAD_STEP).long(),
        "position_ids": PACKED_POSITIONS.clone(),
    }, steps


@pytest.mark.parametrize(
    "overrides, lora_alpha, rslora", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_scaling_is_that_of_a_rank_r_expert(overrides, lora_alpha, rslora):
    config = mote_config(**overrides)
    model, _, _ = mote_model(config, lora_alpha=lora_alpha, use_rslora=rslora)
    r = config.expert_rank
    expected = lora_alpha / (r**0.5 if rslora else r)
    for name, layer in lora_layers(model).items():
        assert layer.r["default"] == config.n_blocks * r, name
        assert layer.scaling["default"] == pytest.approx(expected), name


@pytest.mark.parametrize(
    "overrides, lora_alpha, rslora", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_every_layer_matches_the_naive_formula(overrides, lora_alpha, rslora):
    config = mote_config(**overrides)
    model, state, _ = mote_model(config, lora_alpha=lora_alpha, use_rslora=rslora)
    batch, steps = _batch()
    seen = {}

    def capture(name):
        def hook(module, args, output):
            seen[name] = (args[0].detach(), output.detach())

        return hook

    layers = lora_layers(model)
    handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    with torch.no_grad(), route(state, steps, draw_key=7):
        model(**batch)
        experts = expert_per_token(steps, _prompt_expert(config, state, steps))
    for handle in handles:
        handle.remove()

    assert len(seen) == 2 * 7  # every target linear of both decoder layers ran
    flat_experts = experts.reshape(-1)
    for name, layer in layers.items():
        x, y = seen[name]  # x: [B, T, in], y: [B, T, out]
        ea, eb, sa, sb = expert_weights(layer, config)
        delta = naive_mote_delta(
            x.reshape(-1, x.shape[-1]),
            ea,
            eb,
            sa,
            sb,
            layer.scaling["default"],
            config.alpha,
            flat_experts,
        )  # [B*T, out]
        expected = layer.base_layer(x) + delta.view(*x.shape[:-1], -1)
        torch.testing.assert_close(
            y, expected, **TOL, msg=lambda m, n=name: f"{n}: {m}"
        )
        # padding tokens get exactly the base layer's output
        pad = steps == PAD_STEP
        torch.testing.assert_close(y[pad], layer.base_layer(x)[pad], atol=0, rtol=0)


@pytest.mark.parametrize(
    "overrides, lora_alpha, rslora", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_model_logits_and_grads_match_the_naive_model(overrides, lora_alpha, rslora):
    config = mote_config(**overrides)
    model, state, pristine = mote_model(
        config, lora_alpha=lora_alpha, use_rslora=rslora
    )
    _check_against_naive(config, model, state, pristine)


def test_user_rank_and_alpha_patterns_compose():
    """lora_rank_pattern / lora_alpha_pattern: per-layer expert rank and scaling."""
    config = mote_config(alpha=0.4)
    patterns = {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 6.0}}
    model, state, pristine = mote_model(config, lora_alpha=8.0, **patterns)
    for name, layer in lora_layers(model).items():
        r, scaling = (2, 3.0) if name.endswith("q_proj") else (4, 2.0)
        assert layer.r["default"] == config.n_blocks * r, name
        assert layer.scaling["default"] == pytest.approx(scaling), name
    _check_against_naive(config, model, state, pristine)


def _check_against_naive(config, model, state, pristine):
    reference, naive = naive_model(pristine, model, config)
    batch, steps = _batch()

    with route(state, steps, draw_key=3):
        logits = model(**batch).logits
        experts = expert_per_token(steps, _prompt_expert(config, state, steps))
        logits.square().mean().backward()
    set_expert_ids(naive, experts)
    ref_logits = reference(**batch).logits
    ref_logits.square().mean().backward()

    torch.testing.assert_close(logits, ref_logits, **TOL)
    # the naive model's per-expert gradients are the rank blocks' gradients
    for name, layer in lora_layers(model).items():
        module = naive[name.split("base_model.model.", 1)[-1]]
        r = layer.r["default"] // config.n_blocks
        grad_a = layer.lora_A["default"].weight.grad  # [R, in]
        grad_b = layer.lora_B["default"].weight.grad  # [out, R]
        pairs = list(zip(module.a, module.b))
        if config.shared_expert:
            pairs.append((module.shared_a, module.shared_b))
        for k, (a, b) in enumerate(pairs):
            ref_a = a.grad if a.grad is not None else torch.zeros_like(a)
            ref_b = b.grad if b.grad is not None else torch.zeros_like(b)
            torch.testing.assert_close(grad_a[k * r : (k + 1) * r], ref_a, **TOL)
            torch.testing.assert_close(grad_b[:, k * r : (k + 1) * r], ref_b, **TOL)


def test_attaching_twice_does_not_mask_twice():
    """Re-attaching replaces the hooks (a doubled mask would scale by alpha^2)."""
    from axolotl_mote.tuner.model import attach_mote

    config = mote_config(alpha=0.3, prompt_routing="shared")
    model, _, pristine = mote_model(config)
    state = attach_mote(model, config)
    reference, naive = naive_model(pristine, model, config)
    batch, steps = _batch()
    with torch.no_grad(), route(state, steps):
        logits = model(**batch).logits
    set_expert_ids(naive, expert_per_token(steps, "shared"))
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(**batch).logits, **TOL)


def test_logits_differ_when_routing_differs():
    """The check above can fail: moving one stage changes the logits of later tokens."""
    config = mote_config(prompt_routing="shared")
    model, state, _ = mote_model(config)
    batch, steps = _batch()
    moved = steps.clone()
    moved[moved == 1] = 0
    with torch.no_grad():
        with route(state, steps):
            a = model(**batch).logits
        with route(state, moved):
            b = model(**batch).logits
    assert not torch.allclose(a, b, atol=1e-4)
    # tokens before the first changed position are unaffected (causal attention)
    torch.testing.assert_close(a[0, :5], b[0, :5], **TOL)
