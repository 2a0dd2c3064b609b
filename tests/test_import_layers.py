"""The package's import layers stay as designed (lazy imports inside functions count).

Every module belongs to a layer; a module may import only from lower layers, or from its
own subpackage. Three rules on top: ``tuner/`` needs only torch + peft (no Axolotl),
``data/`` never reaches into ``tuner/`` (step ids travel in the batch), and nothing
imports ``cli/``. A new module must be given a layer here, which is the moment to think
about where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "axolotl_mote"

#: layer -> modules (a name ending in ".*" covers a subpackage)
LAYERS: dict[int, list[str]] = {
    0: ["constants", "log", "resources", "endpoints"],
    1: ["templates", "routing", "attention", "deepspeed", "tiny", "smollm2", "metrics"],
    2: ["markers", "masks", "tuner", "tuner.config", "tuner.reference", "data.schema"],
    3: ["args", "tuner.layer", "data.format", "data.stats", "export"],
    4: ["settings", "tuner.model", "generation.router", "generation.plan"],
    5: ["data.*", "generation.*", "loading"],
    6: ["integration.*", "datagen.backends"],
    7: ["datagen.*", "evaluation.*", "serving.*"],
    8: ["plugin", "quickstart", "aligncot", "chains"],
    9: ["cli.*"],
    10: [""],  # the package itself: the lazy public surface
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best = None
    for layer, names in LAYERS.items():
        for name in names:
            exact = name == module
            wild = name.endswith(".*") and (
                module == name[:-2] or module.startswith(name[:-1])
            )
            if exact or wild:  # an exact name beats a subpackage wildcard
                if exact or best is None:
                    best = (exact, layer)
    if best is None:
        raise AssertionError(f"axolotl_mote.{module} has no layer in LAYERS")
    return best[1]


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(axolotl_mote modules, other top-level packages) imported anywhere in it."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - node.level + 1]
                base = "axolotl_mote." + ".".join([*parts, base]).strip(".")
            names = []
            for alias in node.names:  # `from pkg import submodule` names the module
                sub = f"{base}.{alias.name}"
                in_package = sub.removeprefix("axolotl_mote.") in MODULES
                names.append(sub if in_package else base)
        for name in names:
            if name == "axolotl_mote" or name.startswith("axolotl_mote."):
                target = name.removeprefix("axolotl_mote").lstrip(".")
                while target not in MODULES:
                    target = target.rpartition(".")[0]
                if target != module:
                    ours.add(target)
            else:
                others.add(name.split(".")[0])
    return ours, others


def _subpackage(module: str) -> str:
    """``data.format`` -> ``data``; the package ``data`` itself -> ``data``."""
    if MODULES[module].name == "__init__.py":
        return module.split(".")[0]
    return module.split(".")[0] if "." in module else ""


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    layer = _layer(module)
    ours, _ = _imports(module)
    for target in sorted(ours):
        same_package = _subpackage(module) and _subpackage(target) == _subpackage(
            module
        )
        assert same_package or _layer(target) < layer, (
            f"axolotl_mote.{module} (layer {layer}) imports axolotl_mote.{target} "
            f"(layer {_layer(target)})"
        )


def test_the_library_rules():
    for module in MODULES:
        ours, others = _imports(module)
        if module.startswith("tuner"):
            assert "axolotl" not in others, f"{module}: tuner/ must not import Axolotl"
            assert all(t.startswith("tuner") or _layer(t) <= 1 for t in ours), module
        if module.split(".")[0] == "data":  # not datagen
            assert not any(t.startswith("tuner") for t in ours), module
        if not module.startswith("cli"):
            assert not any(t.startswith("cli") for t in ours), module
        if module.split(".")[0] in ("tuner", "data", "generation", "routing", "masks"):
            assert not any(t.startswith("integration") for t in ours), module


def _reach(module: str) -> tuple[set[str], set[str]]:
    """(our modules, other top-level packages) ``module`` imports, directly or through
    any chain of our modules."""
    ours, others = set(), set()
    todo = [module]
    while todo:
        current = todo.pop()
        direct, outside = _imports(current)
        others |= outside
        for target in direct - ours:
            ours.add(target)
            todo.append(target)
    return ours, others


def test_the_library_rules_hold_through_indirect_imports():
    """The same rules, followed through every chain of imports: data/ once reached
    tuner/ and Axolotl through settings (the strategy and collator, Axolotl glue,
    now live in integration/)."""
    for module in MODULES:
        ours, others = _reach(module)
        if module.startswith("tuner"):
            assert "axolotl" not in others, f"{module} reaches Axolotl"
        if module.split(".")[0] == "data":  # not datagen
            assert not any(t.startswith("tuner") for t in ours), f"{module}: tuner/"
            assert "axolotl" not in others, f"{module} reaches Axolotl"
        if not module.startswith("cli") and module:
            assert not any(t.startswith("cli") for t in ours), f"{module}: cli/"
        if module.split(".")[0] in ("tuner", "data", "generation", "routing", "masks"):
            assert not any(t.startswith("integration") for t in ours), module


def test_the_import_graph_has_no_cycle():
    graph = {m: _imports(m)[0] for m in MODULES}
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, "import cycle: " + " -> ".join((*stack, node))
        if node in done:
            return
        for nxt in graph[node]:
            visit(nxt, (*stack, node))
        done.add(node)

    for module in graph:
        visit(module, ())


def test_importing_the_package_and_its_args_loads_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, axolotl_mote, axolotl_mote.args;"
        "heavy = [m for m in ('torch', 'peft', 'transformers', 'axolotl') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
