"""Every ``mote.<key>`` a message or a doc tells the user to set exists.

A message that names a key the ``mote:`` block does not have (``mote.step_skip_kernel``
once) sends the user to a config error. The names are collected from the package's
source (error messages, help), README.md, docs/, data/README.md and the example
configs, and checked against ``MoteOptions``' fields.
"""

from __future__ import annotations

import re
from pathlib import Path

from axolotl_mote.args import MoteOptions

REPO = Path(__file__).resolve().parents[1]
#: ``mote.<key>`` not preceded by a name or a path (``axolotl_mote.x``, ``a/mote.yml``)
KEY = re.compile(r"(?<![\w./-])mote\.([a-z_]+)\b")
#: what is not a config key: file names, and the ``mote`` field of a server reply
NOT_KEYS = {"yml", "yaml", "stopped", "dropped_stages", "get"}


def _sources() -> list[Path]:
    files = [*sorted((REPO / "axolotl_mote").rglob("*.py"))]
    files += [REPO / "README.md", REPO / "data" / "README.md"]
    files += sorted((REPO / "docs").glob("*.md"))
    files += sorted((REPO / "example_configs").glob("*.yml"))
    return [f for f in files if f.exists()]


def test_every_named_mote_key_exists():
    fields = set(MoteOptions.model_fields)
    named: dict[str, list[str]] = {}
    for path in _sources():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for key in KEY.findall(line):
                if key not in NOT_KEYS:
                    named.setdefault(key, []).append(
                        f"{path.relative_to(REPO)}:{lineno}"
                    )
    assert named, "no mote.<key> found: the pattern is broken"
    unknown = {k: where for k, where in named.items() if k not in fields}
    assert not unknown, f"mote.<key> names that are not options: {unknown}"


def test_the_pattern_catches_a_wrong_key():
    """The check itself can fail: the old message's key is caught."""
    line = "set mote.step_skip_kernel: dense for this model (see axolotl_mote.masks)"
    assert KEY.findall(line) == ["step_skip_kernel"]
    assert "step_skip_kernel" not in MoteOptions.model_fields


#: ``tests/<path>.py`` and an optional ``::test_name``, as docs and docstrings cite them
TEST_PATH = re.compile(r"(?<![\w/])(tests/[\w/]+\.py)(?:::(\w+))?")


def test_every_cited_test_exists():
    """A doc that sends a reader to ``tests/x.py::test_y`` must find it there: the test
    tree mirrors the package and files move (tests/test_serving.py became
    tests/serving/test_serving.py)."""
    sources = _sources() + sorted((REPO / "benchmarks").rglob("*.py"))
    sources += [
        f for f in sorted((REPO / "tests").rglob("*.py")) if f != Path(__file__)
    ]
    cited, missing = 0, []
    for path in sources:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for file, name in TEST_PATH.findall(line):
                cited += 1
                target = REPO / file
                where = f"{path.relative_to(REPO)}:{lineno}"
                if not target.is_file():
                    missing.append(f"{where}: {file} does not exist")
                elif name and not re.search(rf"def {name}\b", target.read_text()):
                    missing.append(f"{where}: {file} has no {name}")
    assert cited > 10, "too few test paths found: the pattern is broken"
    assert not missing, "\n".join(missing)


def test_the_test_path_pattern_reads_a_citation():
    line = "(`tests/evaluation/test_safety_bench.py::test_tiny_end_to_end_and_resume`)"
    assert TEST_PATH.findall(line) == [
        ("tests/evaluation/test_safety_bench.py", "test_tiny_end_to_end_and_resume")
    ]
