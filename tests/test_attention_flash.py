"""Step skipping under flash attention: the regions as one varlen kernel call.

flash-attn is CUDA-only, so the kernel is ``reference_varlen_attention``, a pure-torch
stand-in written from flash-attn's documented ``flash_attn_varlen_func`` semantics
(segments by ``cu_seqlens``, causal aligned to the bottom right). Its semantics are
checked against values written here; the varlen region attention is then checked
against the dense step mask (outputs, gradients, a model's loss and gradients).
"""

from __future__ import annotations

import pytest
import torch

from axolotl_mote.attention import (
    install_flash_regions,
    reference_varlen_attention,
    regions_active,
    regions_to_mask,
    uses_regions,
    varlen_region_attention,
)
from tests.test_attention import _plan_and_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_stand_in_is_bottom_right_causal_per_segment():
    """Zero keys give uniform weights, so each output is the mean of the values its
    query may see: segment 0 has 2 queries over 3 keys (bottom right: query 0 sees
    keys 0-1, query 1 sees 0-2); segment 1 has 1 query over 1 key."""
    q = torch.zeros(3, 1, 1)
    k = torch.zeros(4, 1, 1)
    v = torch.tensor([1.0, 2.0, 4.0, 10.0]).view(4, 1, 1)
    cu_q = torch.tensor([0, 2, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 4], dtype=torch.int32)
    out = reference_varlen_attention(q, k, v, cu_q, cu_k, 2, 3, causal=True)
    assert out.flatten().tolist() == pytest.approx([1.5, 7 / 3, 10.0])
    full = reference_varlen_attention(q, k, v, cu_q, cu_k, 2, 3, causal=False)
    assert full.flatten().tolist() == pytest.approx([7 / 3, 7 / 3, 10.0])


@pytest.mark.parametrize("markers_visible", [False, True], ids=["hidden", "visible"])
@pytest.mark.parametrize("seed", range(4))
def test_varlen_regions_equal_dense_sdpa(seed, markers_visible):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    plan, mask = _plan_and_mask(seed, 0.6, markers_visible)
    assert plan.pad  # padding queries are covered too
    gen = torch.Generator().manual_seed(200 + seed)
    b, h, hkv, t, d = 3, 4, 2, 40, 8
    q = torch.randn(b, h, t, d, generator=gen, requires_grad=True)
    k = torch.randn(b, hkv, t, d, generator=gen, requires_grad=True)
    v = torch.randn(b, hkv, t, d, generator=gen, requires_grad=True)
    out = varlen_region_attention(q, k, v, plan, reference_varlen_attention, 0.3)
    ref = sdpa(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.fixture()
def cpu_flash(monkeypatch):
    """``flash_attention_2`` on CPU: transformers' registered flash function replaced
    by its sdpa one (the no-plan path), restored after the test."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mapping = AttentionInterface._global_mapping
    monkeypatch.setitem(mapping, "flash_attention_2", sdpa_attention_forward)
    return "flash_attention_2"


def test_a_flash_model_trains_on_the_regions_like_the_dense_mask(cpu_flash):
    """A tiny Llama whose attention is flash (stand-in kernel): with a plan, its loss
    and every gradient are the dense step mask's; without one, plain attention."""
    from tests.helpers.tiny import loss_and_grads, tiny_llama
    from tests.test_attention_threads import _batch

    ids, pos, seq, plan, mask = _batch(seed=5)
    model = tiny_llama(attn_implementation="sdpa").train()
    labels = ids.masked_fill(seq == 0, -100)

    def run(**kw):
        batch = dict(input_ids=ids, position_ids=pos, labels=labels)
        return loss_and_grads(model, **batch, **kw)

    ref_loss, ref_grads = run(attention_mask=mask)
    plain = model(input_ids=ids, position_ids=pos).logits.detach()
    model.config._attn_implementation = cpu_flash
    assert not uses_regions(model)
    install_flash_regions(cpu_flash, varlen=reference_varlen_attention)
    assert uses_regions(model)
    with regions_active(plan, expected=True):
        loss, grads = run()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits, plain)
    assert torch.equal(regions_to_mask(plan), mask)


