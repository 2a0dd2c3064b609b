"""The DeepSpeed JSON configs shipped inside the wheel, and how to get at them.

Axolotl's ``deepspeed:`` key takes a path (or an inline dict). A path such as
``axolotl_mote/deepspeed_configs/zero3.json`` is resolved against the current directory,
so it only works from a source checkout. From an installed package, either write a copy
next to your YAML::

    axolotl-mote deepspeed-config zero3 -o ds_zero3.json

or print the installed file's absolute path::

    python -c 'from axolotl_mote.deepspeed import deepspeed_config_path; \
print(deepspeed_config_path("zero3"))'

Every file leaves the values the HF Trainer fills (micro batch, gradient accumulation,
clipping, fp16/bf16 where sensible, ZeRO-3 bucket sizes) at ``"auto"`` and has no
``train_batch_size`` key: DeepSpeed derives it from micro batch x accumulation x its own
world size, which stays right when the Trainer and DeepSpeed disagree about the world
size (they do on CPU). ZeRO-3 files gather 16-bit weights on save, which MoTE's sidecar
export needs (docs/multi_node.md, "ZeRO-3 and MoTE").

No DeepSpeed import here: this module only reads files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "deepspeed_configs"

# name -> one-line description; the single registry of shipped configs.
DEEPSPEED_CONFIGS: dict[str, str] = {
    "zero1": "ZeRO-1: optimizer states sharded; precision follows bf16/fp16 in the "
    "YAML.",
    "zero2": "ZeRO-2: optimizer states and gradients sharded, no offload.",
    "zero3": "ZeRO-3: parameters sharded too; 16-bit weights gathered on save.",
    "zero3_bf16": "ZeRO-3 with bf16 always on (set bf16: true in the YAML).",
    "zero3_bf16_cpuoffload": "ZeRO-3, bf16, parameters and optimizer states offloaded "
    "to CPU RAM (for models that do not fit in GPU memory, e.g. 70B).",
}


def deepspeed_config_names() -> list[str]:
    """The names accepted by :func:`deepspeed_config_path`, sorted."""
    return sorted(DEEPSPEED_CONFIGS)


def deepspeed_config_path(name: str) -> Path:
    """Absolute path of the shipped DeepSpeed JSON called ``name`` (e.g. ``"zero3"``).

    ``name`` may also carry the ``.json`` suffix. Raises ``ValueError`` listing the
    valid names for anything else.
    """
    key = name[: -len(".json")] if name.endswith(".json") else name
    if key not in DEEPSPEED_CONFIGS:
        raise ValueError(
            f"unknown DeepSpeed config {name!r}; expected one of "
            f"{', '.join(deepspeed_config_names())}"
        )
    path = CONFIG_DIR / f"{key}.json"
    if not path.is_file():  # a broken install (package data not shipped)
        raise FileNotFoundError(
            f"{path} is missing from the installed axolotl-mote; reinstall the package "
            "(deepspeed_configs/*.json is package data)"
        )
    return path


def deepspeed_output_path(name: str, dest: str | Path) -> Path:
    """Where :func:`write_deepspeed_config` writes ``name`` for ``dest``.

    ``dest`` is a folder when it is one already or when it ends with a path separator
    (``ds/``: created, the file keeps its name, e.g. ``ds/zero3.json``); otherwise it
    is the file to write.
    """
    src = deepspeed_config_path(name)
    text = str(dest)
    out = Path(dest)
    if out.is_dir() or text.endswith(("/", os.sep)):
        out = out / src.name
    return out


def write_deepspeed_config(
    name: str, dest: str | Path, *, overwrite: bool = False
) -> Path:
    """Copy the shipped config ``name`` to ``dest`` and return the written path.

    ``dest`` may be a folder (an existing one, or any path ending in ``/``: the file
    keeps its name, e.g. ``zero3.json``) or a file path. An existing file is only
    replaced with ``overwrite=True``.
    """
    src = deepspeed_config_path(name)
    out = deepspeed_output_path(name, dest)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return out
