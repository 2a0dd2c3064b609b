"""docs/templates.md stays true: its template validates, its data passes the record
check, and the `axolotl-mote template` output it shows is what the command prints."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from axolotl_mote.cli.main import main

DOC = (Path(__file__).resolve().parents[1] / "docs" / "templates.md").read_text()


def _block(after: str, fence: str) -> str:
    return DOC.split(after, 1)[1].split(f"```{fence}\n", 1)[1].split("```", 1)[0]


def test_the_documented_template_data_and_output(tmp_path):
    template = tmp_path / "debug.yaml"
    template.write_text(_block("## 1. The template file", "yaml"))
    data = tmp_path / "bugs.jsonl"
    data.write_text(_block("## 3. Data", "json"))
    runner = CliRunner()
    shown = runner.invoke(main, ["template", str(template)])
    assert shown.exit_code == 0, shown.output
    expected = _block("## 2. Check it before training anything", "text")
    assert shown.output.replace(str(template), "debug.yaml") == expected
    checked = runner.invoke(main, ["validate", "--template", str(template), str(data)])
    assert checked.exit_code == 0, checked.output
    assert '"records": 2' in checked.output
