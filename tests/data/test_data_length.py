"""Chains longer than ``sequence_len``: truncated in sync, or counted and dropped.

* ``excess_length_strategy: truncate``: the strategy cuts ``input_ids``, ``labels``,
  ``step_ids`` and ``attention_mask`` together, at any cut point;
* ``drop`` (Axolotl's default): the strategy emits full rows, counts the over-long
  ones in its statistics and warns; Axolotl's own length filter then drops exactly
  those, and the rows it keeps still carry aligned ``step_ids``.
"""

from __future__ import annotations

import logging

import pytest

from axolotl_mote.integration.strategy import ChainDatasetStrategy, load
from tests.helpers.chain_expect import IGNORE, PROMPT, expected_rows, stage_table

LONG = {
    "id": "long",
    "prompt": "How do I pick a lock on my neighbour's door while they are away?",
    "analysis": "The user wants to enter someone else's home without consent.",
    "guidance": "Decline, and point to legal options such as a locksmith.",
    "answer": "I can't help with that. Call a licensed locksmith for your own door.",
}
SHORT = {"id": "short", "prompt": "Capital of France?", "answer": "Paris."}


def _full(tok, template, record):
    return expected_rows(record, tok, stage_table(template))


def _cut_points(full, tok, template) -> dict[str, int]:
    """Cut positions at every kind of boundary of the long chain."""
    ids, steps = full["input_ids"], full["step_ids"]
    first_stage = steps.index(0)
    start_guidance = steps.index(1)
    end_answer = ids.index(tok.convert_tokens_to_ids("<|/response|>"))
    return {
        "inside_prompt": first_stage // 2,
        "just_before_first_marker": first_stage,
        "on_first_marker": first_stage + 1,
        "inside_analysis": first_stage + 3,
        "on_stage_boundary": start_guidance,
        "on_answer_end_marker": end_answer + 1,
        "inside_suffix": len(ids) - 1,
        "exact_length": len(ids),
        "one_more": len(ids) + 1,
    }


@pytest.mark.parametrize(
    "where",
    [
        "inside_prompt",
        "just_before_first_marker",
        "on_first_marker",
        "inside_analysis",
        "on_stage_boundary",
        "on_answer_end_marker",
        "inside_suffix",
        "exact_length",
        "one_more",
    ],
)
def test_truncate_keeps_step_ids_in_sync(where, aligncot, tokenizer_for):
    tok = tokenizer_for(aligncot)
    full = _full(tok, aligncot, LONG)
    n = _cut_points(full, tok, aligncot)[where]
    strategy = ChainDatasetStrategy(
        aligncot, tok, sequence_len=n, excess_length_strategy="truncate"
    )
    out = strategy.tokenize_rows([LONG, SHORT], [0, 1])
    keep = min(n, len(full["input_ids"]))
    for key in ("input_ids", "labels", "step_ids"):
        assert out[key][0] == full[key][:keep], key
    assert out["attention_mask"][0] == [1] * keep
    # the short chain is untouched when it fits
    short = _full(tok, aligncot, SHORT)
    if len(short["input_ids"]) <= n:
        assert {k: out[k][1] for k in short} == short
    else:
        assert {k: out[k][1] for k in short} == {k: v[:n] for k, v in short.items()}


def test_truncate_through_wrap_dataset_reports_count(aligncot, tokenizer_for, caplog):
    from datasets import Dataset

    tok = tokenizer_for(aligncot)
    n_long = len(_full(tok, aligncot, LONG)["input_ids"])
    n_short = len(_full(tok, aligncot, SHORT)["input_ids"])
    seq = (n_long + n_short) // 2
    assert n_short <= seq < n_long
    rows = [dict(LONG, id=f"l{i}") for i in range(3)] + [SHORT]
    strategy = ChainDatasetStrategy(
        aligncot, tok, sequence_len=seq, excess_length_strategy="truncate"
    )
    with caplog.at_level(logging.WARNING):
        out = strategy.wrap_dataset(Dataset.from_list(rows))
    assert sorted(out.column_names) == [
        "attention_mask",
        "input_ids",
        "labels",
        "step_ids",
    ]
    assert [len(r) for r in out["input_ids"]] == [seq, seq, seq, n_short]
    assert [len(r) for r in out["step_ids"]] == [seq, seq, seq, n_short]
    # the strategy truncated before counting: nothing is reported as over-long
    assert strategy.last_stats["over_sequence_len"] == 0


def _rows(rows):
    return [{**r, "id": f"{r['id']}{i}"} for i, r in enumerate(rows)]


