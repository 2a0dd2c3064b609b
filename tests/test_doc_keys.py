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
