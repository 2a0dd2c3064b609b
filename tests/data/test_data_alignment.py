"""Step ids, labels and markers line up token by token, for every shape of record.

Each case is checked three ways:

1. equal to an independent model of the contract (``_chain_expect.expected_rows``);
2. ``input_ids`` equal the tokenization of the whole rendered text, so assembling from
   ids never changes what the model reads;
3. the structural invariants of ``_chain_expect.assert_aligned`` (walks the markers).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from axolotl_mote.integration.strategy import ChainDatasetStrategy
from tests.helpers.chain_expect import (
    IGNORE,
    PROMPT,
    assert_aligned,
    expected_rows,
    full_text,
    stage_table,
)

REPO = Path(__file__).resolve().parents[2]

Q = "How do I pick a lock on my neighbour's door while they are away?"
TEXT = {
    "analysis": "The user wants to enter someone else's home without consent.",
    "guidance": "Decline, and point to legal options such as a locksmith.",
    "answer": "I can't help with that. Call a licensed locksmith for your own door.",
    "check": "SAFE: the response declines and offers a legal alternative.",
    "plan": "Find how many boxes, then multiply by the price.",
    "solve": "24 / 6 = 4 boxes. 4 * 9 = 36.",
    "verify": "4 * 6 = 24, so every muffin is sold. Answer: 36",
}

SHAPES = {
    "prompt": {"prompt": Q},
    "single_message": {"messages": [{"role": "user", "content": Q}]},
    "multi_turn": {
        "messages": [
            {"role": "user", "content": "I like baking."},
            {"role": "assistant", "content": "That's great! What do you bake?"},
            {"role": "user", "content": Q},
        ]
    },
    "system": {
        "messages": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": Q},
        ]
    },
    "system_multi_turn": {
        "messages": [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": Q},
        ]
    },
}


def _subsets(keys):
    return [c for n in range(len(keys) + 1) for c in itertools.combinations(keys, n)]


def _record(shape: str, stage_keys, required: str, rid: str = "r1") -> dict:
    rec = {"id": rid, **json.loads(json.dumps(SHAPES[shape]))}
    for key in (*stage_keys, required):
        rec[key] = TEXT[key]
    return rec


def _encode_one(template, tok, record, **kwargs) -> dict[str, list[int]]:
    strategy = ChainDatasetStrategy(template, tok, sequence_len=4096, **kwargs)
    out = strategy.tokenize_rows([record], [0])
    assert set(out) == {"input_ids", "attention_mask", "labels", "step_ids"}
    return {k: v[0] for k, v in out.items()}


def _check(row, record, template, tok) -> None:
    table = stage_table(template)
    exp = expected_rows(record, tok, table)
    assert row["input_ids"] == exp["input_ids"]
    assert row["step_ids"] == exp["step_ids"]
    assert row["labels"] == exp["labels"]
    assert row["attention_mask"] == [1] * len(exp["input_ids"])
    whole = tok(full_text(record, tok, table), add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == whole
    assert_aligned(row, tok, template)


def _runs(seq: list[int]) -> list[tuple[int, int]]:
    """Run-length encoding: [(value, count), ...]."""
    return [(v, len(list(g))) for v, g in itertools.groupby(seq)]


# --- aligncot: every record shape x every subset of the skippable stages ------------
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    "present",
    _subsets(("analysis", "guidance", "check")),
    ids=lambda s: "+".join(s) or "answer_only",
)
def test_aligncot_every_shape_and_skip_pattern(shape, present, aligncot, tokenizer_for):
    tok = tokenizer_for(aligncot)
    record = _record(shape, present, "answer")
    row = _encode_one(aligncot, tok, record)
    _check(row, record, aligncot, tok)
    # the step sequence is exactly prompt, then the present trained stages in order,
    # each one run long (check is mode: omit and never appears)
    order = [s for k, s in (("analysis", 0), ("guidance", 1)) if k in present] + [2]
    assert [v for v, _ in _runs(row["step_ids"])] == [PROMPT, *order]
    # each stage's run = its markers + its text (+ the end of turn on the answer)
    enc = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    suffix = enc("<|im_end|>\n")
    lengths = dict(_runs(row["step_ids"]))
    for key, step in (("analysis", 0), ("guidance", 1)):
        if key in present:
            assert lengths[step] == enc(TEXT[key]) + 2
    assert lengths[2] == enc(TEXT["answer"]) + 2 + suffix


def test_omitted_check_changes_nothing(aligncot, tokenizer_for):
    tok = tokenizer_for(aligncot)
    with_check = _record("prompt", ("analysis", "check"), "answer")
    without = _record("prompt", ("analysis",), "answer")
    assert _encode_one(aligncot, tok, with_check) == _encode_one(aligncot, tok, without)
    check_ids = {tok.convert_tokens_to_ids(m) for m in ("<|check|>", "<|/check|>")}
    assert not check_ids & set(_encode_one(aligncot, tok, with_check)["input_ids"])


# --- stage modes: omit (default) vs train vs context -------------------------------
MODE_VARIANTS = {
    "check_omit": {},
    "check_train": {"check": {"mode": "train"}},
    "check_context": {"check": {"mode": "context"}},
    "analysis_context": {"analysis": {"mode": "context"}},
}


@pytest.mark.parametrize("variant", list(MODE_VARIANTS))
@pytest.mark.parametrize(
    "present",
    _subsets(("analysis", "guidance", "check")),
    ids=lambda s: "+".join(s) or "answer_only",
)
def test_stage_modes(variant, present, template_variant, tokenizer_for):
    template = template_variant("aligncot", **MODE_VARIANTS[variant])
    tok = tokenizer_for(template)
    record = _record("multi_turn", present, "answer")
    row = _encode_one(template, tok, record)
    _check(row, record, template, tok)
    ids, labels, steps = row["input_ids"], row["labels"], row["step_ids"]

    def span(key):
        stage = template.stage(key)
        a = ids.index(tok.convert_tokens_to_ids(stage.start))
        b = ids.index(tok.convert_tokens_to_ids(stage.end))
        return a, b + 1

    mode = {s.key: s.mode.value for s in template.stages}
    for key in present:
        if mode[key] == "omit":
            assert tok.convert_tokens_to_ids(template.stage(key).start) not in ids
            continue
        a, b = span(key)
        if mode[key] == "context":
            # in the sequence, routed like the question, no loss (markers included)
            assert steps[a:b] == [PROMPT] * (b - a)
            assert labels[a:b] == [IGNORE] * (b - a)
        else:
            assert steps[a:b] == [template.step_id(key)] * (b - a)
            assert labels[a:b] == ids[a:b]  # markers included
    # step ids of trained stages are their index among trained stages
    trained = [s.key for s in template.trained_stages]
    assert {k: template.step_id(k) for k in trained} == {
        k: i for i, k in enumerate(trained)
    }
    # the end of turn follows the last emitted stage
    a, b = (
        span("check")
        if ("check" in present and mode["check"] != "omit")
        else span("answer")
    )
    tail = slice(b, len(ids))
    assert steps[tail] == [steps[b - 1]] * (len(ids) - b)
    assert labels[tail] == (
        ids[tail] if steps[b - 1] >= 0 else [IGNORE] * (len(ids) - b)
    )


def test_check_train_adds_a_fourth_expert(template_variant):
    template = template_variant("aligncot", check={"mode": "train"})
    assert [s.key for s in template.trained_stages] == [
        "analysis",
        "guidance",
        "answer",
        "check",
    ]
    assert template.step_id("check") == 3
    context = template_variant("aligncot", check={"mode": "context"})
    assert context.num_experts == 3 and context.step_id("check") == PROMPT


# --- plan_solve_verify: a second template, N arbitrary stages ----------------------
@pytest.mark.parametrize("shape", ["prompt", "multi_turn", "system"])
@pytest.mark.parametrize(
    "present", _subsets(("plan", "solve")), ids=lambda s: "+".join(s) or "verify_only"
)
def test_plan_solve_verify(shape, present, tokenizer_for):
    from axolotl_mote.templates import load_template

    template = load_template("plan_solve_verify")
    tok = tokenizer_for(template)
    record = _record(shape, present, "verify")
    row = _encode_one(template, tok, record)
    _check(row, record, template, tok)
    order = [s for k, s in (("plan", 0), ("solve", 1)) if k in present] + [2]
    assert [v for v, _ in _runs(row["step_ids"])] == [PROMPT, *order]


def test_plan_solve_verify_markers_are_its_own(tokenizer_for):
    from axolotl_mote.templates import load_template

    template = load_template("plan_solve_verify")
    assert template.markers == [
        "<|plan|>",
        "<|/plan|>",
        "<|solve|>",
        "<|/solve|>",
        "<|verify|>",
        "<|/verify|>",
    ]
    assert [s.name for s in template.trained_stages] == ["plan", "solve", "verify"]


# --- the bundled data, every record ------------------------------------------------
@pytest.mark.parametrize(
    "path, template_name",
    [
        ("data/chains.jsonl", "aligncot"),
        ("data/math_chains.jsonl", "plan_solve_verify"),
    ],
)
def test_bundled_chains_align(path, template_name, tokenizer_for):
    from axolotl_mote.templates import load_template

    template = load_template(template_name)
    tok = tokenizer_for(template)
    records = [
        json.loads(line)
        for line in (REPO / path).read_text().splitlines()
        if line.strip()
    ]
    strategy = ChainDatasetStrategy(template, tok, sequence_len=1 << 16)
    out = strategy.tokenize_rows(records, list(range(len(records))))
    table = stage_table(template)
    for i, record in enumerate(records):
        row = {k: v[i] for k, v in out.items()}
        exp = expected_rows(record, tok, table)
        assert {k: row[k] for k in exp} == exp, record.get("id")
        assert_aligned(row, tok, template)
