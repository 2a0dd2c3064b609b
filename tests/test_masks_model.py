"""Step-skipping masks inside a real (tiny, fp32) Llama forward and backward.

These check what the unit tests cannot: that transformers 5.16 applies our 4D mask as-is
for sdpa and eager (and our BlockMask for flex_attention), and that hiding is exact: the
answer's loss has a zero gradient with respect to a hidden stage.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP
from axolotl_mote.masks import (
    DENSE_BACKENDS,
    build_step_skip_mask,
    sequence_ids,
    step_skipping,
)

Q, A, G, ANS, PAD = PROMPT_STEP, 0, 1, 2, PAD_STEP
MARKERS = {120, 121, 122, 123, 124, 125}
DENSE = ["sdpa", "eager"]


def tiny_llama(attn: str):
    from axolotl_mote.tiny import random_llama

    return random_llama(128, hidden_size=64, attn_implementation=attn).eval()


@pytest.fixture(scope="module", params=DENSE)
def model(request):
    return tiny_llama(request.param)


def chain_tensors(lengths=((Q, 3), (A, 5), (G, 4), (ANS, 5))):
    """One chain: step ids, input ids with start/end markers on every stage."""
    torch.manual_seed(1)
    steps, ids = [], []
    for step, n in lengths:
        steps += [step] * n
        body = torch.randint(0, 100, (n,)).tolist()
        if step >= 0:
            body[0], body[-1] = 120 + 2 * step, 121 + 2 * step
        ids += body
    return torch.tensor([steps]), torch.tensor([ids])


def skip(inputs, steps, attn, hideable, p=1.0, visible=False, shift=False):
    return step_skipping(
        inputs,
        step_ids=steps,
        hideable=hideable,
        p=p,
        generator=torch.Generator().manual_seed(0),
        marker_ids=MARKERS,
        markers_visible=visible,
        shift_positions=shift,
        attn_implementation=attn,
    )[0]


def answer_grad(model, steps, ids, batch) -> torch.Tensor:
    """|d answer loss / d input embedding| per token, [T]."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
    logits = model(inputs_embeds=embeds, **kwargs).logits  # [1, T, V]
    at = steps[0] == ANS
    target = torch.randint(
        0, 128, (int(at.sum()),), generator=torch.Generator().manual_seed(2)
    )
    F.cross_entropy(logits[0, at], target).backward()
    return embeds.grad[0].abs().sum(-1)  # [T]


@pytest.mark.parametrize(
    "visible", [False, True], ids=["markers_hidden", "markers_visible"]
)
@pytest.mark.parametrize("shift", [False, True], ids=["keep", "shift"])
def test_hidden_stage_gets_exactly_zero_gradient(model, visible, shift):
    attn = model.config._attn_implementation
    steps, ids = chain_tensors()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    is_marker = torch.isin(ids[0], torch.tensor(sorted(MARKERS)))
    a, g = steps[0] == A, steps[0] == G
    # analysis hidden, guidance not
    grad = answer_grad(
        model, steps, ids, skip(inputs, steps, attn, [A], visible=visible, shift=shift)
    )
    content = a & ~is_marker if visible else a
    assert (grad[content] == 0).all()
    assert (grad[g] > 0).all() and (grad[steps[0] == Q] > 0).all()
    if visible:
        assert (grad[a & is_marker] > 0).all()
    # guidance hidden instead: now the analysis does reach the answer
    grad = answer_grad(
        model, steps, ids, skip(inputs, steps, attn, [G], visible=visible, shift=shift)
    )
    assert (grad[a] > 0).all()
    assert (grad[g & ~is_marker if visible else g] == 0).all()
    # no skipping: everything reaches the answer
    grad = answer_grad(model, steps, ids, skip(inputs, steps, attn, [A, G], p=0.0))
    assert (grad > 0).all()


