"""The installed stack provides every internal the plugin relies on.

Runs on both CI legs (Axolotl 0.19 with transformers 5.16, Axolotl 0.21 with
transformers 5.20): an upgrade that removes or renames one fails here, by name.
"""

from __future__ import annotations

import importlib

import pytest

from axolotl_mote.integration import compat


def test_the_installed_stack_keeps_every_assumption():
    assert compat.check_stack() == []


def test_a_broken_assumption_is_reported_by_name(monkeypatch):
    gone = compat.Assumption(
        "transformers", "a function that was renamed", "attention.example",
        compat._attr("transformers:no_such_function_anywhere"),
    )  # fmt: skip
    monkeypatch.setattr(compat, "ASSUMPTIONS", (*compat.ASSUMPTIONS, gone))
    assert compat.check_stack() == [
        "transformers: a function that was renamed (used by attention.example)"
    ]
    assert compat.check_stack(("peft",)) == []


@pytest.mark.parametrize("item", compat.ASSUMPTIONS, ids=lambda a: a.used_by)
def test_each_assumption_names_a_real_module_of_ours(item):
    """``used_by`` points at the code to change when the assumption breaks."""
    parts = item.used_by.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
        try:
            module = importlib.import_module("axolotl_mote." + ".".join(parts[:cut]))
        except ImportError:
            continue
        obj = module
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return
    raise AssertionError(f"{item.used_by} is not a module of axolotl_mote")
