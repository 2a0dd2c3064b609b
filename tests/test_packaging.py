"""What the wheel ships: every subpackage, the resources, nothing experimental, and a
package that works from an install outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_subpackage_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "axolotl_mote").rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {found - listed}"


def test_resources_resolve_in_the_checkout():
    from axolotl_mote.resources import resource, resource_dir

    assert resource("demo", "chains.jsonl").is_file()
    assert resource("example_configs", "quickstart.yml").is_file()
    assert (resource_dir("prompt_templates") / "aligncot.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="not part of this axolotl-mote"):
        resource("demo", "nope.jsonl")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), "."],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("axolotl_mote-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_its_data_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    from axolotl_mote import __version__

    tops = {n.split("/")[0] for n in names}
    assert tops == {"axolotl_mote", f"axolotl_mote-{__version__}.dist-info"}, tops
    for needed in (
        "axolotl_mote/prompt_templates/aligncot.yaml",
        "axolotl_mote/prompt_templates/rubrics/judge.yaml",
        "axolotl_mote/demo/chains.jsonl",
        "axolotl_mote/demo/eval/harmful.jsonl",
        "axolotl_mote/example_configs/quickstart.yml",
        "axolotl_mote/deepspeed_configs/zero3.json",
    ):
        assert needed in names
    assert not any("ablation" in n or "docgen" in n for n in names)
    assert any(n.endswith("licenses/LICENSE") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[axolotl.cli_commands]\nmote = axolotl_mote.cli.main:main" in text


@pytest.mark.slow
def test_the_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    """Installed (not editable) into a folder first on sys.path, run from elsewhere:
    templates, demo data and the CLI come from the wheel, and nothing is written into
    the installed package."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q"]
        + ["--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    code = (
        "import axolotl_mote, axolotl_mote.resources as r;"
        "print(axolotl_mote.__file__);"
        "print(r.resource('demo', 'chains.jsonl'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    package, chains = out.stdout.split()
    assert package.startswith(str(target)) and chains.startswith(str(target))
    cli = subprocess.run(
        [sys.executable, "-m", "axolotl_mote.cli.main", "template", "aligncot"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert "safe_answer" in cli.stdout and str(target) in cli.stdout
    before = sorted(p.name for p in (target / "axolotl_mote").iterdir())
    assert "outputs" not in before