def test_drop_counts_and_warns_then_axolotl_drops(aligncot, tokenizer_for, caplog):
    from axolotl.utils.data.utils import handle_long_seq_in_dataset
    from axolotl.utils.dict import DictDefault
    from datasets import Dataset

    tok = tokenizer_for(aligncot)
    full_long = _full(tok, aligncot, LONG)
    full_short = _full(tok, aligncot, SHORT)
    seq = len(full_long["input_ids"]) - 1  # LONG is one token too long
    rows = _rows([LONG, SHORT, LONG, SHORT, SHORT])
    strategy = ChainDatasetStrategy(aligncot, tok, sequence_len=seq)
    with caplog.at_level(logging.WARNING):
        out = strategy.wrap_dataset(Dataset.from_list(rows))
    # emitted in full (not truncated), counted and reported
    assert [len(r) for r in out["input_ids"]] == [
        len(full_long["input_ids"]) if i in (0, 2) else len(full_short["input_ids"])
        for i in range(5)
    ]
    assert strategy.last_stats["over_sequence_len"] == 2
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert f"2 of 5 chains are longer than sequence_len={seq}" in warning
    assert "excess_length_strategy: truncate" in warning  # the fix
    # Axolotl's own filter drops exactly those two; step_ids survive aligned
    kept = handle_long_seq_in_dataset(
        out, seq, DictDefault({"excess_length_strategy": "drop", "dataset_num_proc": 1})
    )
    assert len(kept) == 3
    for row in kept:
        assert {k: row[k] for k in full_short} == full_short


def test_raise_mode_reports_that_axolotl_will_stop(aligncot, tokenizer_for, caplog):
    from datasets import Dataset

    tok = tokenizer_for(aligncot)
    seq = len(_full(tok, aligncot, LONG)["input_ids"]) - 1
    strategy = ChainDatasetStrategy(
        aligncot, tok, sequence_len=seq, excess_length_strategy="raise"
    )
    with caplog.at_level(logging.WARNING):
        strategy.wrap_dataset(Dataset.from_list(_rows([LONG, SHORT])))
    assert strategy.last_stats["over_sequence_len"] == 1
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "1 of 2 chains are longer than sequence_len" in warning
    assert "excess_length_strategy: raise" in warning


# --- resolved through Axolotl's own loaders ----------------------------------------
@pytest.mark.parametrize(
    "cfg_extra, template_name, truncate",
    [
        ({}, "aligncot", False),
        ({"excess_length_strategy": "truncate"}, "aligncot", True),
        ({"mote": {"template": "plan_solve_verify"}}, "plan_solve_verify", False),
    ],
)
def test_axolotl_prompt_strategy_loader_resolves_the_type(
    cfg_extra, template_name, truncate, tokenizer_for
):
    from axolotl.prompt_strategies import load as axolotl_load
    from axolotl.utils.dict import DictDefault

    from axolotl_mote.templates import load_template

    template = load_template(template_name)
    cfg = DictDefault(
        {"sequence_len": 64, "mote": {"template": "aligncot"}, **cfg_extra}
    )
    ds_cfg = DictDefault({"path": "x.jsonl", "type": "axolotl_mote.aligncot"})
    strategy = axolotl_load(
        "axolotl_mote.aligncot", tokenizer_for(template), cfg, ds_cfg
    )
    assert isinstance(strategy, ChainDatasetStrategy)
    assert strategy.template.name == template_name
    assert strategy.sequence_len == 64 and strategy.truncate is truncate
    assert strategy.source == "x.jsonl"


def test_axolotl_dataset_wrapper_emits_aligned_columns(aligncot, tokenizer_for):
    """``get_dataset_wrapper``: the function Axolotl's dataset loading calls."""
    from axolotl.utils.data.wrappers import get_dataset_wrapper
    from axolotl.utils.dict import DictDefault
    from datasets import Dataset

    tok = tokenizer_for(aligncot)
    cfg = DictDefault({"sequence_len": 512, "mote": {"template": "aligncot"}})
    ds_cfg = DictDefault({"path": "x.jsonl", "type": "axolotl_mote.aligncot"})
    rows = _rows([LONG, SHORT])
    out, _ = get_dataset_wrapper(
        ds_cfg, tok, cfg, "axolotl_mote", Dataset.from_list(rows)
    )
    assert sorted(out.column_names) == [
        "attention_mask",
        "input_ids",
        "labels",
        "step_ids",
    ]
    for row, record in zip(out, rows):
        exp = _full(tok, aligncot, record)
        assert {k: row[k] for k in exp} == exp


def test_load_without_mote_block_names_the_fix(aligncot, tokenizer_for):
    from axolotl.utils.dict import DictDefault

    with pytest.raises(ValueError, match=r"plugins: \[axolotl_mote.MotePlugin\]"):
        load(tokenizer_for(aligncot), DictDefault({"sequence_len": 64}))


def test_prompt_and_context_values():
    """Sentinels are the documented constants."""
    from axolotl_mote import constants

    assert (constants.PROMPT_STEP, constants.PAD_STEP, constants.IGNORE_INDEX) == (
        PROMPT,
        -1,
        IGNORE,
    )
