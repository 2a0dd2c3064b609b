"""Step skipping as attention regions == the dense step-skipping mask, exactly.

The dense mask stays the reference: on random packed, padded batches with every skip
pattern, markers hidden or kept, the regions stand for exactly the same mask, the
region attention gives the dense-mask sdpa output, and a model trained on either gives
the same loss and gradients.
"""

from __future__ import annotations

import pytest
import torch

from axolotl_mote.attention import (
    plan_regions,
    region_attention,
    regions_active,
    regions_to_mask,
)
from axolotl_mote.masks import (
    _token_roles,
    build_step_skip_mask,
    sample_hidden_stages,
    sequence_ids,
)
from tests.test_masks import MARKERS, A, G, random_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plan_and_mask(seed, p, markers_visible, B=3, T=40):
    gen = torch.Generator().manual_seed(seed)
    s, ids, pos = random_batch(gen, B=B, T=T)
    seq = sequence_ids(pos, None, s)
    hidden = sample_hidden_stages(s, seq, [A, G], p, gen)
    is_marker = (
        torch.isin(ids, torch.tensor(sorted(MARKERS))) if markers_visible else None
    )
    content, _ = _token_roles(s, seq, hidden, is_marker)
    return plan_regions(s, seq, content), build_step_skip_mask(
        s, seq, hidden, is_marker
    )


@pytest.mark.parametrize("markers_visible", [False, True], ids=["hidden", "visible"])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(8))
def test_regions_stand_for_the_dense_mask(seed, p, markers_visible):
    plan, mask = _plan_and_mask(seed, p, markers_visible)
    assert torch.equal(regions_to_mask(plan), mask)


@pytest.mark.parametrize("markers_visible", [False, True], ids=["hidden", "visible"])
@pytest.mark.parametrize("seed", range(4))
def test_region_attention_equals_dense_sdpa(seed, markers_visible):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    plan, mask = _plan_and_mask(seed, 0.6, markers_visible)
    gen = torch.Generator().manual_seed(100 + seed)
    b, h, hkv, t, d = 3, 4, 2, 40, 8
    q = torch.randn(b, h, t, d, generator=gen, requires_grad=True)
    k = torch.randn(b, hkv, t, d, generator=gen, requires_grad=True)
    v = torch.randn(b, hkv, t, d, generator=gen, requires_grad=True)
    out = region_attention(q, k, v, plan, scaling=0.3)
    ref = sdpa(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_a_model_trains_the_same_on_regions_and_on_the_dense_mask():
    """Loss and every gradient of a tiny Llama: mote_sdpa with a plan == sdpa + mask."""
    from axolotl_mote.attention import register
    from tests.helpers.tiny import loss_and_grads, tiny_llama

    gen = torch.Generator().manual_seed(3)
    s, ids, pos = random_batch(gen, B=2, T=48)
    ids = ids % 90 + 5
    seq = sequence_ids(pos, None, s)
    hidden = sample_hidden_stages(s, seq, [A, G], 0.7, gen)
    content, _ = _token_roles(s, seq, hidden, None)
    plan = plan_regions(s, seq, content)
    mask = build_step_skip_mask(s, seq, hidden, None)
    model = tiny_llama(attn_implementation="sdpa").train()
    labels = ids.masked_fill(seq == 0, -100)

    def run(**kw):
        batch = dict(input_ids=ids, position_ids=pos, labels=labels)
        return loss_and_grads(model, **batch, **kw)

    ref_loss, ref_grads = run(attention_mask=mask)
    model.set_attn_implementation(register())
    with regions_active(plan):
        loss, grads = run()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # without a plan the registered function is plain sdpa
    model.zero_grad()
    plain = model(input_ids=ids, position_ids=pos).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits, plain)
