"""Step-skipping masks (axolotl_mote/masks.py) against the spec, on constructed batches.

Chains are built from ``(step, length)`` segments: ``Q`` = question (PROMPT_STEP),
``A``/``G``/``ANS`` = analysis/guidance/answer (step 0/1/2), ``PAD`` = padding. Every
trained stage starts and ends with a marker token (ids >= MARK).
"""

from __future__ import annotations

import pytest
import torch

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP
from axolotl_mote.masks import (
    StepSkipError,
    build_step_skip_mask,
    hidden_tokens,
    positions_in_sequence,
    reference_step_skip_mask,
    sample_hidden_stages,
    sequence_ids,
    shifted_position_ids,
    step_skipping,
)

Q, A, G, ANS, PAD = PROMPT_STEP, 0, 1, 2, PAD_STEP
MARK = 100  # marker ids: MARK + 2*step (start), MARK + 2*step + 1 (end)
MARKERS = {MARK + k for k in range(6)}


def chain(*segments: tuple[int, int]) -> tuple[list[int], list[int], list[int]]:
    """(step_ids, input_ids, position_ids) of one sequence, or of padding."""
    steps, ids = [], []
    for step, n in segments:
        steps += [step] * n
        body = [7] * n
        if step >= 0:
            body[0], body[-1] = MARK + 2 * step, MARK + 2 * step + 1
        ids += body
    return steps, ids, list(range(len(steps)))


def row(*parts: tuple[list[int], list[int], list[int]]) -> tuple[list[int], ...]:
    """Concatenate sequences (packing) and padding parts into one row."""
    out: tuple[list[int], list[int], list[int]] = ([], [], [])
    for part in parts:
        for acc, x in zip(out, part):
            acc += x
    return out


def pad(n: int) -> tuple[list[int], list[int], list[int]]:
    return [PAD] * n, [0] * n, [0] * n


def batch(*rows):
    steps, ids, pos = (torch.tensor([r[k] for r in rows]) for k in range(3))
    return steps, ids, pos


def hidden_of(steps, seq, hide: dict[tuple[int, int], list[int]], E: int = 2):
    """Hidden table [B, S+1, E] from {(row, seq): [stages]}."""
    hidden = torch.zeros(steps.shape[0], int(seq.max()) + 1, E, dtype=torch.bool)
    for (b, s), stages in hide.items():
        hidden[b, s, stages] = True
    return hidden


def causal_blocks(seq: torch.Tensor) -> torch.Tensor:
    """Plain causal attention within sequences, pads see themselves: [B, 1, T, T]."""
    T = seq.shape[1]
    tril = torch.tril(torch.ones(T, T, dtype=torch.bool))
    same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, None, :] > 0)
    pads = torch.eye(T, dtype=torch.bool) & (seq[:, :, None] == 0)
    return ((tril & same) | pads)[:, None]


def span(steps_row: list[int], step: int, start: int = 0, stop: int | None = None):
    idx = [i for i, s in enumerate(steps_row) if s == step]
    return [i for i in idx if start <= i < (stop if stop is not None else 10**9)]


# --- sequence ids
# ------------------------------------------------------------------------
def test_sequence_ids_from_positions_segments_and_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0]])
    steps = torch.tensor([[Q, A, ANS, Q, ANS, PAD, PAD]])
    assert sequence_ids(pos, None, steps).tolist() == [[1, 1, 1, 2, 2, 0, 0]]
    segs = torch.tensor([[1, 1, 1, 2, 2, 0, 0]])
    assert sequence_ids(None, segs, None).tolist() == [[1, 1, 1, 2, 2, 0, 0]]
    assert sequence_ids(pos, segs, steps).tolist() == [[1, 1, 1, 2, 2, 0, 0]]
    # binary mask, no positions: one sequence per row; left padding
    left = torch.tensor([[0, 0, 1, 1, 1]])
    assert sequence_ids(None, left, None).tolist() == [[0, 0, 1, 1, 1]]
    # HF-style left-pad positions (pads = 1) and a pad run between packed sequences
    pos = torch.tensor([[1, 1, 0, 1, 0, 0, 1]])
    steps = torch.tensor([[PAD, PAD, Q, ANS, PAD, Q, ANS]])
    assert sequence_ids(pos, None, steps).tolist() == [[0, 0, 1, 1, 0, 2, 2]]


# --- the mask against hand-written expectations
# ----------------------------------------
def test_single_chain_hidden_analysis():
    s, ids, pos = batch(chain((Q, 2), (A, 3), (G, 3), (ANS, 3)))
    seq = sequence_ids(pos, None, s)
    mask = build_step_skip_mask(s, seq, hidden_of(s, seq, {(0, 1): [A]}))
    expected = causal_blocks(seq)
    a = span(s[0].tolist(), A)
    later = span(s[0].tolist(), G) + span(s[0].tolist(), ANS)
    for i in later:
        expected[0, 0, i, a] = False
    assert torch.equal(mask, expected)
    assert torch.equal(
        mask, reference_step_skip_mask(s, seq, hidden_of(s, seq, {(0, 1): [A]}))
    )


