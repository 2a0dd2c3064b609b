"""Collators: exact tensors and exact key sets, unpacked (both padding sides) and
packed.

The tiny tokenizer pads with id 3 (``<pad>``); ``step_ids`` pad with PAD_STEP = -1,
labels with -100, padded ``position_ids`` count 0, 1, ... (Axolotl's convention).
"""

from __future__ import annotations

import copy

import pytest
import torch

from axolotl_mote.integration.collator import (
    MoteDataCollator,
    MotePackedDataCollator,
    collator_for,
)

PAD = 3
F1 = {
    "input_ids": [10, 11, 12, 13],
    "attention_mask": [1, 1, 1, 1],
    "labels": [-100, -100, 12, 13],
    "step_ids": [-2, -2, 0, 0],
}
F2 = {
    "input_ids": [20, 21],
    "attention_mask": [1, 1],
    "labels": [-100, 21],
    "step_ids": [-2, 2],
}
F3 = {
    "input_ids": [30, 31, 32],
    "attention_mask": [1, 1, 1],
    "labels": [-100, 31, 32],
    "step_ids": [-2, 1, 1],
}


def _features(*feats, positions=False, length=False):
    out = []
    for f in feats:
        f = copy.deepcopy(f)
        if positions:
            f["position_ids"] = list(range(len(f["input_ids"])))
        if length:
            f["length"] = len(f["input_ids"])
        out.append(f)
    return out


def _t(rows):
    return torch.tensor(rows, dtype=torch.long)


def _assert_batch(batch, expected):
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert batch[key].dtype == torch.long, key
        assert torch.equal(batch[key], _t(value)), f"{key}: {batch[key].tolist()}"


UNPACKED_CASES = {
    "right": dict(
        side="right",
        multiple=None,
        positions=False,
        expected={
            "input_ids": [[10, 11, 12, 13], [20, 21, PAD, PAD], [30, 31, 32, PAD]],
            "attention_mask": [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]],
            "labels": [
                [-100, -100, 12, 13],
                [-100, 21, -100, -100],
                [-100, 31, 32, -100],
            ],
            "step_ids": [[-2, -2, 0, 0], [-2, 2, -1, -1], [-2, 1, 1, -1]],
        },
    ),
    "left": dict(
        side="left",
        multiple=None,
        positions=False,
        expected={
            "input_ids": [[10, 11, 12, 13], [PAD, PAD, 20, 21], [PAD, 30, 31, 32]],
            "attention_mask": [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]],
            "labels": [
                [-100, -100, 12, 13],
                [-100, -100, -100, 21],
                [-100, -100, 31, 32],
            ],
            "step_ids": [[-2, -2, 0, 0], [-1, -1, -2, 2], [-1, -2, 1, 1]],
        },
    ),
    "right_multiple_of_8_with_positions": dict(
        side="right",
        multiple=8,
        positions=True,
        expected={
            "input_ids": [
                [10, 11, 12, 13] + [PAD] * 4,
                [20, 21] + [PAD] * 6,
                [30, 31, 32] + [PAD] * 5,
            ],
            "attention_mask": [[1] * 4 + [0] * 4, [1] * 2 + [0] * 6, [1] * 3 + [0] * 5],
            "labels": [
                [-100, -100, 12, 13] + [-100] * 4,
                [-100, 21] + [-100] * 6,
                [-100, 31, 32] + [-100] * 5,
            ],
            "position_ids": [
                [0, 1, 2, 3, 0, 1, 2, 3],
                [0, 1, 0, 1, 2, 3, 4, 5],
                [0, 1, 2, 0, 1, 2, 3, 4],
            ],
            "step_ids": [
                [-2, -2, 0, 0] + [-1] * 4,
                [-2, 2] + [-1] * 6,
                [-2, 1, 1] + [-1] * 5,
            ],
        },
    ),
    "left_with_positions": dict(
        side="left",
        multiple=None,
        positions=True,
        expected={
            "input_ids": [[10, 11, 12, 13], [PAD, PAD, 20, 21], [PAD, 30, 31, 32]],
            "attention_mask": [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]],
            "labels": [
                [-100, -100, 12, 13],
                [-100, -100, -100, 21],
                [-100, -100, 31, 32],
            ],
            "position_ids": [[0, 1, 2, 3], [0, 1, 0, 1], [0, 0, 1, 2]],
            "step_ids": [[-2, -2, 0, 0], [-1, -1, -2, 2], [-1, -2, 1, 1]],
        },
    ),
}


@pytest.mark.parametrize("case", list(UNPACKED_CASES))
def test_unpacked_exact_tensors(case, fresh_tokenizer):
    spec = UNPACKED_CASES[case]
    fresh_tokenizer.padding_side = spec["side"]
    assert fresh_tokenizer.pad_token_id == PAD
    collator = MoteDataCollator(
        fresh_tokenizer,
        padding=True,
        pad_to_multiple_of=spec["multiple"],
        return_tensors="pt",
    )
    batch = collator(_features(F1, F2, F3, positions=spec["positions"]))
    _assert_batch(batch, spec["expected"])


