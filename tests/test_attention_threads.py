"""The step-skipping plan survives backward on another thread and recomputation.

On CUDA, autograd runs backward on a worker thread per device, and gradient
checkpointing recomputes the forward there. These tests run ``backward()`` on a second
thread (the CPU stand-in for that worker) while the plan is held on the first, under
``torch.utils.checkpoint`` in both reentrant modes and under transformers' gradient
checkpointing, and require the dense-mask gradients. A plan held in a ``ContextVar``
(the earlier design) fails all of them: reentrant recomputation silently runs plain
causal attention, non-reentrant raises ``CheckpointError``.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from axolotl_mote.attention import (
    PlanMissingError,
    mote_sdpa_attention,
    plan_regions,
    plans_expected,
    regions_active,
    register,
)
from axolotl_mote.masks import (
    _token_roles,
    build_step_skip_mask,
    sample_hidden_stages,
    sequence_ids,
)
from tests.test_masks import A, G, random_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _on_thread(fn):
    """Run ``fn`` on a new thread (empty context, like autograd's device thread)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller
            box["error"] = err

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _batch(seed=3, B=2, T=48):
    gen = torch.Generator().manual_seed(seed)
    s, ids, pos = random_batch(gen, B=B, T=T)
    seq = sequence_ids(pos, None, s)
    hidden = sample_hidden_stages(s, seq, [A, G], 0.7, gen)
    content, _ = _token_roles(s, seq, hidden, None)
    plan = plan_regions(s, seq, content)
    mask = build_step_skip_mask(s, seq, hidden, None)
    assert not torch.equal(mask, build_step_skip_mask(s, seq, hidden & False, None))
    return ids % 90 + 5, pos, seq, plan, mask


class _Attn(torch.nn.Module):
    """What ``mote_sdpa_attention`` reads of an attention module."""

    is_causal = True


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointed_region_attention_backward_on_another_thread(reentrant):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    _, _, _, plan, mask = _batch()
    gen = torch.Generator().manual_seed(7)
    b, h, hkv, t, d = 2, 4, 2, 48, 8
    leaves = [
        torch.randn(b, heads, t, d, generator=gen, requires_grad=True)
        for heads in (h, hkv, hkv)
    ]
    module = _Attn().train()

    def attend(q, k, v):
        return mote_sdpa_attention(module, q, k, v, None, scaling=0.3)[0]

    ref = sdpa(*leaves, attn_mask=mask, scale=0.3, enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    with regions_active(plan, expected=True):
        out = checkpoint(attend, *leaves, use_reentrant=reentrant)
        _on_thread(out.square().sum().backward)
    grads = [leaf.grad for leaf in leaves]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def _llama():
    from tests.helpers.tiny import tiny_llama

    return tiny_llama(attn_implementation="sdpa")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_transformers_gradient_checkpointing_backward_on_another_thread(reentrant):
    """A tiny Llama with transformers' gradient checkpointing, backward on a second
    thread: loss and every gradient equal the dense step mask's (no checkpointing)."""
    ids, pos, seq, plan, mask = _batch()
    labels = ids.masked_fill(seq == 0, -100)
    model = _llama().train()

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss = model(
        input_ids=ids, position_ids=pos, labels=labels, attention_mask=mask
    ).loss
    ref_loss.backward()
    ref = grads()
    model.zero_grad()
    model.set_attn_implementation(register())
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    with regions_active(plan, expected=True):
        loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
        _on_thread(loss.backward)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name, g in grads().items():
        torch.testing.assert_close(g, ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_recomputation_without_a_visible_plan_raises():
    """The plan dropped between forward and backward: the recomputation must not run
    plain causal attention."""
    ids, pos, seq, plan, _ = _batch()
    model = _llama().train()
    model.set_attn_implementation(register())
    model.gradient_checkpointing_enable({"use_reentrant": False})
    with plans_expected():  # what MoteTrainer.train holds for a step-skipping run
        with regions_active(plan):
            loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
        with pytest.raises(PlanMissingError, match="no step-skipping plan"):
            loss.backward()
        with pytest.raises(PlanMissingError):  # a training forward outside a step
            model(input_ids=ids, position_ids=pos)
    model(input_ids=ids, position_ids=pos)  # not expected: plain attention


def test_no_plan_outside_training_is_plain_attention():
    """Evaluation (eval mode) under an expecting trainer is plain sdpa, no error."""
    ids, pos, _, _, _ = _batch()
    model = _llama().eval()
    plain = model(input_ids=ids, position_ids=pos).logits
    model.set_attn_implementation(register())
    with plans_expected(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits, plain)
