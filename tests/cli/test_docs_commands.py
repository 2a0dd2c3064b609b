"""Every ``axolotl-mote …`` command line in README.md, docs/*.md and the README that
``export --serving`` writes parses against the real CLI (click): the command exists,
every option exists, values have the right type or choice, required options are
given. Paths are not checked for existence (the docs name folders a user creates).

Command lines are the ones in fenced code blocks (continuation lines joined, shell
comments and ``$`` prompts dropped, several commands per line split at ``&&``, ``|``
and ``;``). Inline mentions (`` `axolotl-mote template NAME [--tokenizer DIR]` ``)
are often fragments, so only their command and option names are checked.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SEPARATORS = {"&&", "||", "|", ";"}


def _blocks(text: str) -> tuple[list[str], str]:
    """(logical lines inside fenced code blocks, the text outside them)."""
    inside, lines, outside, pending = False, [], [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            outside.append(line)
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        lines.append(pending)
        pending = ""
    return lines, "\n".join(outside)


def _commands(line: str) -> list[list[str]]:
    """The argument lists after each ``axolotl-mote`` at a command position."""
    line = line.strip().removeprefix("$ ")
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # not shell (e.g. Python with an odd quote)
        return []
    out, current = [], None
    for word in words:
        if word in SEPARATORS:
            current = None
        elif current is not None:
            current.append(word)
        elif word == "axolotl-mote" and (not out or current is None):
            current = []
            out.append(current)
    return [c for c in out if c]


def _all_command_lines() -> tuple[list, list]:
    full, inline = [], []
    for path in DOCS:
        lines, outside = _blocks(path.read_text())
        for line in lines:
            if "axolotl-mote" in line:
                full += [(path.name, line.strip(), args) for args in _commands(line)]
        for span in re.findall(r"`(axolotl-mote [^`]+)`", outside):
            inline.append((path.name, span, span.split()[1:]))
    return full, inline


def _bundle_readme_lines() -> list:
    from axolotl_mote.serving.bundle import serving_readme

    manifest = {
        "source_adapter": "outputs/mote", "stage_rank": 16, "prompt_rank": 64,
        "max_lora_rank": 64, "max_loras": 4, "prompt_adapter": "prompt",
        "stages": [{"adapter": "question_analysis"}, {"adapter": "safe_answer"}],
    }  # fmt: skip
    lines, _ = _blocks(serving_readme(manifest, Path("serving")))
    return [
        ("bundle README", line.strip(), args)
        for line in lines
        if "axolotl-mote" in line
        for args in _commands(line)
    ]


FULL, INLINE = _all_command_lines()
BUNDLE = _bundle_readme_lines()


def _command(name: str) -> click.Command:
    from axolotl_mote.cli.main import main

    with click.Context(main) as ctx:
        command = main.get_command(ctx, name)
    assert command is not None, f"no command {name!r} (axolotl-mote --help)"
    return command


def test_the_docs_have_command_lines_to_check():
    assert len(FULL) >= 15  # the extraction works (README, generation, serving…)
    assert any(args[0] == "serve" for _, _, args in FULL)
    assert [args[:2] for _, _, args in BUNDLE] == [["client", "--bundle"]]


@pytest.mark.parametrize(
    ("where", "line", "args"),
    FULL + BUNDLE,
    ids=[f"{w}:{' '.join(a[:3])}" for w, _, a in FULL + BUNDLE],
)
def test_a_documented_command_line_parses(where, line, args, monkeypatch):
    monkeypatch.setattr(click.Path, "convert", lambda self, value, param, ctx: value)
    command = _command(args[0])
    if "--help" in args:
        return
    try:
        command.make_context(f"axolotl-mote {args[0]}", list(args[1:]))
    except click.BadParameter as err:  # a callback that reads a file the docs name
        if "does not exist" not in err.format_message():
            pytest.fail(f"{where}: `{line}`: {err.format_message()}")
    except click.UsageError as err:
        pytest.fail(f"{where}: `{line}`: {err.format_message()}")


@pytest.mark.parametrize(
    ("where", "line", "args"), INLINE, ids=[f"{w}:{s}" for w, s, _ in INLINE]
)
def test_an_inline_command_names_real_options(where, line, args):
    if args[0] in ("--help", "--version"):
        return
    command = _command(args[0].rstrip("`,.:;"))
    names = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    for word in args[1:]:
        option = word.strip("[]`,.:;").split("=")[0]
        if option.startswith("-") and option not in ("-", "--"):
            assert option in names, f"{where}: `{line}`: no option {option}"