PACKED_CASES = {
    "two_packs": dict(
        packs=[[F1, F2], [F3]],
        multiple=None,
        expected={
            "input_ids": [[10, 11, 12, 13, 20, 21], [30, 31, 32, PAD, PAD, PAD]],
            # V2 turns the attention mask into per-sample segment ids
            "attention_mask": [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]],
            "labels": [
                [-100, -100, 12, 13, -100, 21],
                [-100, 31, 32, -100, -100, -100],
            ],
            "position_ids": [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]],
            "step_ids": [[-2, -2, 0, 0, -2, 2], [-2, 1, 1, -1, -1, -1]],
        },
    ),
    "three_in_one_multiple_of_16": dict(
        packs=[[F3, F1, F2]],
        multiple=16,
        expected={
            "input_ids": [[30, 31, 32, 10, 11, 12, 13, 20, 21] + [PAD] * 7],
            "attention_mask": [[1, 1, 1, 2, 2, 2, 2, 3, 3] + [0] * 7],
            "labels": [[-100, 31, 32, -100, -100, 12, 13, -100, 21] + [-100] * 7],
            "position_ids": [[0, 1, 2, 0, 1, 2, 3, 0, 1] + list(range(7))],
            "step_ids": [[-2, 1, 1, -2, -2, 0, 0, -2, 2] + [-1] * 7],
        },
    ),
}


@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_packed_exact_tensors(case, fresh_tokenizer):
    spec = PACKED_CASES[case]
    collator = MotePackedDataCollator(
        fresh_tokenizer,
        padding=True,
        pad_to_multiple_of=spec["multiple"],
        return_tensors="pt",
    )
    packs = [_features(*p, positions=True, length=True) for p in spec["packs"]]
    batch = collator(packs)
    _assert_batch(batch, spec["expected"])  # "length" is dropped


def test_strategy_rows_survive_packing_and_padding(
    aligncot, tokenizer_for, fresh_tokenizer
):
    """Real strategy rows -> packed and unpacked batches -> the same rows back."""
    from axolotl_mote.integration.strategy import ChainDatasetStrategy

    records = [
        {"id": "a", "prompt": "Capital of France?", "answer": "Paris."},
        {
            "id": "b",
            "prompt": "How do I bake bread?",
            "analysis": "Harmless.",
            "guidance": "Give steps.",
            "answer": "Mix, knead, rise, bake.",
        },
        {
            "id": "c",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "2 + 2?"},
            ],
            "guidance": "Arithmetic.",
            "answer": "4.",
        },
    ]
    out = ChainDatasetStrategy(
        aligncot, fresh_tokenizer, sequence_len=512
    ).tokenize_rows(records, [0, 1, 2])
    rows = [{k: out[k][i] for k in out} for i in range(3)]
    for r in rows:
        r["position_ids"] = list(range(len(r["input_ids"])))

    packed = MotePackedDataCollator(fresh_tokenizer, padding=True, return_tensors="pt")(
        [copy.deepcopy(rows[:2]), copy.deepcopy(rows[2:])]
    )
    for b, pack in enumerate([rows[:2], rows[2:]]):
        offset = 0
        for r in pack:
            n = len(r["input_ids"])
            for key in ("input_ids", "labels", "step_ids", "position_ids"):
                assert packed[key][b, offset : offset + n].tolist() == r[key], key
            offset += n
        assert packed["step_ids"][b, offset:].eq(-1).all()
        assert packed["labels"][b, offset:].eq(-100).all()

    for side in ("right", "left"):
        fresh_tokenizer.padding_side = side
        batch = MoteDataCollator(fresh_tokenizer, padding=True, return_tensors="pt")(
            copy.deepcopy(rows)
        )
        width = batch["input_ids"].shape[1]
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            real = slice(0, n) if side == "right" else slice(width - n, width)
            pad = slice(n, width) if side == "right" else slice(0, width - n)
            for key in ("input_ids", "labels", "step_ids"):
                assert batch[key][b, real].tolist() == r[key]
            assert batch["step_ids"][b, pad].eq(-1).all()
            assert batch["labels"][b, pad].eq(-100).all()
            assert batch["attention_mask"][b, pad].eq(0).all()


@pytest.mark.parametrize(
    "collator_cls, features, error, message",
    [
        (
            MoteDataCollator,
            [F1, {k: v for k, v in F2.items() if k != "step_ids"}],
            KeyError,
            "features [1] have no 'step_ids'",
        ),
        (
            MoteDataCollator,
            [F1, dict(F2, step_ids=[-2])],
            ValueError,
            "feature 1 has 1 step_ids for 2 input_ids; they must be aligned",
        ),
        (
            MotePackedDataCollator,
            [[{k: v for k, v in F1.items() if k != "step_ids"}, F2]],
            KeyError,
            "features [0] have no 'step_ids'",
        ),
        (
            MotePackedDataCollator,
            [[F1, {k: v for k, v in F2.items() if k != "step_ids"}]],
            ValueError,
            "feature 0 has 4 step_ids for 6 input_ids",
        ),
        (MoteDataCollator, [], ValueError, "empty batch"),
    ],
    ids=[
        "unpacked_missing",
        "unpacked_misaligned",
        "packed_first_missing",
        "packed_later_missing",
        "empty",
    ],
)
def test_collator_refuses_bad_features(
    collator_cls, features, error, message, fresh_tokenizer
):
    collator = collator_cls(fresh_tokenizer, padding=True, return_tensors="pt")
    with pytest.raises(error) as info:
        collator(copy.deepcopy(features))
    assert message in str(info.value)


def test_collator_for_split():
    assert collator_for(True) is MotePackedDataCollator
    assert collator_for(False) is MoteDataCollator
