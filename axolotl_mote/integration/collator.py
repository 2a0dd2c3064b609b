"""Collators that carry ``step_ids`` through padding and sample packing.

Axolotl's collators pad ``labels`` and ``position_ids`` by hand and leave every other
key to ``tokenizer.pad``, which does not know ``step_ids``. :class:`StepIdsPaddingMixin`
pops ``step_ids`` before the parent pads, then writes each row into a ``[B, L]`` tensor
filled with ``PAD_STEP`` on the tokenizer's padding side. With packing, Axolotl's V2
collator first concatenates each pack's sub-samples (``step_ids`` included), then the
mixin pads.

Example (right padding, PAD_STEP = -1, PROMPT_STEP = -2)::

    features = [{"input_ids": [5, 6, 7], "step_ids": [-2, 0, 0], ...},
                {"input_ids": [5, 9],    "step_ids": [-2, 2], ...}]
    batch["step_ids"] == tensor([[-2, 0, 0],
                                 [-2, 2, -1]])

Packed (one row from two samples)::

    [[{"input_ids": [5, 6], "step_ids": [-2, 0]}, {"input_ids": [5, 9], "step_ids": [-2,
    2]}]] batch["step_ids"] == tensor([[-2, 0, -2, 2]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from axolotl.utils.collators.batching import (
    DataCollatorForSeq2Seq,
    V2BatchSamplerDataCollatorForSeq2Seq,
)

from axolotl_mote.constants import PAD_STEP, STEP_IDS_KEY


@dataclass
class StepIdsPaddingMixin(DataCollatorForSeq2Seq):
    """Pads ``step_ids`` exactly like ``input_ids``; raises if a feature lacks them."""

    def __call__(self, features, return_tensors=None):
        if not features:
            raise ValueError("empty batch")
        missing = [i for i, f in enumerate(features) if STEP_IDS_KEY not in f]
        if missing:
            raise KeyError(
                f"MoTE collator: features {missing} have no '{STEP_IDS_KEY}'; the "
                "dataset must be built with `type: axolotl_mote.aligncot` (clear "
                "dataset_prepared_path if it was prepared without the plugin)"
            )
        steps = [list(map(int, f.pop(STEP_IDS_KEY))) for f in features]
        for i, (f, s) in enumerate(zip(features, steps)):
            if len(s) != len(f["input_ids"]):
                raise ValueError(
                    f"MoTE collator: feature {i} has {len(s)} step_ids for "
                    f"{len(f['input_ids'])} input_ids; they must be aligned"
                )
        batch = super().__call__(features, return_tensors=return_tensors)
        length = batch["input_ids"].shape[-1]
        out = torch.full((len(steps), length), PAD_STEP, dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for row, s in enumerate(steps):
            values = torch.tensor(s[:length], dtype=torch.long)
            if left:
                out[row, length - len(values) :] = values
            else:
                out[row, : len(values)] = values
        batch[STEP_IDS_KEY] = out
        return batch


@dataclass
class MoteDataCollator(StepIdsPaddingMixin):
    """Unpacked batches."""


@dataclass
class MotePackedDataCollator(V2BatchSamplerDataCollatorForSeq2Seq, StepIdsPaddingMixin):
    """Packed batches: V2 concatenates each pack (step_ids too), the mixin pads."""


def collator_for(packed: bool) -> type[DataCollatorForSeq2Seq]:
    """The collator class for a split: packed exactly when packing is on for it."""
    return MotePackedDataCollator if packed else MoteDataCollator


def describe(batch: dict[str, Any]) -> str:
    """One-line shape summary used in error messages and debug logs."""
    return ", ".join(
        f"{k}{tuple(v.shape)}" for k, v in batch.items() if hasattr(v, "shape")
    )
