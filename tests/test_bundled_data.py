"""The bundled data is what data/README.md says: valid records, the stated mix, and no
evaluation prompt that repeats a training or seed question."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (DATA / name).read_text().splitlines() if x.strip()]


def _question(row: dict) -> str:
    text = row.get("prompt") or row["messages"][-1]["content"]
    return " ".join(text.lower().split())


@pytest.mark.parametrize(
    "name,records,harmful",
    [("chains.jsonl", 92, 42), ("chains_judgement.jsonl", 100, 30)],
)
def test_training_chains_validate_and_have_the_stated_mix(name, records, harmful):
    from axolotl_mote.data.schema import validate_jsonl
    from axolotl_mote.templates import load_template

    report = validate_jsonl(DATA / name, load_template("aligncot"))
    rows = _rows(name)
    assert report["records"] == len(rows) == records
    assert Counter(r["meta"]["harmful"] for r in rows)[True] == harmful
    assert len({r["id"] for r in rows}) == records


def test_judgement_chains_analyse_the_risky_looking_benign_questions():
    rows = [r for r in _rows("chains_judgement.jsonl") if not r["meta"]["harmful"]]
    with_analysis = [r for r in rows if r.get("analysis")]
    assert len(rows) == 70 and len(with_analysis) >= 45
    for row in rows:  # a benign chain helps: no refusal opening in its answer
        assert not row["answer"].lower().startswith(("i can't", "i cannot", "sorry"))


def test_no_evaluation_prompt_repeats_a_training_or_seed_question():
    train = {
        _question(r)
        for name in ("chains.jsonl", "chains_judgement.jsonl", "seed_questions.jsonl")
        for r in _rows(name)
    }
    for path in sorted((DATA / "eval").glob("*.jsonl")):
        for row in _rows(f"eval/{path.name}"):
            assert _question(row) not in train, (path.name, row.get("id"))
