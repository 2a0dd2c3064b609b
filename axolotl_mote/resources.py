"""Files shipped with the package: templates, demo data, example configs.

They live once, at the top of the repository (``prompt_templates/``, ``data/``,
``example_configs/``), and the wheel maps them into the package
(``axolotl_mote/prompt_templates/``, ``axolotl_mote/demo/``,
``axolotl_mote/example_configs/``; ``pyproject.toml``, ``package-dir``). This module
finds them in either layout, so a source checkout, an editable install and an
installed wheel all read the same files.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
#: resource name -> its folder in a source checkout (relative to the repository root)
_CHECKOUT = {
    "prompt_templates": "prompt_templates",
    "demo": "data",
    "example_configs": "example_configs",
}


def resource_dir(name: str) -> Path:
    """The folder of a shipped resource (``prompt_templates``, ``demo`` or
    ``example_configs``) in the installed package, else in the source checkout."""
    if name not in _CHECKOUT:
        raise ValueError(f"unknown resource {name!r}; one of {sorted(_CHECKOUT)}")
    for candidate in (_PACKAGE / name, _PACKAGE.parent / _CHECKOUT[name]):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"the {name} files are missing from this axolotl-mote install ({_PACKAGE}); "
        "reinstall the package (pip install --force-reinstall axolotl-mote)"
    )


def resource(name: str, *parts: str) -> Path:
    """A file inside a shipped resource folder, e.g. ``resource("demo",
    "chains.jsonl")``."""
    path = resource_dir(name).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is not part of this axolotl-mote install")
    return path
