"""What the CLI says it does, checked: output folders, refusals, the flags it names."""

from __future__ import annotations

import json

from click.testing import CliRunner

from axolotl_mote.cli.main import main
from axolotl_mote.deepspeed import deepspeed_config_path


def test_deepspeed_config_into_a_folder_path(tmp_path, monkeypatch):
    """`-o ds/` (not there yet) is a folder: ds/zero3.json, never a file named ds."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    wrote = runner.invoke(main, ["deepspeed-config", "zero3", "-o", "ds/"])
    assert wrote.exit_code == 0, wrote.output
    assert (tmp_path / "ds").is_dir()
    written = tmp_path / "ds" / "zero3.json"
    assert written.read_bytes() == deepspeed_config_path("zero3").read_bytes()
    # an existing folder without the slash, too
    again = runner.invoke(main, ["deepspeed-config", "zero2", "-o", "ds"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "ds" / "zero2.json").is_file()
    # the refusal speaks the CLI: --force, not the Python API's overwrite=True
    refused = runner.invoke(main, ["deepspeed-config", "zero3", "-o", "ds/"])
    assert refused.exit_code != 0
    assert "--force" in refused.output and "overwrite" not in refused.output
    forced = runner.invoke(main, ["deepspeed-config", "zero3", "-o", "ds/", "--force"])
    assert forced.exit_code == 0, forced.output


def test_export_refuses_to_overwrite_without_force(
    tiny_model_dir, tiny_tokenizer, aligncot, tmp_path
):
    from tests.helpers.tiny import build_mote

    mote, config = build_mote(tiny_model_dir, tiny_tokenizer, aligncot, r=2)
    adapter = tmp_path / "adapter"
    mote.save_pretrained(adapter)
    config.save(adapter)
    out = tmp_path / "out"
    args = ["export", "--adapter", str(adapter), "-o", str(out), "--stage", "answer"]
    runner = CliRunner()
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    target = out / "safe_answer" / "adapter_model.safetensors"
    before = target.read_bytes()
    (out / "safe_answer" / "mote_export.json").write_text("{}")  # a marker of "old"
    refused = runner.invoke(main, args)
    assert refused.exit_code != 0
    assert "--force" in refused.output and "overwrite" not in refused.output
    assert str(out / "safe_answer") in refused.output
    assert (out / "safe_answer" / "mote_export.json").read_text() == "{}"  # untouched
    # another stage into the same folder is fine; --force replaces
    other = runner.invoke(main, [*args[:-1], "analysis"])
    assert other.exit_code == 0, other.output
    forced = runner.invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert target.read_bytes() == before
    assert json.loads((out / "safe_answer" / "mote_export.json").read_text())


def test_a_missing_extra_is_one_line_naming_the_pip_command(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` fails
    res = CliRunner().invoke(main, ["serve", "--adapter", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: `axolotl-mote serve` needs the uvicorn package: pip install "
        "'axolotl-mote[serve]'"
    ]


def test_other_import_errors_are_not_dressed_up_as_missing_extras():
    from axolotl_mote.cli.main import missing_extra

    assert missing_extra(ModuleNotFoundError("x", name="numpy_typo")) is None
    assert missing_extra(ImportError("cannot import name 'x' from 'y'")) is None
    wrapped = ImportError("needs openai")
    wrapped.__cause__ = ModuleNotFoundError("no openai", name="openai")
    assert "pip install 'axolotl-mote[serve]'" in missing_extra(wrapped, "client")
    assert "axolotl-mote[eval]" in missing_extra(
        ModuleNotFoundError("m", name="matplotlib.pyplot")
    )


def test_known_third_party_noise_is_dropped_and_nothing_else():
    import logging
    import warnings

    from axolotl_mote.cli.main import quiet_third_party_noise

    quiet_third_party_noise()
    quiet_third_party_noise()  # idempotent: one filter per logger

    def shown(logger: str, message: str) -> bool:
        log = logging.getLogger(logger)
        record = log.makeRecord(logger, logging.WARNING, "f.py", 1, message, (), None)
        return bool(log.filter(record))

    assert not shown("torchao", "Failed to load /x/torchao/_C_mxfp8.so: Could not")
    assert not shown(
        "torch.utils._pytree",
        "<enum 'K'> is an Enum subclass and is now natively supported by torch.compile",
    )
    assert not shown("DeepSpeed", "Setting accelerator to CPU. If you have GPU")
    assert shown("torchao", "a real torchao problem")
    log = logging.getLogger("torchao")  # an error is never dropped, even if it matches
    error = log.makeRecord("torchao", logging.ERROR, "f.py", 1, "Failed to load x.so",
                           (), None)  # fmt: skip
    assert log.filter(error)
    assert shown("DeepSpeed", "ZeRO-3 cannot partition this model")
    assert shown("transformers.modeling_utils", "Failed to load weights.so")
    assert len(logging.getLogger("torchao").filters) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_noise()
        warnings.warn_explicit(
            "`torch.jit.script_method` is deprecated", DeprecationWarning,
            "_script.py", 1, module="torch.jit._script",
        )  # fmt: skip
        warnings.warn("some other deprecation", DeprecationWarning, stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other deprecation",
                                                "a real problem"]  # fmt: skip


def test_quickstart_next_steps_are_commands_that_parse(tmp_path):
    """Every `axolotl-mote ...` line the quickstart prints parses with this CLI."""
    import shlex

    from axolotl_mote.quickstart import next_steps

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (tmp_path / "my_chains.jsonl").write_text("")
    text = next_steps(str(tmp_path / "base"), adapter, tmp_path / "quickstart.yml")
    lines = text.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines]
    commands = [c for c in commands if c and c[0] == "axolotl-mote"]
    assert [c[1] for c in commands] == ["generate", "export", "validate"]
    ctx = main.make_context("axolotl-mote", ["generate"])
    for words in commands:
        if words[1] == "validate":
            words = [*words[:2], str(tmp_path / "my_chains.jsonl")]
        command = main.get_command(ctx, words[1])
        command.make_context(words[1], words[2:])  # raises on an unknown option


def test_export_serving_refuses_a_non_empty_folder_without_force(tmp_path):
    (tmp_path / "adapter").mkdir()
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    adapter = tmp_path / "adapter"
    args = ["export", "--adapter", str(adapter), "--serving", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "--force" in res.output and str(out) in res.output
    assert (out / "keep.txt").read_text() == "mine"


def test_a_failed_training_in_the_quickstart_is_one_line(tmp_path, monkeypatch):
    import subprocess

    import axolotl_mote.quickstart as quickstart

    def fail(*args, **kwargs):
        raise subprocess.CalledProcessError(1, ["axolotl", "train", "q.yml"])

    monkeypatch.setattr(quickstart, "run", fail)
    res = CliRunner().invoke(main, ["quickstart", "--tiny", "-o", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: `axolotl train q.yml` failed with exit status 1; its error is printed "
        "above"
    ]
