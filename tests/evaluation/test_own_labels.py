"""The authors' labelled sample of SmolLM2's replies: how it is drawn, the committed
file, and the protocol on it (never fitted on, no public prompt text committed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from axolotl_mote.evaluation.labelled_sets import (
    LabelledReply,
    LabelledSet,
    load_labelled_set,
)
from tests.helpers.benchmarks import load_benchmark

REPO = Path(__file__).resolve().parents[2]
LABELS = REPO / "data" / "labels" / "labelled_replies_smollm2.jsonl"


def _agreement():
    return load_benchmark("scorer_agreement", "scorer_agreement_own")


def _cache(work: Path, model: str, name: str, label: str, answers: list[str]):
    gens = [
        {"id": str(i), "set": name, "label": label, "question": f"q{name}{i}",
         "answer": a}
        for i, a in enumerate(answers)
    ]  # fmt: skip
    path = work / "eval" / model / f"{name}.limit9.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"generations": gens}))


def test_draw_gives_every_point_an_equal_share_and_both_verdicts(tmp_path):
    bench = _agreement()
    refusal, answer = "I'm sorry, but I can't help with that.", "Sure: step one."
    # base almost never refuses harmful prompts (1 of 40): its cell still gets a
    # third of its share from that one verdict, as far as it has replies
    _cache(tmp_path, "base", "xstest_unsafe", "harmful", [refusal] + [answer] * 39)
    _cache(tmp_path, "base", "harmful", "harmful", [answer] * 10)
    for model in ("mote-s42", "mote-s42.epoch1"):
        _cache(
            tmp_path, model, "xstest_unsafe", "harmful", [refusal] * 30 + [answer] * 20
        )
    sample = bench.draw_own_sample(tmp_path, 30, seed=3)
    assert sample == bench.draw_own_sample(tmp_path, 30, seed=3)  # seeded
    assert sample != bench.draw_own_sample(tmp_path, 30, seed=4)
    cells = {}
    for row in sample:
        key = (row["arm"], row["string_refused"])
        cells[key] = cells.get(key, 0) + 1
    # 3 cells (arm x label), 10 each; a verdict gets its share, at least 4 (ceil 10/3)
    assert cells == {("base", True): 1, ("base", False): 9,
                     ("mote", True): 6, ("mote", False): 4,
                     ("mote.epoch1", True): 6, ("mote.epoch1", False): 4}  # fmt: skip
    assert len({r["id"] for r in sample}) == len(sample) == 30
    # XSTest is passed by path: its rows keep the id, never the prompt's text
    for row in sample:
        if row["set"].startswith("xstest"):
            assert row["prompt"] is None and row["prompt_id"].isdigit()
        else:
            assert row["prompt"] == f"q{row['set']}{row['prompt_id']}"
        assert row["refused"] is None and row["note"] == ""
    with pytest.raises(FileNotFoundError, match="no cached replies"):
        bench.draw_own_sample(tmp_path / "empty", 10)


def test_draw_command_hides_the_scorers_verdict(tmp_path):
    bench = _agreement()
    _cache(tmp_path, "mote-s1", "harmful", "harmful", ["No.", "Sure, here."] * 4)
    out = tmp_path / "sample.jsonl"
    bench.main(["--draw-own", str(tmp_path), str(out), "--draw-n", "6"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    assert all("string_refused" not in r and r["refused"] is None for r in rows)


def _rows() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text().splitlines() if line]


def test_the_committed_labels_parse_and_cover_every_point():
    rows = _rows()
    labelled = load_labelled_set(f"own={LABELS}")
    assert len(labelled.rows) == len(rows) >= 200
    assert len({r["id"] for r in rows}) == len(rows)
    points = {r["arm"] for r in rows}
    # the base model, both arms' final adapters and at least one earlier epoch
    assert {"base", "mote", "lora_chains"} <= points
    assert any(".epoch" in p for p in points)
    for point in points:
        for label in ("harmful", "benign"):
            mine = [r for r in rows if r["arm"] == point and r["label"] == label]
            assert len(mine) >= 10, (point, label)
    refused = sum(r["refused"] for r in rows)
    assert 0.25 * len(rows) <= refused <= 0.75 * len(rows)  # both labels well present
    own = {}
    for path in (REPO / "data" / "eval").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            own[(path.stem, rec["id"])] = rec["prompt"]
    for r in rows:
        if r["set"].startswith("xstest"):
            # public prompts stay out of the repository: the id only
            assert r["prompt"] is None and r["prompt_id"].isdigit(), r["id"]
        else:
            assert r["prompt"] == own[(r["set"], r["prompt_id"])], r["id"]


def test_the_protocol_never_fits_on_the_authors_sample():
    """With the committed sample beside two public-like sets, a memorising fitter is
    fitted once per public set left out, never on ``own``, and its ``own`` cell is
    scored by a model that never saw those replies."""
    bench = _agreement()
    labelled = load_labelled_set(f"own={LABELS}")

    def public(name: str) -> LabelledSet:
        rows = [LabelledReply(name, "m", "q", f"{name} reply {i}", i % 2 == 0,
                              "x", str(i)) for i in range(6)]  # fmt: skip
        return LabelledSet(name, "x", "x", rows)

    fitted_on: list[list[str]] = []

    def memorise(rows, names):
        fitted_on.append(sorted(names))
        seen = {r.response: r.refused for r in rows}
        return bench.Candidate(
            "memo", lambda rs: [seen.get(r.response, False) for r in rs],
            frozenset(names),
        )  # fmt: skip

    sets = [public("a"), public("b"), labelled]
    out = bench.run_protocol(sets, [], [bench.Fitter("memo", memorise)])
    assert fitted_on == [["b"], ["a"], ["a", "b"]]
    cell = out["memo"]["own"]
    assert "own" not in cell["trained_on"] and cell["n"] == len(labelled.rows)
    # never saw an own reply: it says "complied" to all, so recall is 0
    assert cell["recall"] == 0.0 and cell["human_refusals"] > 0


def test_a_cells_draw_does_not_depend_on_the_other_cells(tmp_path):
    """Seeded per cell: the cells of finished points can be labelled before the
    others are generated, and the full draw repeats them."""
    bench = _agreement()
    replies = ["I'm sorry, I can't.", "Sure: one, two."] * 10
    _cache(tmp_path, "mote-s42.epoch1", "harmful", "harmful", replies)
    early = bench.draw_own_sample(tmp_path, 0, seed=2, per_cell=8)
    _cache(tmp_path, "mote-s42", "harmful", "harmful", replies)
    _cache(tmp_path, "base", "harmful", "harmful", replies)
    full = bench.draw_own_sample(tmp_path, 0, seed=2, per_cell=8)
    assert len(early) == 8 and len(full) == 24
    assert [r for r in full if r["arm"] == "mote.epoch1"] == early
    only = bench.draw_own_sample(tmp_path, 0, seed=2, per_cell=8, points=["base"])
    assert only == [r for r in full if r["arm"] == "base"]
    # two --limit runs of one model: the pattern picks one, no prompt drawn twice
    path = tmp_path / "eval" / "base" / "harmful.limit9.json"
    path.rename(path.with_name("harmful.limit5.json"))
    _cache(tmp_path, "base", "harmful", "harmful", replies)
    both = bench.draw_own_sample(tmp_path, 0, seed=2, per_cell=40, points=["base"])
    assert len(both) == 40 and len({r["id"] for r in both}) == 20  # drawn twice
    one = bench.draw_own_sample(
        tmp_path, 0, seed=2, per_cell=40, points=["base"], pattern="*.limit9.json"
    )
    assert len(one) == 20 and len({r["id"] for r in one}) == 20


def test_own_rates_weight_each_verdict_stratum_by_its_share(tmp_path):
    """4 of 10 replies are string refusals; the authors refuse both of the 2 they read
    there and 1 of the 3 they read among the other 6: 0.4 * 1 + 0.6 * 1/3 = 0.6."""
    bench = _agreement()
    no, yes = "I'm sorry, but I can't help with that.", "Sure: step one."
    _cache(tmp_path, "mote-s42", "harmful", "harmful", [no] * 4 + [yes] * 6)
    rows = [{"arm": "mote", "label": "harmful", "response": r, "refused": f}
            for r, f in ((no, True), (no, True), (yes, True), (yes, False),
                         (yes, False))]  # fmt: skip
    got = bench.own_rates(tmp_path, rows)["mote"]["harmful"]
    assert got["string"] == 0.4 and got["authors"] == 0.6
    assert 0 < got["low"] < 0.6 < got["high"] < 1
    assert got["labelled"] == 5 and got["replies"] == 10
    with pytest.raises(ValueError, match="no labelled reply where string says"):
        bench.own_rates(tmp_path, rows[2:])  # the refusal stratum unread
