"""Bad input a user can give, each answered by a message naming file, line or key and
the fix; never a traceback, never a silent drop."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from axolotl_mote.args import MoteArgs
from axolotl_mote.cli.main import main

BASE = {"plugins": ["axolotl_mote.MotePlugin"], "adapter": "lora", "lora_r": 8}
GOOD = {"id": "ok", "prompt": "What is 2 + 2?", "answer": "4."}


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _jsonl(path, *records, raw: bytes = b""):
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records) + raw
    path.write_bytes(data)
    return path


# --- data files -------------------------------------------------------------------
def test_non_utf8_byte_names_file_line_and_column(tmp_path):
    path = _jsonl(tmp_path / "latin1.jsonl", GOOD, raw=b'{"prompt": "caf\xe9"}\n')
    result = _cli("validate", path)
    assert result.exit_code == 1
    assert f"{path}:2: byte 0xe9 at column 16 is not UTF-8" in result.output
    assert "save the file as UTF-8" in result.output


def test_empty_file_is_reported_not_ok(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    result = _cli("validate", path)
    assert result.exit_code == 1
    assert "no records (the file is empty" in result.output


@pytest.mark.parametrize("validate_files", [True, False])
def test_register_refuses_an_empty_dataset_file(tmp_path, validate_files):
    """Without this, `axolotl preprocess` dies inside `datasets` (StopIteration)."""
    from axolotl_mote.plugin import MotePlugin

    path = tmp_path / "empty.jsonl"
    path.write_text("")
    cfg = {
        **BASE,
        "mote": {"validate_files": validate_files},
        "datasets": [{"path": str(path), "type": "axolotl_mote.aligncot"}],
    }
    with pytest.raises(ValueError, match=rf"{path}.*no records"):
        MotePlugin().register(cfg)


def test_validate_reports_every_bad_record_with_a_limit(tmp_path):
    bad = [dict(GOOD, id=f"b{i}", answr="typo") for i in range(5)]
    path = _jsonl(tmp_path / "bad.jsonl", GOOD, *bad)
    result = _cli("validate", path, "--max-errors", 3)
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if "unknown key(s)" in ln]
    assert len(lines) == 3
    assert all(
        f"bad.jsonl:{n}, id 'b{n - 2}'" in ln for n, ln in zip((2, 3, 4), lines)
    ), lines
    assert "... and 2 more bad record(s)" in result.output
    assert "5 bad record(s), 1 good" in result.output


def test_validate_takes_a_config(tmp_path, monkeypatch):
    """Relative dataset paths are read from the working directory, as `axolotl train`
    reads them (tests/data/test_validate_config.py: from elsewhere)."""
    import yaml

    monkeypatch.chdir(tmp_path)

    good = _jsonl(tmp_path / "good.jsonl", GOOD)
    bad = _jsonl(tmp_path / "bad.jsonl", dict(GOOD, answer=""))
    cfg = {
        **BASE,
        "mote": {"template": "aligncot"},
        "datasets": [
            {"path": "good.jsonl", "type": "axolotl_mote.aligncot"},
            {"path": str(bad), "type": "axolotl_mote.aligncot"},
            {"path": "other.jsonl", "type": "alpaca"},  # not ours: not checked
        ],
    }
    config = tmp_path / "mote.yml"
    config.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["validate", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert f"{good.name}: OK" in result.output
    assert f"{bad}:1" in result.output and "stage 'answer' is empty" in result.output


# --- the mote: block ----------------------------------------------------------------
def test_quoted_numbers_are_read_as_numbers():
    args = MoteArgs.model_validate(
        {**BASE, "mote": {"step_skip_prob": "0.3", "alpha": "0.5", "seed": "7"}}
    )
    assert (args.mote.step_skip_prob, args.mote.alpha, args.mote.seed) == (0.3, 0.5, 7)
    MoteArgs.model_validate({**BASE, "sequence_parallel_degree": "1", "mote": {}})


@pytest.mark.parametrize(
    "mote, needles",
    [
        ({"step_skip_prob": "often"}, ["mote.step_skip_prob:", "(got 'often')"]),
        ({"alpha": "half"}, ["mote.alpha:", "(got 'half')"]),
        ({"shared_expert": "maybe"}, ["mote.shared_expert:", "(got 'maybe')"]),
        ({"skip_stages": ["answer"]}, ["mote.skip_stages: 'answer' is the answer"]),
        ({"skip_stages": ["check"]}, ["mote.skip_stages: 'check' has mode omit"]),
        ({"templte": "aligncot"}, ["mote.templte: unknown key; valid keys"]),
        (["template", "aligncot"], ["mote: must be a mapping of options, got list"]),
    ],
)
def test_bad_mote_values_name_the_key(mote, needles):
    with pytest.raises((ValidationError, ValueError)) as err:
        MoteArgs.model_validate({**BASE, "mote": mote})
    for needle in needles:
        assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize("key", ["motes", "Mote", "mote_config", "mtoe"])
def test_a_misspelled_block_is_not_dropped_silently(key):
    with pytest.raises(ValidationError, match=rf"{key}: is not a config key.*`mote:`"):
        MoteArgs.model_validate({**BASE, key: {"alpha": 0.5}})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValidationError) as err:
        MoteArgs.model_validate(
            {**BASE, "adapter": None, "motes": {}, "mote": {"alpha": 3}}
        )
    text = str(err.value)
    for needle in ("motes:", "set `adapter: lora`", "mote.alpha must be in (0, 1]"):
        assert needle in text


# --- the command line ---------------------------------------------------------------
def test_bad_template_option_is_a_usage_error(tmp_path):
    result = _cli("validate", _jsonl(tmp_path / "c.jsonl", GOOD), "--template", "nope")
    assert result.exit_code == 2
    assert "Invalid value for '--template'" in result.output
    assert "unknown template 'nope'" in result.output


def test_bad_template_file_is_reported_by_the_template_command(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nanswer_stage: a\nstages: []\n")
    result = _cli("template", path)
    assert result.exit_code == 1
    assert "`stages` is empty" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "plan, needle",
    [
        ("analysis", "lacks the answer stage"),
        ("answer>analysis", "template order"),
        ("analysis>nope", "has no stage 'nope'"),
        ("check>answer", "only trained stages"),
    ],
)
def test_bad_plan_is_refused_before_loading_a_model(tmp_path, plan, needle):
    from axolotl_mote.templates import load_template
    from axolotl_mote.tuner.config import MoteConfig

    template = load_template("aligncot")
    MoteConfig(
        stage_names=[s.name for s in template.trained_stages],
        template_data=template.model_dump(mode="json", exclude={"source"}),
    ).save(tmp_path)
    result = _cli(
        "generate", "--adapter", tmp_path, "--base-model", tmp_path / "no-model",
        "--prompt", "hi", "--plan", plan,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Invalid value for --plan" in result.output and needle in result.output


def test_not_a_mote_adapter_is_named(tmp_path):
    result = _cli(
        "generate", "--adapter", tmp_path, "--base-model", "x", "--prompt", "hi"
    )
    assert result.exit_code == 2
    assert "not a MoTE adapter" in result.output