def test_flash_config_keeps_step_skipping_on():
    """flash_attention: true resolves to p = 0.3 and the regions backend; an explicit
    p > 0 is accepted (it was a config error)."""
    from axolotl_mote.args import MoteOptions, _cross_key_problems, step_skip_backend
    from axolotl_mote.settings import resolve_settings

    settings = resolve_settings(
        {"mote": {}, "flash_attention": True, "lora_r": 4, "seed": 1}
    )
    assert settings.attn_implementation == "flash_attention_2"
    assert settings.step_skip_prob == 0.3 and settings.step_skip_note is None
    assert step_skip_backend("flash_attention_3") == "regions"
    assert step_skip_backend("xformers") is None
    data = {"adapter": "lora", "flash_attention": True}
    assert _cross_key_problems(data, MoteOptions(step_skip_prob=0.5)) == []
    assert _cross_key_problems(
        {"adapter": "lora", "xformers_attention": True}, MoteOptions(step_skip_prob=0.5)
    )


@pytest.mark.slow
def test_axolotl_train_with_flash_attention_step_skips(
    tiny_model_dir, tmp_path, reset_plugins, monkeypatch, cpu_flash
):
    """``flash_attention: true`` with packing through the real ``axolotl train``: every
    training batch runs step skipping as regions through the varlen kernel (the CPU
    stand-in), and every layer's attention equals sdpa under the dense step mask of
    that batch.

    CPU has no flash-attn: transformers' flash availability checks are switched off and
    its registered flash function is its sdpa one (``cpu_flash``); the rest is real.
    """
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from transformers import modeling_utils

    import axolotl_mote.attention as attention
    from tests.helpers.train import base_config, run_train

    monkeypatch.setattr(
        modeling_utils.PreTrainedModel,
        "_check_and_adjust_attn_implementation",
        lambda self, impl, *a, **k: impl or "sdpa",
    )
    checked: list[int] = []

    def varlen_checked(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        return reference_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    def regions_checked(query, key, value, plan, varlen, scaling=None, dropout=0.0):
        out = varlen_region_attention(query, key, value, plan, varlen, scaling, dropout)
        mask = regions_to_mask(plan, query.device)
        ref = sdpa(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-4)
        checked.append(sum(bool(r.prefix) for r in plan.regions))
        return out

    monkeypatch.setattr(attention, "_flash_varlen", lambda impl: varlen_checked)
    monkeypatch.setattr(attention, "varlen_region_attention", regions_checked)
    cfg = base_config(
        tiny_model_dir, tmp_path, sample_packing=True, max_steps=2,
        attn_implementation=None, flash_attention=True,
        mote={"template": "aligncot", "step_skip_prob": 0.9},
    )  # fmt: skip
    cfg.pop("attn_implementation")
    run_train(cfg, tmp_path)
    assert checked, "flash attention never ran step-skipping regions"
    assert len(checked) % 2 == 0  # every layer of the tiny model, every step
    assert sum(checked) > 0  # p = 0.9: some region sees a gathered prefix


def test_a_kernel_without_dropout_is_called_without_it():
    """flash-attn 3's varlen kernel takes no ``dropout_p``: at dropout 0 (every Llama)
    it must not be passed; the keyword arguments are the documented ones."""
    plan, _ = _plan_and_mask(0, 0.6, False)
    calls = []

    def fa3_like(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        calls.append(causal)
        kw = dict(softmax_scale=softmax_scale, causal=causal)
        return reference_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    q = torch.randn(3, 4, 40, 8)
    kv = torch.randn(3, 2, 40, 8)
    out = varlen_region_attention(q, kv, kv, plan, fa3_like, 0.3)
    assert calls == [True] and out.shape == (3, 40, 4, 8)
