"""The CLI says what every option does, and samples one way.

Every option of every ``axolotl-mote`` command has help text (``--help`` is how a new
user learns a command), and sampling is switched on the same way wherever a command
generates: by giving ``--temperature``, never by a separate flag.
"""

from __future__ import annotations

import click
import pytest

from axolotl_mote.cli.main import main

CONTEXT = click.Context(main)
COMMANDS = {
    name: main.get_command(CONTEXT, name) for name in main.list_commands(CONTEXT)
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help(name):
    missing = [
        p.opts[0]
        for p in COMMANDS[name].params
        if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()
    ]
    assert not missing, f"axolotl-mote {name}: options without help: {missing}"


def test_sampling_is_switched_on_by_temperature_alone():
    generating = [n for n, c in COMMANDS.items()
                  if any(p.name == "temperature" for p in c.params)]  # fmt: skip
    assert {"generate", "evaluate", "generate-data"} <= set(generating)
    for name in generating:
        names = {p.name for p in COMMANDS[name].params}
        assert "do_sample" not in names, f"{name} has a second sampling switch"


def test_the_readme_option_table_is_the_cli():
    """README.md's table of shared options lists exactly the commands that take each
    option (the claim "one vocabulary" was once wider than the CLI)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("Where the shared ones are:")[1].split("\n\n")[1]
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert len(rows) >= 10
    for row in rows:
        options_cell, commands_cell = row.strip("|").split("|")
        claimed = {c.strip() for c in commands_cell.split(",")}
        for option in re.findall(r"`(--[a-z0-9-]+)", options_cell):
            real = {
                name
                for name, cmd in COMMANDS.items()
                if any(option in p.opts for p in cmd.params)
            }
            assert real == claimed, f"{option}: README says {claimed}, CLI has {real}"