def test_single_chain_both_hidden_and_guidance_cannot_see_analysis():
    s, ids, pos = batch(chain((Q, 2), (A, 3), (G, 3), (ANS, 3)))
    seq = sequence_ids(pos, None, s)
    mask = build_step_skip_mask(s, seq, hidden_of(s, seq, {(0, 1): [A, G]}))[0, 0]
    st = s[0].tolist()
    q, a, g, ans = (span(st, x) for x in (Q, A, G, ANS))
    assert not mask[g][:, a].any() and not mask[ans][:, a + g].any()
    assert mask[ans][:, q].all() and mask[g][:, q].all()  # question always visible
    for x in (a, g, ans):  # own stage: causal
        assert torch.equal(mask[x][:, x], torch.tril(torch.ones(len(x), len(x))).bool())


def test_packed_row_three_sequences_never_see_each_other():
    s, ids, pos = batch(
        row(
            chain((Q, 2), (A, 2), (G, 2), (ANS, 2)),
            chain((Q, 1), (G, 3), (ANS, 2)),
            chain((Q, 3), (A, 2), (ANS, 2)),
            pad(2),
        )
    )
    seq = sequence_ids(pos, None, s)
    assert seq.tolist() == [[1] * 8 + [2] * 6 + [3] * 7 + [0, 0]]
    hidden = hidden_of(s, seq, {(0, 1): [G], (0, 3): [A]})
    mask = build_step_skip_mask(s, seq, hidden)
    expected = causal_blocks(seq)
    st = s[0].tolist()
    g1 = span(st, G, 0, 8)
    a3 = span(st, A, 14, 21)
    for i in span(st, ANS, 0, 8):
        expected[0, 0, i, g1] = False
    for i in span(st, ANS, 14, 21):
        expected[0, 0, i, a3] = False
    assert torch.equal(mask, expected)
    # same from Axolotl's segment-id attention_mask (no position_ids)
    segs = torch.tensor([[1] * 8 + [2] * 6 + [3] * 7 + [0, 0]])
    assert torch.equal(sequence_ids(None, segs, s), seq)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_left_and_right(side):
    body = chain((Q, 2), (A, 2), (G, 2), (ANS, 2))
    full = chain((Q, 2), (A, 3), (G, 3), (ANS, 4))
    short = row(pad(4), body) if side == "left" else row(body, pad(4))
    s, ids, pos = batch(short, full)
    seq = sequence_ids(pos, None, s)
    hidden = hidden_of(s, seq, {(0, 1): [A], (1, 1): [G]})
    mask = build_step_skip_mask(s, seq, hidden)
    padded = s == PAD
    # pads: only themselves; real tokens never see pads
    assert torch.equal(
        mask[0, 0][padded[0]], torch.eye(12, dtype=torch.bool)[padded[0]]
    )
    assert not mask[0, 0][~padded[0]][:, padded[0]].any()
    assert mask.any(-1).all()  # no empty softmax row
    assert torch.equal(mask, reference_step_skip_mask(s, seq, hidden))


def test_markers_visible_hides_content_only():
    s, ids, pos = batch(chain((Q, 2), (A, 4), (G, 3), (ANS, 3)))
    seq = sequence_ids(pos, None, s)
    is_marker = torch.isin(ids, torch.tensor(sorted(MARKERS)))
    hidden = hidden_of(s, seq, {(0, 1): [A]})
    mask = build_step_skip_mask(s, seq, hidden, is_marker)[0, 0]
    a_start, a_content, a_end = 2, [3, 4], 5
    later = span(s[0].tolist(), G) + span(s[0].tolist(), ANS)
    assert mask[later][:, [a_start, a_end]].all()
    assert not mask[later][:, a_content].any()
    # the visible end marker must not carry the content onward
    assert (
        not mask[a_end, a_content].any() and mask[a_end, [0, 1, a_start, a_end]].all()
    )
    assert mask[a_content][
        :, [a_start]
    ].all()  # the content still sees its start marker
    assert torch.equal(mask, reference_step_skip_mask(s, seq, hidden, is_marker)[0, 0])


