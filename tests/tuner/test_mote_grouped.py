"""The grouped path (each token through its own blocks) == the masked path.

``tuner/grouped.py`` is the training path for mixed batches: the tokens are sorted by
step expert and each group meets only its own rank block. Checked here on the tiny
packed batch (prompt runs, every stage, padding), in fp32: the loss, the input gradient
and every LoRA weight gradient equal the masked path's (``RoutingState.fast_path``
off) for each routing case; the grouped path is taken (its Function is in the graph)
or not (``expected`` routing, ``experts: single``, a ``lora_B`` bias); an expert
without tokens gets an exact zero gradient; autocast runs it in the autocast dtype.
"""

from __future__ import annotations

import pytest
import torch

from axolotl_mote.routing import RoutingState, route
from axolotl_mote.tuner.grouped import RoutedLora
from tests.helpers.tiny import (
    PACKED_POSITIONS,
    PACKED_STEPS,
    P,
    X,
    input_ids_for,
    lora_layers,
    mote_config,
    mote_model,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}

# (case id, MoteConfig overrides, use_rslora)
CASES = [
    ("paper-random", {}, False),
    ("prompt-shared-alpha0.3", {"prompt_routing": "shared", "alpha": 0.3}, False),
    ("prompt-answer", {"prompt_routing": "answer", "alpha": 0.8}, False),
    ("no-shared", {"shared_expert": False, "prompt_routing": "guidance"}, False),
    ("rslora-random", {"alpha": 0.25}, True),
]


def _loss_and_grads(model, state: RoutingState, grouped: bool, steps=PACKED_STEPS):
    """Loss, embedding-output gradient and every LoRA gradient, one path forced."""
    model.zero_grad(set_to_none=True)
    state.fast_path = grouped
    ids = input_ids_for(steps)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with route(state, steps, draw_key=7):
        out = model(
            inputs_embeds=embeds, position_ids=PACKED_POSITIONS, labels=ids
        ).loss
        out.backward()
    grads = {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    state.fast_path = True
    return out.detach(), embeds.grad.detach().clone(), grads


def _uses_grouped(model, state: RoutingState, steps=PACKED_STEPS) -> bool:
    """Whether the forward's autograd graph holds the grouped Function."""
    ids = input_ids_for(steps)
    with route(state, steps):
        loss = model(input_ids=ids, labels=ids).loss
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == f"{RoutedLora.__name__}Backward":
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


@pytest.mark.parametrize("case,overrides,rslora", CASES, ids=[c[0] for c in CASES])
def test_grouped_equals_masked_loss_and_every_gradient(case, overrides, rslora):
    model, state, _ = mote_model(mote_config(**overrides), use_rslora=rslora)
    model.train()
    assert _uses_grouped(model, state)
    loss_m, gx_m, grads_m = _loss_and_grads(model, state, grouped=False)
    loss_g, gx_g, grads_g = _loss_and_grads(model, state, grouped=True)
    torch.testing.assert_close(loss_g, loss_m, **TOL)
    torch.testing.assert_close(gx_g, gx_m, **TOL)
    assert grads_g.keys() == grads_m.keys()
    assert any("lora_A" in n for n in grads_g) and any("lora_B" in n for n in grads_g)
    for name in grads_m:
        torch.testing.assert_close(grads_g[name], grads_m[name], **TOL, msg=name)


def test_an_expert_without_tokens_gets_an_exact_zero_gradient():
    """Only stage 0 and prompt-to-answer: the guidance block (1) sees no token."""
    steps = torch.tensor([[P, P, 0, 0, 0, 2, 2, X], [P, 0, 0, 2, 2, 2, X, X]])
    config = mote_config(prompt_routing="answer")
    model, state, _ = mote_model(config)
    r = config.expert_rank
    ids = input_ids_for(steps)
    with route(state, steps):
        model(input_ids=ids, labels=ids).loss.backward()
    for layer in lora_layers(model).values():
        ga = layer.lora_A["default"].weight.grad
        gb = layer.lora_B["default"].weight.grad
        assert torch.count_nonzero(ga[r : 2 * r]) == 0
        assert torch.count_nonzero(gb[:, r : 2 * r]) == 0
        assert torch.count_nonzero(ga[:r]) > 0 and torch.count_nonzero(ga[2 * r :]) > 0


@pytest.mark.parametrize(
    "case,overrides,lora_kwargs",
    [
        ("expected-prompt", {"prompt_routing": "expected"}, {}),
        ("single", {"experts": "single"}, {}),
        ("lora-b-bias", {}, {"lora_bias": True}),
    ],
)
def test_masked_path_where_grouping_does_not_apply(case, overrides, lora_kwargs):
    model, state, _ = mote_model(mote_config(**overrides), **lora_kwargs)
    assert not _uses_grouped(model, state)


def test_switched_off_fast_path_takes_the_masked_path():
    model, state, _ = mote_model(mote_config())
    state.fast_path = False
    assert not _uses_grouped(model, state)


def test_autocast_runs_in_the_autocast_dtype_and_returns_weight_dtype_grads():
    model, state, _ = mote_model(mote_config())
    ids = input_ids_for(PACKED_STEPS)
    layer = next(iter(lora_layers(model).values()))
    seen = {}
    hook = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.dtype))
    with route(state, PACKED_STEPS), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    with route(state, PACKED_STEPS):
        loss.backward()
    hook.remove()
    assert seen["out"] == torch.bfloat16
    grad = layer.lora_A["default"].weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert torch.count_nonzero(grad) > 0


@pytest.mark.parametrize("fast_path", [True, False], ids=["grouped", "masked"])
def test_autocast_output_is_close_to_fp32_on_both_paths(fast_path):
    """bf16 autocast: the fused masked ``addmm`` and the grouped path follow fp32."""
    model, state, _ = mote_model(mote_config())
    state.fast_path = fast_path
    ids = input_ids_for(PACKED_STEPS)
    with route(state, PACKED_STEPS), torch.no_grad():
        want = model(input_ids=ids, position_ids=PACKED_POSITIONS).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(input_ids=ids, position_ids=PACKED_POSITIONS).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
