"""The masked path's fused form (one ``addmm``) == PEFT's module form.

``tuner/layer.py`` folds PEFT's scaling into the rank mask and adds the delta to the
base output inside the GEMM (``torch.addmm``) where it may: no ``lora_B`` bias, no
ZeRO-3 partitioned weights, matching dtypes or autocast. Checked on the tiny packed
batch (prompt runs, every stage, padding) in fp32: the loss, the input gradient and
every LoRA weight gradient equal the module form's ``result + lora_B(h ⊙ mask) · s``
(``RoutingState.fast_path`` off), for each routing case, and every layer took the
``addmm``; a ``lora_B`` bias keeps the module form (its bias scaled, as in
PEFT); under bf16 autocast the fused form runs in bf16 and follows fp32.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from axolotl_mote.routing import route
from axolotl_mote.tuner import layer as layer_mod
from tests.helpers.tiny import (
    PACKED_POSITIONS,
    PACKED_STEPS,
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
    ("prompt-expected", {"prompt_routing": "expected", "alpha": 0.8}, False),
    ("no-shared", {"shared_expert": False, "prompt_routing": "guidance"}, False),
    ("rslora-random", {"alpha": 0.25}, True),
    ("single", {"experts": "single"}, False),
]


def _loss_and_grads(model, state, fused: bool):
    """Loss, embedding-output gradient, every LoRA gradient and the ``addmm`` calls,
    one form forced (``RoutingState.fast_path`` off: PEFT's module form)."""
    model.zero_grad(set_to_none=True)
    state.fast_path = fused
    ids = input_ids_for(PACKED_STEPS)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    spy = mock.patch.object(torch, "addmm", wraps=torch.addmm)
    with spy as addmm, route(state, PACKED_STEPS, draw_key=7):
        loss = model(
            inputs_embeds=embeds, position_ids=PACKED_POSITIONS, labels=ids
        ).loss
        loss.backward()
    state.fast_path = True
    grads = {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return loss.detach(), embeds.grad.detach().clone(), grads, addmm.call_count


@pytest.mark.parametrize("case,overrides,rslora", CASES, ids=[c[0] for c in CASES])
def test_fused_equals_module_form_loss_and_every_gradient(case, overrides, rslora):
    model, state, _ = mote_model(mote_config(**overrides), use_rslora=rslora)
    model.train()
    loss_m, gx_m, grads_m, calls_m = _loss_and_grads(model, state, fused=False)
    loss_f, gx_f, grads_f, calls_f = _loss_and_grads(model, state, fused=True)
    assert calls_m == 0 and calls_f == len(lora_layers(model))  # every layer fused
    torch.testing.assert_close(loss_f, loss_m, **TOL)
    torch.testing.assert_close(gx_f, gx_m, **TOL)
    assert grads_f.keys() == grads_m.keys()
    assert any("lora_A" in n for n in grads_f) and any("lora_B" in n for n in grads_f)
    for name in grads_m:
        torch.testing.assert_close(grads_f[name], grads_m[name], **TOL, msg=name)


def test_fused_only_where_it_may():
    model, _, _ = mote_model(mote_config())
    layer = next(iter(lora_layers(model).values()))
    lora_b = layer.lora_B["default"]
    h = torch.zeros(2, 3, lora_b.in_features)
    result = torch.zeros(2, 3, lora_b.out_features)
    assert layer_mod._fusable(lora_b, result, h)
    assert not layer_mod._fusable(lora_b, result.double(), h)  # PEFT promotes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer_mod._fusable(lora_b, result.bfloat16(), h.bfloat16())
        assert not layer_mod._fusable(lora_b, result, h.bfloat16())  # would round
    lora_b.weight.ds_id = 3  # a ZeRO-3 partitioned weight: only the module gathers it
    assert not layer_mod._fusable(lora_b, result, h)
    del lora_b.weight.ds_id
    hook = lora_b.register_forward_pre_hook(lambda m, a: None)  # FSDP2 unshards so
    assert not layer_mod._fusable(lora_b, result, h)
    hook.remove()
    assert layer_mod._fusable(lora_b, result, h)


def test_lora_b_bias_keeps_the_module_form_with_its_bias_scaled():
    """PEFT scales lora_B's bias with the delta; the module form keeps that."""
    config = mote_config(prompt_routing="answer")
    model, state, _ = mote_model(config, lora_bias=True)
    layer = next(iter(lora_layers(model).values()))
    with torch.no_grad():
        layer.lora_B["default"].bias.fill_(0.5)
    assert not layer_mod._fusable(
        layer.lora_B["default"],
        torch.zeros(1, 1, layer.out_features),
        torch.zeros(1, 1, layer.lora_B["default"].in_features),
    )
    steps = torch.tensor([[0, 1, 2]])
    x = torch.randn(1, 3, layer.in_features)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"]
    s = layer.scaling["default"]
    with route(state, steps), torch.enable_grad():
        got = layer(x)
        mask = state.rank_mask(config.expert_rank, torch.float32, x.device)
    want = layer.base_layer(x) + b((x @ a.T) * mask) * s
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_autocast_output_is_close_to_fp32():
    """bf16 autocast: the fused ``addmm`` runs in bf16 and follows fp32."""
    model, state, _ = mote_model(mote_config())
    ids = input_ids_for(PACKED_STEPS)
    layer = next(iter(lora_layers(model).values()))
    seen = {}
    hook = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.dtype))
    with route(state, PACKED_STEPS), torch.enable_grad():
        want = model(input_ids=ids, position_ids=PACKED_POSITIONS).logits.detach()
        spy = mock.patch.object(torch, "addmm", wraps=torch.addmm)
        with spy as addmm, torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(input_ids=ids, position_ids=PACKED_POSITIONS).logits
        got.float().sum().backward()
    hook.remove()
    assert addmm.call_count == len(lora_layers(model))  # fused under autocast too
    assert seen["out"] == torch.bfloat16 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
    grad = layer.lora_A["default"].weight.grad
    assert grad.dtype == torch.float32 and torch.count_nonzero(grad) > 0