def test_shift_positions_by_hand():
    # Q Q | A: a0 a1 a2 | G: g0 g1 | ANS: n0 n1  with A hidden
    s, ids, pos = batch(chain((Q, 2), (A, 3), (G, 2), (ANS, 2)))
    seq = sequence_ids(pos, None, s)
    hidden = hidden_of(s, seq, {(0, 1): [A]})
    assert shifted_position_ids(pos, s, seq, hidden).tolist() == [
        [0, 1, 2, 3, 4, 2, 3, 4, 5]
    ]
    # both hidden: guidance shifts by A, answer by A + G
    hidden = hidden_of(s, seq, {(0, 1): [A, G]})
    assert shifted_position_ids(pos, s, seq, hidden).tolist() == [
        [0, 1, 2, 3, 4, 2, 3, 2, 3]
    ]
    # markers visible: only A's content (1 token) is taken out; A's end marker too
    is_marker = torch.isin(ids, torch.tensor(sorted(MARKERS)))
    hidden = hidden_of(s, seq, {(0, 1): [A]})
    assert shifted_position_ids(pos, s, seq, hidden, is_marker).tolist() == [
        [0, 1, 2, 3, 3, 4, 5, 6, 7]
    ]


# --- random batches: vectorised == naive, invariants
# -------------------------------------
def random_batch(gen: torch.Generator, B: int = 3, T: int = 40):
    """Rows of packed random chains (stages may be absent), padded left or right."""
    rows = []
    for b in range(B):
        parts, n = [], 0
        while True:
            segs = [(Q, int(torch.randint(1, 4, (1,), generator=gen)))]
            for st in (A, G):
                if torch.rand(1, generator=gen) < 0.7:
                    segs.append((st, int(torch.randint(2, 5, (1,), generator=gen))))
            segs.append((ANS, int(torch.randint(2, 5, (1,), generator=gen))))
            c = chain(*segs)
            if n + len(c[0]) > T:
                break
            parts.append(c)
            n += len(c[0])
        padding = pad(T - n)
        rows.append(row(padding, *parts) if b % 2 else row(*parts, padding))
    return batch(*rows)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_equals_reference_on_random_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    s, ids, pos = random_batch(gen)
    seq = sequence_ids(pos, None, s)
    hidden = sample_hidden_stages(s, seq, [A, G], 0.5, gen)
    for is_marker in (None, torch.isin(ids, torch.tensor(sorted(MARKERS)))):
        mask = build_step_skip_mask(s, seq, hidden, is_marker)
        assert torch.equal(mask, reference_step_skip_mask(s, seq, hidden, is_marker))
        # invariants: own sequence only, causal, question and own stage visible
        allowed = mask[:, 0]
        real = seq > 0
        assert not (
            allowed & (seq[:, :, None] != seq[:, None, :]) & real[:, :, None]
        ).any()
        assert not torch.triu(allowed, diagonal=1).any()
        same_seq = causal_blocks(seq)[:, 0]
        # (in these chains every question token comes before the stages)
        assert allowed[(s == Q)[:, None, :] & same_seq & real[:, :, None]].all()
        own = same_seq & (s[:, :, None] == s[:, None, :]) & real[:, :, None]
        if (
            is_marker is not None
        ):  # a hidden stage's kept markers do not see its content
            own &= ~(is_marker & hidden_tokens(s, seq, hidden))[:, :, None]
        assert allowed[own].all()
        # shifted position = number of visible earlier tokens of the sequence
        shifted = shifted_position_ids(pos, s, seq, hidden, is_marker)
        visible = allowed.sum(-1) - 1
        assert torch.equal(shifted[real], visible[real])


def test_reproducible_from_seed():
    s, ids, pos = random_batch(torch.Generator().manual_seed(0), B=4, T=64)
    seq = sequence_ids(pos, None, s)

    def draw(seed):
        return sample_hidden_stages(
            s, seq, [A, G], 0.5, torch.Generator().manual_seed(seed)
        )

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_p1_hides_every_hideable_stage_and_never_the_answer():
    s, ids, pos = random_batch(torch.Generator().manual_seed(3))
    seq = sequence_ids(pos, None, s)
    hidden = sample_hidden_stages(s, seq, [A, G], 1.0, torch.Generator().manual_seed(0))
    tok = hidden_tokens(s, seq, hidden)
    assert torch.equal(tok, (s == A) | (s == G))
    mask = build_step_skip_mask(s, seq, hidden)[:, 0]
    ans_q = (s == ANS)[:, :, None]
    assert not (mask & ans_q & ((s == A) | (s == G))[:, None, :]).any()
    # the answer sees its own tokens and the question of its sequence
    same_seq = causal_blocks(seq)[:, 0]
    assert mask[same_seq & ans_q & ((s == ANS) | (s == Q))[:, None, :]].all()
    assert hidden.shape[2] == 2  # the table has no column for the answer at all


def test_answer_and_untrained_stages_are_rejected_from_skip_stages(aligncot):
    assert aligncot.hideable_steps(None) == [0, 1]
    assert aligncot.hideable_steps(["guidance", "analysis"]) == [0, 1]
    with pytest.raises(ValueError, match="is the answer stage"):
        aligncot.hideable_steps(["safe_answer"])
    with pytest.raises(ValueError, match="has mode omit"):
        aligncot.hideable_steps(["check"])


