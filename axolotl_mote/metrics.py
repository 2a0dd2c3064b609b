"""Per-stage loss and token counts of a batch, at no extra memory worth the name.

The training loss is one mean over every labelled token; MoTE users want to see it per
stage (is the analysis expert learning? the answer?). Recomputing a full-vocabulary
cross-entropy in fp32 costs a copy of the logits (``[B, T, V]``: about 4 GB at
micro-batch 2 × 4,096 × 128,256) per step. :func:`stage_loss_sums` instead walks the
logits in views of a few rows (at most ``max_bytes`` of fp32 temporaries at a time),
never copies them whole, and keeps the sums on the device: nothing reaches the host
until the trainer logs. :func:`reference_stage_losses` is the naive one-shot version the
tests compare against.

Position ``t`` predicts ``labels[t + 1]``; the stage of the *target* token owns the
loss.
"""

from __future__ import annotations

import torch

from axolotl_mote.constants import IGNORE_INDEX

#: fp32 temporary per chunk of rows: 64 MiB, i.e. 128 rows of a 128K vocabulary.
MAX_BYTES = 64 * 2**20


@torch.no_grad()
def stage_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    steps: torch.Tensor,
    num_stages: int,
    max_bytes: int = MAX_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token losses ``[E]`` (fp32) and token counts ``[E]`` per stage.

    logits: [B, T, V]; labels, steps: [B, T]. No host synchronisation.
    """
    b, t, v = logits.shape
    device = logits.device
    targets = labels[:, 1:].to(device)  # [B, T-1]
    stage = steps[:, 1:].to(device)  # [B, T-1]
    valid = (targets != IGNORE_INDEX) & (stage >= 0) & (stage < num_stages)
    safe_targets = targets.masked_fill(~valid, 0)
    safe_stage = stage.masked_fill(~valid, 0)
    rows = max(1, max_bytes // (4 * v))
    sums = torch.zeros(num_stages, dtype=torch.float32, device=device)
    for i in range(b):
        for start in range(0, t - 1, rows):
            end = min(start + rows, t - 1)
            chunk = logits[i, start:end]  # [n, V], a view
            lse = torch.logsumexp(chunk.float(), dim=-1)  # [n], fp32 temporaries
            target = chunk.gather(1, safe_targets[i, start:end, None]).squeeze(1)
            loss = (lse - target.float()) * valid[i, start:end]  # [n]
            sums.index_add_(0, safe_stage[i, start:end], loss)
    counts = torch.zeros(num_stages, dtype=torch.long, device=device)
    counts.index_add_(0, safe_stage.flatten(), valid.flatten().long())
    return sums, counts


def stage_token_counts(
    labels: torch.Tensor, steps: torch.Tensor, num_stages: int
) -> torch.Tensor:
    """Labelled target tokens per stage ``[E]`` (for runs whose loss keeps no
    logits)."""
    targets, stage = labels[:, 1:], steps[:, 1:].to(labels.device)
    valid = (targets != IGNORE_INDEX) & (stage >= 0) & (stage < num_stages)
    counts = torch.zeros(num_stages, dtype=torch.long, device=labels.device)
    counts.index_add_(0, stage.masked_fill(~valid, 0).flatten(), valid.flatten().long())
    return counts


def reference_stage_losses(
    logits: torch.Tensor, labels: torch.Tensor, steps: torch.Tensor, num_stages: int
) -> tuple[list[float], list[int]]:
    """The naive version: one full-vocabulary fp32 cross-entropy, then a loop."""
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    stage = steps[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)
    valid = targets != IGNORE_INDEX
    sums, counts = [], []
    for e in range(num_stages):
        sel = valid & (stage == e)
        sums.append(float(loss[sel].sum()))
        counts.append(int(sel.sum()))
    return sums, counts


class StageMetrics:
    """Per-stage sums accumulated on the device between two log calls."""

    def __init__(self, stage_names: list[str]) -> None:
        self.names = stage_names
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.has_loss = True

    def add(
        self, logits: torch.Tensor | None, labels: torch.Tensor, steps: torch.Tensor
    ) -> None:
        n = len(self.names)
        if logits is None:  # a fused loss (Liger, Cut-Cross-Entropy) kept no logits
            self.has_loss = False
            sums, counts = None, stage_token_counts(labels, steps, n)
        else:
            sums, counts = stage_loss_sums(logits, labels, steps, n)
        self.counts = counts if self.counts is None else self.counts + counts
        if sums is not None:
            self.sums = sums if self.sums is None else self.sums + sums

    def flush(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}loss_<stage>`` (token mean) and ``{prefix}tokens_<stage>``; resets.

        The one host synchronisation.
        """
        if self.counts is None:
            return {}
        counts = self.counts.tolist()
        sums = self.sums.tolist() if self.sums is not None else None
        out: dict[str, float] = {}
        for i, name in enumerate(self.names):
            out[f"{prefix}tokens_{name}"] = counts[i]
            if sums is not None and counts[i]:
                out[f"{prefix}loss_{name}"] = round(sums[i] / counts[i], 4)
        self.sums = self.counts = None
        return out
