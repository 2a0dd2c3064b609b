"""Per-stage loss and counts: the chunked sums equal the naive full cross-entropy."""

from __future__ import annotations

import pytest
import torch

from axolotl_mote.metrics import (
    StageMetrics,
    reference_stage_losses,
    stage_loss_sums,
    stage_token_counts,
)


def _batch(seed=0, b=3, t=17, v=50, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :4] = -100  # the prompt
    labels[1, 10:] = -100  # padding
    steps = torch.randint(0, 3, (b, t), generator=gen)
    steps[:, :4] = -2
    steps[1, 10:] = -1
    return logits, labels, steps


@pytest.mark.parametrize("max_bytes", [1, 4 * 50 * 5, 10**9], ids=["row", "5", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_sums_equal_the_naive_cross_entropy(max_bytes, dtype):
    logits, labels, steps = _batch(dtype=dtype)
    sums, counts = stage_loss_sums(logits, labels, steps, 3, max_bytes=max_bytes)
    ref_sums, ref_counts = reference_stage_losses(logits, labels, steps, 3)
    assert counts.tolist() == ref_counts and min(ref_counts) > 0
    torch.testing.assert_close(sums, torch.tensor(ref_sums), rtol=1e-5, atol=1e-4)
    assert stage_token_counts(labels, steps, 3).tolist() == ref_counts


def test_accumulated_between_logs_and_flushed_once():
    metrics = StageMetrics(["a", "b", "c"])
    batches = [_batch(seed=s) for s in range(3)]
    for batch in batches:
        metrics.add(*batch)
    logged = metrics.flush("eval_")
    total = [0.0] * 3
    count = [0] * 3
    for batch in batches:
        s, c = reference_stage_losses(*batch, 3)
        total = [x + y for x, y in zip(total, s)]
        count = [x + y for x, y in zip(count, c)]
    for i, name in enumerate("abc"):
        assert logged[f"eval_tokens_{name}"] == count[i]
        assert logged[f"eval_loss_{name}"] == pytest.approx(total[i] / count[i], 1e-3)
    assert metrics.flush() == {}  # reset


def test_without_logits_only_counts_are_logged():
    metrics = StageMetrics(["a", "b", "c"])
    logits, labels, steps = _batch()
    metrics.add(None, labels, steps)
    logged = metrics.flush()
    assert not metrics.has_loss
    assert set(logged) == {"tokens_a", "tokens_b", "tokens_c"}