# --- the entry point
# ----------------------------------------------------------------------
def _inputs(s, ids, pos):
    return {"input_ids": ids, "attention_mask": (s != PAD).long(), "position_ids": pos}


def _dense(inputs, **kwargs):
    """The dense (or flex) path of the entry point: a batch and no plan."""
    out, plan = step_skipping(inputs, **kwargs)
    assert plan is None
    return out


def _kwargs(**over):
    kw = dict(
        step_ids=None,
        hideable=[A, G],
        p=0.5,
        generator=torch.Generator().manual_seed(0),
        marker_ids=MARKERS,
        markers_visible=False,
        shift_positions=False,
        attn_implementation="sdpa",
    )
    kw.update(over)
    return kw


def test_p0_returns_inputs_untouched():
    s, ids, pos = random_batch(torch.Generator().manual_seed(0))
    inputs = _inputs(s, ids, pos)
    before = dict(inputs)
    out = _dense(inputs, **_kwargs(step_ids=s, p=0.0, shift_positions=True))
    assert out is inputs and all(out[k] is before[k] for k in before)
    assert _dense(inputs, **_kwargs(step_ids=s, hideable=[])) is inputs


def test_backend_formats_and_position_handling():
    s, ids, pos = random_batch(torch.Generator().manual_seed(1))
    inputs = _inputs(s, ids, pos)
    seq = sequence_ids(pos, None, s)
    out = _dense(inputs, **_kwargs(step_ids=s))
    assert (
        out is not inputs
        and out["position_ids"] is pos
        and inputs["attention_mask"].dim() == 2
    )
    sdpa = out["attention_mask"]
    assert sdpa.dtype == torch.bool and sdpa.shape == (3, 1, 40, 40)
    eager = _dense(
        inputs,
        **_kwargs(step_ids=s, attn_implementation="eager", mask_dtype=torch.bfloat16),
    )["attention_mask"]
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager == 0, sdpa)
    assert (eager[~sdpa] == torch.finfo(torch.bfloat16).min).all()
    shifted = _dense(inputs, **_kwargs(step_ids=s, shift_positions=True))
    assert torch.equal(
        shifted["attention_mask"], sdpa
    )  # same generator seed, same draw
    real = seq > 0
    assert torch.equal(shifted["position_ids"][real], (sdpa[:, 0].sum(-1) - 1)[real])
    # no position_ids (Axolotl's segment-id attention_mask): created per sequence,
    # shifted
    no_pos = {"input_ids": ids, "attention_mask": seq}
    made = _dense(no_pos, **_kwargs(step_ids=s, shift_positions=True))
    assert torch.equal(
        made["position_ids"], shifted["position_ids"].masked_fill(~real, 0)
    )
    assert torch.equal(positions_in_sequence(seq)[real], pos[real])


@pytest.mark.parametrize(
    "impl", ["flash_attention_2", "flash_attention_3", "paged_attention"]
)
def test_unsupported_attention_raises_naming_alternatives(impl):
    s, ids, pos = random_batch(torch.Generator().manual_seed(0))
    with pytest.raises(StepSkipError, match="sdpa, eager or flex_attention"):
        _dense(_inputs(s, ids, pos), **_kwargs(step_ids=s, attn_implementation=impl))


def test_bad_batches_raise():
    s, ids, pos = random_batch(torch.Generator().manual_seed(0))
    with pytest.raises(StepSkipError, match="do not match input_ids"):
        _dense(_inputs(s, ids, pos), **_kwargs(step_ids=s[:, :-1]))
    four_d = dict(_inputs(s, ids, pos), attention_mask=torch.ones(3, 1, 40, 40))
    with pytest.raises(StepSkipError, match="2D attention_mask"):
        _dense(four_d, **_kwargs(step_ids=s))
    with pytest.raises(StepSkipError, match=">= 0"):
        sample_hidden_stages(s, sequence_ids(pos, None, s), [-2], 0.5, None)


def test_flex_block_mask_equals_dense():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    from axolotl_mote.masks import flex_block_mask

    s, ids, pos = random_batch(torch.Generator().manual_seed(2), B=2, T=24)
    seq = sequence_ids(pos, None, s)
    hidden = sample_hidden_stages(s, seq, [A, G], 0.5, torch.Generator().manual_seed(0))
    is_marker = torch.isin(ids, torch.tensor(sorted(MARKERS)))
    block = flex_block_mask(s, seq, hidden, is_marker)
    dense = fa.create_mask(block.mask_mod, 2, 1, 24, 24, device="cpu")
    assert torch.equal(dense, build_step_skip_mask(s, seq, hidden, is_marker))