def test_nothing_hidden_equals_plain_causal(model):
    attn = model.config._attn_implementation
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (2, 12))
    steps = torch.tensor([[Q] * 3 + [A] * 3 + [G] * 3 + [ANS] * 3] * 2)
    seq = sequence_ids(None, None, steps)
    nothing = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask = DENSE_BACKENDS[attn](
        build_step_skip_mask(steps, seq, nothing), torch.float32
    )
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        masked = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-5)
    # right padding: real tokens match the plain 2D-mask forward
    steps[1, 8:] = PAD
    two_d = (steps != PAD).long()
    seq = sequence_ids(None, two_d, steps)
    mask = DENSE_BACKENDS[attn](
        build_step_skip_mask(steps, seq, nothing), torch.float32
    )
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=two_d).logits
        masked = model(input_ids=ids, attention_mask=mask).logits
    real = steps != PAD
    torch.testing.assert_close(masked[real], plain[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("shift", [False, True], ids=["keep", "shift"])
def test_packed_equals_separate_sequences(model, shift):
    attn = model.config._attn_implementation
    parts = [
        chain_tensors(((Q, 2), (A, 4), (G, 3), (ANS, 3))),
        chain_tensors(((Q, 4), (G, 3), (ANS, 4))),
        chain_tensors(((Q, 1), (A, 3), (ANS, 2))),
    ]
    steps = torch.cat([s for s, _ in parts], 1)
    ids = torch.cat([i for _, i in parts], 1)
    pos = torch.cat([torch.arange(s.shape[1])[None] for s, _ in parts], 1)
    packed = skip(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": pos},
        steps,
        attn,
        [A, G],
        shift=shift,
    )
    with torch.no_grad():
        logits = model(**packed).logits[0]
        start = 0
        for s, i in parts:
            alone = skip({"input_ids": i}, s, attn, [A, G], shift=shift)
            ref = model(**alone).logits[0]
            n = s.shape[1]
            torch.testing.assert_close(
                logits[start : start + n], ref, rtol=0, atol=1e-5
            )
            start += n


def test_shift_makes_a_hidden_stage_equal_a_truly_skipped_one(model):
    """skip_positions: shift. Hiding analysis gives the later tokens exactly the logits
    of the chain written without it (what inference sees); keep leaves a positional
    gap."""
    attn = model.config._attn_implementation
    steps, ids = chain_tensors()
    kept = steps[0] != A
    with torch.no_grad():
        short = model(input_ids=ids[:, kept]).logits[0]  # the chain with no analysis
        later = (steps[0] == G) | (steps[0] == ANS)
        short_later = short[(steps[0][kept] == G) | (steps[0][kept] == ANS)]
        shifted = model(
            **skip({"input_ids": ids}, steps, attn, [A], shift=True)
        ).logits[0]
        gapped = model(
            **skip({"input_ids": ids}, steps, attn, [A], shift=False)
        ).logits[0]
    torch.testing.assert_close(shifted[later], short_later, rtol=0, atol=1e-5)
    assert (gapped[later] - short_later).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_train_with_finite_gradients(model, side):
    """Padding queries attend to themselves: no empty softmax row, no NaN anywhere."""
    attn = model.config._attn_implementation
    steps, ids = chain_tensors()
    pad_steps, pad_ids = torch.full((1, 4), PAD), torch.zeros(1, 4, dtype=torch.long)
    order = (
        (lambda x, y: torch.cat([y, x], 1))
        if side == "left"
        else (lambda x, y: torch.cat([x, y], 1))
    )
    steps, ids = order(steps, pad_steps), order(ids, pad_ids)
    batch = skip(
        {"input_ids": ids, "attention_mask": (steps != PAD).long()},
        steps,
        attn,
        [A, G],
        shift=True,
    )
    model.zero_grad()
    logits = model(**batch).logits
    labels = torch.where(steps == PAD, -100, ids)
    loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    model.zero_grad()


def test_eager_needs_the_additive_mask():
    """Why eager gets a float mask: eager *adds* attention_mask to the scores."""
    steps, ids = chain_tensors()
    sdpa, eager = tiny_llama("sdpa"), tiny_llama("eager")
    seq = sequence_ids(None, None, steps)
    hidden = torch.tensor([[[False, False], [True, False]]])
    mask = build_step_skip_mask(steps, seq, hidden)
    with torch.no_grad():
        ref = sdpa(input_ids=ids, attention_mask=mask).logits
        ok = eager(
            input_ids=ids, attention_mask=DENSE_BACKENDS["eager"](mask, torch.float32)
        )
        wrong = eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ok.logits, ref, rtol=0, atol=1e-5)
    assert (wrong - ref).abs().max() > 1e-2


def _flex_or_skip() -> None:
    from transformers.utils import is_torch_flex_attn_available

    if not is_torch_flex_attn_available():
        pytest.skip("torch has no flex_attention")
    try:
        from torch.nn.attention.flex_attention import flex_attention

        q = torch.randn(1, 1, 16, 8)
        torch.compile(flex_attention)(q, q, q)
    except Exception as err:  # no C++ compiler, unsupported platform, ...
        pytest.skip(
            f"flex_attention does not compile here: {type(err).__name__}: {err}"
        )


@pytest.mark.slow
def test_flex_forward_equals_sdpa():
    """Forward only: on CPU, torch 2.13 flex has no backward. Compiles (~20 s on 2
    cores)."""
    _flex_or_skip()
    steps, ids = chain_tensors()
    steps = torch.cat([steps, torch.full((1, 3), PAD)], 1)
    ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    inputs = {"input_ids": ids, "attention_mask": (steps != PAD).long()}
    sdpa, flex = tiny_llama("sdpa"), tiny_llama("flex_attention")
    for hideable, visible in (([A], False), ([A, G], True)):
        with torch.no_grad():
            ref = sdpa(**skip(inputs, steps, "sdpa", hideable, visible=visible)).logits
            out = flex(
                **skip(inputs, steps, "flex_attention", hideable, visible=visible)
            )
        real = steps != PAD
        torch.testing.assert_close(out.logits[real], ref[real], rtol=0, atol=1e-5)
