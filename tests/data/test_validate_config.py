"""`axolotl-mote validate`: what a new user's first mistakes look like.

Paths are read as `axolotl train` reads them (the working directory), lengths are
checked against the config's sequence_len, an unreadable line says where the check
stopped, records of another shipped template get its name, and a bad record at train
time is one message, not stacked tracebacks.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from axolotl_mote.cli.main import main

GOOD = {"prompt": "How do I bake bread?", "analysis": "Benign.", "answer": "Knead."}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(path, dataset_path, **extra):
    cfg = {
        "base_model": extra.pop("base_model", str(path.parent / "no_model")),
        "plugins": ["axolotl_mote.MotePlugin"],
        "mote": {"template": "aligncot"},
        "datasets": [{"path": str(dataset_path), "type": "axolotl_mote.aligncot"}],
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return cfg


@pytest.fixture()
def tokenizer_dir(tmp_path):
    from axolotl_mote.tiny import build_tiny_tokenizer

    out = tmp_path / "tok"
    build_tiny_tokenizer().save_pretrained(out)
    return out


def test_relative_paths_are_read_from_the_working_directory_like_training(
    tmp_path, monkeypatch, aligncot
):
    from axolotl_mote.integration.config import validate_dataset_files

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    _write_jsonl(project / "chains.jsonl", [GOOD])
    cfg = _config(project / "mote.yml", "chains.jsonl")
    runner = CliRunner()

    monkeypatch.chdir(elsewhere)  # training would not find it here
    res = runner.invoke(main, ["validate", "--config", str(project / "mote.yml")])
    assert res.exit_code == 1
    assert str(elsewhere / "chains.jsonl") in res.output  # where training looks
    assert str(project / "chains.jsonl") in res.output  # where the file is
    assert "OK" not in res.output
    with pytest.raises(Exception, match="not found"):  # and training agrees
        validate_dataset_files(cfg, aligncot)

    monkeypatch.chdir(project)  # found where training reads it
    res = runner.invoke(main, ["validate", "--config", "mote.yml"])
    assert res.exit_code == 0, res.output
    assert "chains.jsonl: OK" in res.output
    validate_dataset_files(cfg, aligncot)

    # a file of that name in both places: training reads the working directory's
    _write_jsonl(elsewhere / "chains.jsonl", [GOOD, {"prompt": "x"}])
    monkeypatch.chdir(elsewhere)
    res = runner.invoke(main, ["validate", "--config", str(project / "mote.yml")])
    assert "is read from the working directory" in res.output
    assert str(project / "chains.jsonl") in res.output
    assert res.exit_code == 1 and "missing required stage 'answer'" in res.output


def test_an_unreadable_line_says_where_the_check_stopped(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n" + json.dumps(GOOD) + "\n")
    res = CliRunner().invoke(main, ["validate", str(path)])
    assert res.exit_code == 1
    assert f"{path}:2: not valid JSON" in res.output
    assert "stopped at line 2" in res.output and "after it were not read" in res.output


def test_chains_longer_than_sequence_len_are_counted_and_named(tmp_path, tokenizer_dir):
    long = dict(GOOD, id="long-1", answer=" ".join(["word"] * 300))
    data = _write_jsonl(tmp_path / "c.jsonl", [dict(GOOD, id="short-1"), long])
    config = tmp_path / "mote.yml"
    _config(config, data, base_model=str(tokenizer_dir), sequence_len=128)
    res = CliRunner().invoke(main, ["validate", "--config", str(config)])
    assert res.exit_code == 0, res.output  # dropped by training: a warning
    assert "1 of 2 chains are longer than sequence_len=128" in res.output
    assert "long-1 (" in res.output and "short-1" not in res.output
    assert "drops them" in res.output
    _config(config, data, base_model=str(tokenizer_dir), sequence_len=128,
            excess_length_strategy="raise")  # fmt: skip
    res = CliRunner().invoke(main, ["validate", "--config", str(config)])
    assert res.exit_code == 1 and "stops on them" in res.output
    _config(config, data, base_model=str(tokenizer_dir), sequence_len=4096)
    res = CliRunner().invoke(main, ["validate", "--config", str(config)])
    assert res.exit_code == 0 and "longer than" not in res.output
    _config(config, data, base_model=str(tmp_path / "no_model"))
    res = CliRunner().invoke(main, ["validate", "--config", str(config)])
    assert res.exit_code == 0 and "length check skipped" in res.output


def test_records_of_another_shipped_template_get_its_name():
    from axolotl_mote.resources import resource

    math = resource("demo", "math_chains.jsonl")
    res = CliRunner().invoke(main, ["validate", str(math), "--max-errors", "1"])
    assert res.exit_code == 1
    assert "--template plan_solve_verify" in res.output
    ok = CliRunner().invoke(main, ["validate", str(math), "--template",
                                   "plan_solve_verify"])  # fmt: skip
    assert ok.exit_code == 0 and "hint" not in ok.output
    res = CliRunner().invoke(main, ["validate", "--template", "plan_solve_verify",
                                    str(resource("demo", "chains.jsonl"))])  # fmt: skip
    assert "--template aligncot" in res.output


def test_an_uncaught_record_error_prints_once_without_a_traceback():
    code = (
        "from axolotl_mote.data.schema import ChainRecordError, "
        "print_record_errors_once\n"
        "print_record_errors_once(); print_record_errors_once()\n"
        "import sys\n"
        "err = ChainRecordError('MoTE: bad records:\\nf.jsonl:2: not valid JSON')\n"
        "err.__cause__ = RuntimeError('a worker traceback')\n"
        "raise err if sys.argv[1] == 'record' else ValueError('other')\n"
    )
    run = [sys.executable, "-c", code]
    record = subprocess.run([*run, "record"], capture_output=True, text=True)
    assert record.returncode == 1
    assert record.stderr.count("f.jsonl:2: not valid JSON") == 1
    assert "Traceback" not in record.stderr and "worker" not in record.stderr
    other = subprocess.run([*run, "other"], capture_output=True, text=True)
    assert other.returncode == 1 and "Traceback" in other.stderr
