"""Every bad input gets an error naming where (file:line / row, id), the field and the
fix.

One table of bad records, run through each entry point that reads records:

* ``schema.parse_chain`` (what everything else calls),
* ``schema.validate_jsonl`` on a file (the plugin's pre-flight check and
  ``axolotl-mote validate``): ``file:line``,
* the strategy on a ``datasets.Dataset`` (non-local data): ``source row N``.

Then the file-level problems (broken JSON, duplicate ids) and bad templates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from axolotl_mote.data.schema import ChainRecordError, parse_chain, validate_jsonl

Q = "How do I bake bread at home?"
A = "Mix flour, water, salt and yeast, knead, let it rise, then bake."


def _rec(**fields):
    return {"id": "bad-1", "prompt": Q, "answer": A, **fields}


def _drop(record, *keys):
    return {k: v for k, v in record.items() if k not in keys}


# (case id, record, substrings the message must contain: field + fix)
BAD_RECORDS = [
    # --- missing answer / empty stage ---------------------------------------------
    (
        "missing_answer",
        _drop(_rec(), "answer"),
        [
            "missing required stage 'answer' (safe_answer)",
            "every chain must contain it",
        ],
    ),
    ("null_answer", _rec(answer=None), ["missing required stage 'answer'"]),
    (
        "empty_answer",
        _rec(answer=""),
        ["stage 'answer' is empty", "remove the key to skip the stage"],
    ),
    (
        "blank_stage",
        _rec(analysis="  \n "),
        ["stage 'analysis' is empty", "remove the key to skip the stage"],
    ),
    # --- unknown keys ---------------------------------------------------------------
    (
        "misspelled_stage",
        _rec(anaylsis="..."),
        [
            "unknown key(s) ['anaylsis']",
            "['analysis', 'guidance', 'answer', 'check']",
            "put extra fields under 'meta'",
        ],
    ),
    (
        "extra_field",
        _rec(category="baking"),
        ["unknown key(s) ['category']", "put extra fields under 'meta'"],
    ),
    # --- wrong types ------------------------------------------------------------------
    ("stage_not_string", _rec(answer=42), ["stage 'answer' must be a string, got int"]),
    (
        "stage_list",
        _rec(guidance=["a", "b"]),
        ["stage 'guidance' must be a string, got list"],
    ),
    (
        "prompt_not_string",
        _rec(prompt=["q"]),
        ["field 'prompt' must be a string, got list"],
    ),
    (
        "messages_not_list",
        _drop(_rec(messages={"role": "user", "content": Q}), "prompt"),
        ["field 'messages' must be a non-empty list of {role, content}"],
    ),
    (
        "message_not_object",
        _drop(_rec(messages=["hi"]), "prompt"),
        ["messages[0] must be an object with 'role' and 'content'"],
    ),
    (
        "content_not_string",
        _drop(_rec(messages=[{"role": "user", "content": None}]), "prompt"),
        ["messages[0].content must be a string, got NoneType"],
    ),
    (
        "unknown_role",
        _drop(_rec(messages=[{"role": "human", "content": Q}]), "prompt"),
        ["messages[0].role is 'human'", "use one of ['system', 'user', 'assistant']"],
    ),
    (
        "late_system",
        _drop(
            _rec(
                messages=[
                    {"role": "user", "content": "hi"},
                    {"role": "system", "content": "be nice"},
                    {"role": "user", "content": Q},
                ]
            ),
            "prompt",
        ),
        ["messages[1] is a system message; only the first may be"],
    ),
    ("meta_not_object", _rec(meta=["x"]), ["field 'meta' must be an object, got list"]),
    ("id_not_string", _rec(id=1.5), ["field 'id' must be a string, got float"]),
    ("not_an_object", ["a", "list"], ["expected a JSON object, got list"]),
    # --- no user turn -----------------------------------------------------------------
    (
        "no_conversation",
        _drop(_rec(), "prompt"),
        ["no user turn: add 'messages' (a list of turns) or 'prompt'"],
    ),
    (
        "empty_prompt",
        _rec(prompt="   "),
        ["field 'prompt' is empty: there is no user turn"],
    ),
    (
        "empty_messages",
        _drop(_rec(messages=[]), "prompt"),
        ["field 'messages' must be a non-empty list"],
    ),
    (
        "ends_with_assistant",
        _drop(
            _rec(
                messages=[
                    {"role": "user", "content": Q},
                    {"role": "assistant", "content": "Sure."},
                ]
            ),
            "prompt",
        ),
        ["must end with a user turn", "messages[1] is 'assistant'"],
    ),
    (
        "only_system",
        _drop(_rec(messages=[{"role": "system", "content": "be nice"}]), "prompt"),
        ["must end with a user turn", "messages[0] is 'system'"],
    ),
    (
        "empty_last_user",
        _drop(_rec(messages=[{"role": "user", "content": ""}]), "prompt"),
        ["messages[0].content is empty: no user question"],
    ),
    (
        "prompt_and_messages",
        _rec(messages=[{"role": "user", "content": Q}]),
        ["give either 'messages' or 'prompt', not both"],
    ),
]

BAD_IDS = [c[0] for c in BAD_RECORDS]


def _where(record):
    return (
        f"id {record['id']!r}" if isinstance(record, dict) and "id" in record else None
    )


@pytest.mark.parametrize("case, record, expected", BAD_RECORDS, ids=BAD_IDS)
def test_parse_chain_error(case, record, expected, aligncot):
    with pytest.raises(ChainRecordError) as info:
        parse_chain(record, aligncot, location="chains.jsonl:7")
    msg = str(info.value)
    where = ", ".join(p for p in ("chains.jsonl:7", _where(record)) if p)
    assert msg.startswith(f"record ({where}): "), msg
    for part in expected:
        assert part in msg, msg


@pytest.mark.parametrize("case, record, expected", BAD_RECORDS, ids=BAD_IDS)
def test_validate_jsonl_names_file_and_line(case, record, expected, aligncot, tmp_path):
    good = {"id": "ok-1", "prompt": "What is 2 + 2?", "answer": "4."}
    path = tmp_path / "chains.jsonl"
    # line 1 good, line 2 blank (still counted), line 3 good, line 4 the bad record
    lines = [
        json.dumps(good),
        "",
        json.dumps(dict(good, id="ok-2")),
        json.dumps(record),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ChainRecordError) as info:
        validate_jsonl(path, aligncot)
    msg = str(info.value)
    assert msg.startswith(f"record ({path}:4"), msg
    for part in expected:
        assert part in msg, msg


# Cases a datasets.Dataset can hold (Arrow needs one type per column, so the
# wrong-type cases are stopped by the pre-flight file check, tested above).
def _dataset(rows):
    """Like ``load_dataset("json")``: every column of every row, None where absent.

    (``Dataset.from_list`` would keep only the first row's keys.)
    """
    from datasets import Dataset

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})


DATASET_CASES = [
    "missing_answer",
    "empty_answer",
    "misspelled_stage",
    "no_conversation",
    "ends_with_assistant",
]


@pytest.mark.parametrize("case", DATASET_CASES)
def test_strategy_on_dataset_names_the_row(case, aligncot, tokenizer_for):
    from axolotl_mote.integration.strategy import ChainDatasetStrategy

    record, expected = {c: (r, e) for c, r, e in BAD_RECORDS}[case]
    good = {
        "id": "ok",
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "analysis": "Arithmetic.",
        "guidance": "Answer.",
        "answer": "4.",
    }
    bad = {**record}
    if "prompt" in bad:  # one conversation column for the whole dataset
        bad["messages"] = [{"role": "user", "content": bad.pop("prompt")}]
    rows = [dict(good, id="ok-0"), dict(good, id="ok-1"), bad, dict(good, id="ok-3")]
    strategy = ChainDatasetStrategy(
        aligncot, tokenizer_for(aligncot), sequence_len=256, source="hub/chains"
    )
    with pytest.raises(ChainRecordError) as info:
        strategy.wrap_dataset(_dataset(rows))
    msg = str(info.value)
    # the bad row is row 2, named with its id, even though Arrow gave every row
    # every column (None where the key was absent)
    assert msg.startswith("record (hub/chains row 2, id 'bad-1'): "), msg
    for part in expected:
        assert part in msg, msg


def test_dataset_columns_absent_in_a_row_are_not_unknown_keys(aligncot, tokenizer_for):
    """Arrow fills a column missing from a row with None; that is "absent", not
    unknown."""
    from axolotl_mote.integration.strategy import ChainDatasetStrategy

    rows = [
        {"id": "a", "prompt": "Q1?", "answer": "A1.", "meta": {"source": "x"}},
        {"id": "b", "prompt": "Q2?", "answer": "A2.", "check": "SAFE"},
    ]
    strategy = ChainDatasetStrategy(aligncot, tokenizer_for(aligncot), sequence_len=256)
    out = strategy.wrap_dataset(_dataset(rows))
    assert len(out) == 2 and strategy.last_stats["chains"] == 2


# --- file-level problems -----------------------------------------------------------
@pytest.mark.parametrize(
    "line, expected",
    [
        (
            '{"id": "x", "prompt": "q", "answer": "a"',
            "not valid JSON (Expecting ',' delimiter",
        ),
        (
            '{"id": "x", prompt: "q"}',
            "not valid JSON (Expecting property name enclosed in double quotes",
        ),
        ("not json at all", "not valid JSON (Expecting value at column 1)"),
        ('{"id": "x"} trailing', "not valid JSON (Extra data"),
    ],
    ids=["truncated", "unquoted_key", "plain_text", "trailing_text"],
)
def test_broken_json_line(line, expected, aligncot, tmp_path):
    path = tmp_path / "chains.jsonl"
    good = json.dumps({"id": "ok", "prompt": "q", "answer": "a"})
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(ChainRecordError) as info:
        validate_jsonl(path, aligncot)
    first, stopped = str(info.value).split("\n")
    assert first.startswith(f"{path}:2: {expected}"), first
    assert first.endswith("each line must be one JSON object")
    assert stopped == (
        f"{path}: the check stopped at line 2: the lines after it were not read (fix "
        "that line and check again)"
    )


def test_duplicate_ids_name_both_lines(aligncot, tmp_path):
    path = tmp_path / "chains.jsonl"
    recs = [{"id": i, "prompt": "q", "answer": "a"} for i in ("a", "b", "c", "a")]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(
        ChainRecordError,
        match=re.escape(
            f"{path}:4: duplicate id 'a' (first on line 1); ids must be unique"
        ),
    ):
        validate_jsonl(path, aligncot)


def test_validate_jsonl_counts(aligncot, tmp_path):
    path = tmp_path / "chains.jsonl"
    recs = [
        {
            "id": "1",
            "prompt": "q",
            "analysis": "x",
            "guidance": "y",
            "answer": "a",
            "check": "SAFE",
        },
        {"id": "2", "prompt": "q", "answer": "a"},
        {"id": "3", "prompt": "q", "analysis": "x", "answer": "a"},
        {"id": "4", "prompt": "q", "guidance": None, "answer": "a"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert validate_jsonl(path, aligncot) == {
        "records": 4,
        "analysis": 2,
        "guidance": 1,
        "answer": 4,
        "check": 1,
    }


@pytest.mark.parametrize(
    "path, template",
    [
        ("data/chains.jsonl", "aligncot"),
        ("data/math_chains.jsonl", "plan_solve_verify"),
    ],
)
def test_bundled_files_pass(path, template):
    from axolotl_mote.templates import load_template

    repo = Path(__file__).resolve().parents[2]
    counts = validate_jsonl(repo / path, load_template(template))
    assert counts["records"] == sum(1 for line in (repo / path).open() if line.strip())


def test_plugin_preflight_stops_on_the_bad_line(aligncot, tmp_path):
    """The ``register`` hook's file check (``integration.validate_dataset_files``)."""
    from axolotl_mote.integration.config import validate_dataset_files

    path = tmp_path / "chains.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "q", "answer": "a"}) + "\n{oops\n")
    cfg = {
        "datasets": [
            {"path": str(path), "ds_type": "json", "type": "axolotl_mote.aligncot"}
        ]
    }
    with pytest.raises(ChainRecordError, match=re.escape(f"{path}:2: not valid JSON")):
        validate_dataset_files(cfg, aligncot)


def test_marker_not_a_single_token_names_the_fix(aligncot):
    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.markers import MarkerTokenError
    from axolotl_mote.tiny import build_tiny_tokenizer

    with pytest.raises(MarkerTokenError) as info:
        ChainFormatter(aligncot, build_tiny_tokenizer())  # markers never added
    msg = str(info.value)
    assert "marker '<|analysis|>' of template 'aligncot' encodes to" in msg
    assert "axolotl_mote.markers.add_marker_tokens(tokenizer, template)" in msg


# --- bad templates -----------------------------------------------------------------
def _aligncot_raw():
    from axolotl_mote.templates import template_dir

    return yaml.safe_load((template_dir() / "aligncot.yaml").read_text())


def _edit(fn):
    raw = _aligncot_raw()
    fn(raw)
    return raw


def _set(stage_index, **fields):
    def fn(raw):
        raw["stages"][stage_index].update(fields)

    return fn


def _del_stage_field(stage_index, field):
    def fn(raw):
        del raw["stages"][stage_index][field]

    return fn


BAD_TEMPLATES = [
    (
        "duplicate_start_marker",
        _edit(_set(1, start="<|analysis|>")),
        [
            "duplicate marker '<|analysis|>': used by question_analysis.start and "
            "answer_guidance.start; every marker must be unique"
        ],
    ),
    (
        "start_equals_end",
        _edit(_set(0, end="<|analysis|>")),
        [
            "duplicate marker '<|analysis|>': used by question_analysis.start and "
            "question_analysis.end"
        ],
    ),
    (
        "end_reused_as_start",
        _edit(_set(2, start="<|/guidance|>")),
        [
            "duplicate marker '<|/guidance|>': used by answer_guidance.end and "
            "safe_answer.start"
        ],
    ),
    (
        "duplicate_stage_key",
        _edit(_set(1, key="analysis")),
        ["duplicate stage key 'analysis'"],
    ),
    (
        "duplicate_stage_name",
        _edit(_set(1, name="question_analysis")),
        ["duplicate stage name 'question_analysis'"],
    ),
    (
        "empty_marker",
        _edit(_set(0, start=" ")),
        ["stage 'question_analysis': `start` marker is empty"],
    ),
    (
        "missing_end",
        _edit(_del_stage_field(0, "end")),
        ["stages.0.end", "Field required"],
    ),
    (
        "missing_key",
        _edit(_del_stage_field(2, "key")),
        ["stages.2.key", "Field required"],
    ),
    ("missing_stages", _edit(lambda r: r.pop("stages")), ["stages", "Field required"]),
    (
        "missing_answer_stage",
        _edit(lambda r: r.pop("answer_stage")),
        ["answer_stage", "Field required"],
    ),
    ("empty_stages", _edit(lambda r: r.update(stages=[])), ["`stages` is empty"]),
    (
        "typo_in_stage_field",
        _edit(_set(0, skipable=True)),
        ["stages.0.skipable", "Extra inputs are not permitted"],
    ),
    (
        "unknown_top_level_key",
        _edit(lambda r: r.update(stage_order=[])),
        ["stage_order", "Extra inputs are not permitted"],
    ),
    (
        "bad_mode",
        _edit(_set(0, mode="training")),
        ["stages.0.mode", "'train', 'context' or 'omit'"],
    ),
    (
        "answer_stage_unknown",
        _edit(lambda r: r.update(answer_stage="final")),
        [
            "`answer_stage: final` is not a stage; choose one of ['question_analysis', "
            "'answer_guidance', 'safe_answer', 'safety_check']"
        ],
    ),
    (
        "answer_stage_skippable",
        _edit(_set(2, skippable=True)),
        ["answer stage 'safe_answer' cannot be `skippable: true`"],
    ),
    (
        "answer_stage_omitted",
        _edit(_set(2, mode="omit")),
        ["answer stage 'safe_answer' must have `mode: train`"],
    ),
    (
        "stages_not_a_list",
        _edit(lambda r: r.update(stages={"a": 1})),
        ["stages", "Input should be a valid list"],
    ),
]


@pytest.mark.parametrize(
    "case, raw, expected", BAD_TEMPLATES, ids=[c[0] for c in BAD_TEMPLATES]
)
def test_bad_template_file(case, raw, expected, tmp_path):
    from axolotl_mote.templates import load_template

    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError) as info:
        load_template(path)
    msg = str(info.value)
    assert msg.startswith(f"invalid MoTE template {path.resolve()}"), msg
    for part in expected:
        assert part in msg, msg


@pytest.mark.parametrize(
    "content, expected",
    [
        ("stages: [\n  - {name: a", "is not valid YAML"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("", "must be a YAML mapping"),
    ],
    ids=["broken_yaml", "list", "empty_file"],
)
def test_unreadable_template_file(content, expected, tmp_path):
    from axolotl_mote.templates import load_template

    path = tmp_path / "t.yaml"
    path.write_text(content)
    with pytest.raises(
        ValueError, match=re.escape(f"MoTE template {path.resolve()} {expected}")
    ):
        load_template(path)


def test_template_missing_file_and_unknown_name(tmp_path):
    from axolotl_mote.templates import load_template

    missing = tmp_path / "nope.yaml"
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"mote.template: file {missing} does not exist"),
    ):
        load_template(missing)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "mote.template: unknown template 'algincot'; use one of ['aligncot', "
            "'plan_solve_verify'] or a path to your own .yaml file"
        ),
    ):
        load_template("algincot")
