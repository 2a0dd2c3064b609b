"""Making every saved adapter self-describing: ``mote_config.json`` beside the weights.

The expert weights themselves are ordinary PEFT LoRA tensors (rank blocks), saved by PEFT
in ``adapter_model.safetensors`` by every path Axolotl uses (checkpoints, final save,
ZeRO-3 gathered save). Only the routing description needs writing, on the main process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _is_main_process() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def write_mote_config(cfg: Any, out_dir: str | os.PathLike | None) -> Path | None:
    """Write mote_config.json into ``out_dir`` (idempotent, main process only)."""
    if out_dir is None or not _is_main_process():
        return None
    from axolotl_mote.runtime import build_mote_config

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return build_mote_config(cfg).save(out_dir)
