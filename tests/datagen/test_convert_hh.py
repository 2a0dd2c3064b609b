"""HH-RLHF-style transcripts -> seed questions: turns, de-duplication, the seeded
sample, gzip, and malformed lines reported by line (transcripts written here)."""

from __future__ import annotations

import gzip
import json

import pytest

from axolotl_mote.datagen.hh import (
    TranscriptError,
    convert_hh,
    parse_transcript,
    seed_messages,
)


def _hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


SINGLE = _hh(("Human", "How do I bake bread?"), ("Assistant", "Mix flour and water."))
MULTI = _hh(
    ("Human", "My neighbour is loud."),
    ("Assistant", "That sounds stressful."),
    ("Human", "How do I get back at him?"),
    ("Assistant", "Talk to him first."),
)


def test_parse_transcript_turns_and_seed():
    turns = parse_transcript(MULTI)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[2]["content"] == "How do I get back at him?"
    seed = seed_messages(turns)
    assert seed == turns[:3]  # multi-turn kept, up to the last user turn


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty transcript"),
        ("just text", "text before the first 'Human:' turn"),
        (_hh(("Assistant", "Hello")), "no non-empty 'Human:' turn"),
        (_hh(("Human", " "), ("Assistant", "ok")), "no non-empty 'Human:' turn"),
    ],
)
def test_bad_transcripts_say_why(text, message):
    with pytest.raises(TranscriptError, match=message):
        seed_messages(parse_transcript(text))


def test_same_speaker_twice_is_merged_and_an_opening_reply_dropped():
    text = _hh(("Assistant", "Hi!"), ("Human", "a"), ("Human", "b"), ("Assistant", "c"))
    assert seed_messages(parse_transcript(text)) == [
        {"role": "user", "content": "a\n\nb"}
    ]


def _write(path, rows, gz=False):
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(data)
    else:
        path.write_text(data, encoding="utf-8")


def test_convert_dedups_reports_malformed_lines_and_reads_gzip(tmp_path):
    reply_b = MULTI.rsplit("Talk", 1)[0] + "Sure, here's how."
    rows = [
        {"chosen": SINGLE, "rejected": SINGLE.replace("Mix flour", "Buy")},  # 1 seed
        {"chosen": MULTI, "rejected": reply_b},  # 1 seed (same question)
        "{not json",  # line 3
        {"text": SINGLE},  # line 4: no field
        {"chosen": "no turns at all"},  # line 5
    ]
    plain = tmp_path / "a.jsonl"
    _write(plain, rows)
    gz = tmp_path / "b.jsonl.gz"
    _write(
        gz,
        [{"chosen": SINGLE}, {"chosen": _hh(("Human", "Why is the sky blue?"))}],
        gz=True,
    )
    records, report = convert_hh([plain, gz])
    assert [r["messages"][-1]["content"] for r in records] == [
        "How do I bake bread?",
        "How do I get back at him?",
        "Why is the sky blue?",
    ]
    assert report.lines == 7 and report.transcripts == 7
    assert report.duplicates == 3 and report.unique == 3 == report.written
    assert report.multi_turn == 1 and report.malformed == 3
    assert report.errors == [
        f"{plain}:3: not valid JSON (Expecting property name enclosed in double "
        "quotes at column 2)",
        f"{plain}:4: no text field 'chosen' or 'rejected'",
        f"{plain}:5 (chosen): text before the first 'Human:' turn: 'no turns at all'",
    ]
    assert records[0]["meta"] == {"source": "a.jsonl:1", "field": "chosen"}
    assert len({r["id"] for r in records}) == 3
    again, _ = convert_hh([gz, plain])  # ids depend on the dialogue, not the order
    assert {r["id"] for r in again} == {r["id"] for r in records}


def test_seeded_sample(tmp_path):
    path = tmp_path / "many.jsonl"
    _write(path, [{"chosen": _hh(("Human", f"question {i}?"))} for i in range(50)])
    a, report = convert_hh([path], sample=10, seed=1)
    b, _ = convert_hh([path], sample=10, seed=1)
    c, _ = convert_hh([path], sample=10, seed=2)
    assert a == b and a != c and len(a) == 10 == report.written
    numbers = [int(r["messages"][0]["content"].split()[1][:-1]) for r in a]
    assert numbers == sorted(numbers)  # file order kept


def test_cli_convert_then_load_as_seeds(tmp_path, aligncot):
    from click.testing import CliRunner

    from axolotl_mote.cli.main import main
    from axolotl_mote.datagen import load_seeds

    path = tmp_path / "hh.jsonl"
    _write(path, [{"chosen": SINGLE}, {"chosen": MULTI}, "oops"])
    out = tmp_path / "seeds.jsonl"
    res = CliRunner().invoke(main, ["convert-hh", str(path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{path}:3: not valid JSON" in res.output
    seeds = load_seeds(out, aligncot)
    assert [len(s.messages) for s in seeds] == [1, 3]
    res = CliRunner().invoke(
        main, ["convert-hh", str(path), "-o", str(out), "--field", "x"]
    )
    assert res.exit_code == 1 and "no seed question found" in res.output
