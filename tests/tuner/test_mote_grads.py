"""Which parameters learn: routed blocks only, exact zeros elsewhere, frozen base.

Also: gradient checkpointing recomputes through the routing hooks with the same state,
so loss and gradients are those of a run without it.
"""

from __future__ import annotations

import pytest
import torch

from axolotl_mote.constants import PAD_STEP
from axolotl_mote.routing import RoutingError, route
from tests.helpers.tiny import (
    PACKED_POSITIONS,
    P,
    X,
    input_ids_for,
    lora_layers,
    mote_config,
    mote_model,
)

# (case id, MoteConfig overrides, step ids [2, 16], blocks with tokens, blocks without)
# Blocks are numbered like the rank dimension: 0..2 the stages, 3 the shared expert.
GRAD_CASES = [
    (
        "stages-0-2-prompt-shared",
        {"prompt_routing": "shared"},
        [[P, P, 0, 0, 2, 2, P, 0, 2, X], [P, 0, 0, 0, 2, 2, 2, 2, X, X]],
        {0, 2, 3},
        {1},
    ),
    (
        "prompt-to-guidance",
        {"prompt_routing": "guidance", "alpha": 0.7},
        [[P, P, P, 0, 0, 0, P, P, 0, 0], [P, P, 0, 0, 0, 0, 0, 0, X, X]],
        {0, 1, 3},
        {2},
    ),
    (
        "no-shared-answer-only",
        {"shared_expert": False, "prompt_routing": "answer"},
        [[P, P, 2, 2, 2, 2, 2, 2, X, X], [P, 2, 2, 2, 2, 2, 2, 2, 2, 2]],
        {2},
        {0, 1},
    ),
    (
        "all-stages-no-shared",
        {"shared_expert": False, "prompt_routing": "analysis"},
        [[P, 0, 1, 2, 2, X, X, X, X, X], [P, P, 1, 1, 1, 1, 1, 1, 1, 1]],
        {0, 1, 2},
        set(),
    ),
]


def _loss(model, steps, **kwargs):
    ids = input_ids_for(steps)
    labels = ids.masked_fill(steps == PAD_STEP, -100)
    out = model(
        input_ids=ids,
        attention_mask=(steps != PAD_STEP).long(),
        labels=labels,
        **kwargs,
    )
    return out.loss


def _block(weight_grad_a, weight_grad_b, k, r):
    return weight_grad_a[k * r : (k + 1) * r], weight_grad_b[:, k * r : (k + 1) * r]


@pytest.mark.parametrize(
    "overrides, steps, used, unused",
    [c[1:] for c in GRAD_CASES],
    ids=[c[0] for c in GRAD_CASES],
)
def test_only_blocks_with_tokens_get_gradients(overrides, steps, used, unused):
    config = mote_config(**overrides)
    model, state, _ = mote_model(config)
    steps = torch.tensor(steps)
    with route(state, steps):
        _loss(model, steps).backward()

    r = config.expert_rank
    layers = lora_layers(model)
    assert layers
    for name, layer in layers.items():
        ga = layer.lora_A["default"].weight.grad  # [R, in]
        gb = layer.lora_B["default"].weight.grad  # [out, R]
        assert ga is not None and gb is not None, name
        for k in used:
            a, b = _block(ga, gb, k, r)
            assert a.abs().sum() > 0 and b.abs().sum() > 0, f"{name}: block {k} no grad"
        for k in unused:
            a, b = _block(ga, gb, k, r)
            # exact zeros (not None): DDP / ZeRO-3 see every parameter every step
            assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == 0, (
                f"{name}: unused block {k} got a gradient"
            )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, f"frozen {n} got a gradient"


@pytest.mark.parametrize(
    "overrides",
    [{}, {"shared_expert": False}, {"alpha": 0.2, "prompt_routing": "answer"}],
    ids=["shared", "no-shared", "alpha0.2-prompt-answer"],
)
def test_each_token_reaches_only_its_expert_and_the_shared_one(overrides):
    """Per token: d y_t / d(block k) != 0 exactly for k in {expert(t), shared}."""
    config = mote_config(**overrides)
    model, state, _ = mote_model(config)
    layer = lora_layers(model)["base_model.model.model.layers.1.mlp.down_proj"]
    a_w, b_w = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    steps = torch.tensor([[0, 1, 2, X, 2, 0], [1, 1, 0, 2, X, X]])
    prompt = {"answer": 2}.get(config.prompt_routing)
    if prompt is not None:
        steps[1, 0] = P
    x = torch.randn(2, 6, layer.in_features)  # [B, T, in]
    r, shared_block = config.expert_rank, config.num_experts
    with route(state, steps):
        for b in range(2):
            for t in range(6):
                a_w.grad = b_w.grad = None
                layer(x)[b, t].sum().backward()
                step = int(steps[b, t])
                expert = prompt if step == P else step
                want = set() if step == X else {expert}
                if config.shared_expert and step != X:
                    want.add(shared_block)
                for k in range(config.n_blocks):
                    ga, gb = _block(a_w.grad, b_w.grad, k, r)
                    if k in want:
                        assert ga.abs().sum() > 0 and gb.abs().sum() > 0, (b, t, k)
                    else:
                        assert not ga.any() and not gb.any(), (b, t, step, k)


def _build_and_step(use_checkpointing: bool, reentrant: bool, counter: list):
    config = mote_config(alpha=0.4)
    model, state, _ = mote_model(config)
    model.train()  # HF checkpoints only in training mode (dropout is 0)
    model.enable_input_require_grads()
    if use_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )
    hooked = next(iter(lora_layers(model).values()))  # the LoRA layer, on any path
    hooked.register_forward_pre_hook(lambda m, a: counter.append(1))
    steps = torch.tensor([[P, P, 0, 0, 1, 1, 2, 2, P, 0, 2, X]])
    with route(state, steps, draw_key=11):
        loss = _loss(model, steps, position_ids=PACKED_POSITIONS[:1, :12])
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, state, steps, loss.detach(), grads


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(reentrant):
    calls_off, calls_on = [], []
    _, _, _, loss_off, grads_off = _build_and_step(False, reentrant, calls_off)
    _, _, _, loss_on, grads_on = _build_and_step(True, reentrant, calls_on)
    # the layer really was recomputed (its routing hook ran twice) ...
    assert len(calls_off) == 1 and len(calls_on) == 2
    # ... with the same routing: same loss and same gradients
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-6)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for name in grads_off:
        torch.testing.assert_close(
            grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5
        )
    assert any(g.abs().sum() > 0 for g in grads_on.values())


def test_recomputation_without_routing_state_raises():
    """Clearing the state before backward is caught, never recomputed unrouted."""
    model, state, steps, _, _ = _build_and_step(True, False, [])
    state.set(steps)
    loss = _loss(model, steps)
    state.clear()
    with pytest.raises(RoutingError, match="without step ids"):
        loss.backward()
