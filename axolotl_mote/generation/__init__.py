"""Stage-aware generation for MoTE models (see docs/generation.md).

``router`` turns emitted markers into step ids, ``auto`` routes each forward by them
(forward hooks owned here, not by the tuner), ``plan`` keeps each row on its stage plan
(a logits processor), ``generate`` is the Python API.
"""

from __future__ import annotations

from axolotl_mote.generation.generate import (
    ChainOutput,
    generate_chains,
    install_router,
    parse_plan,
    split_plan,
)
from axolotl_mote.generation.router import StageRouter, start_marker_steps

__all__ = [
    "ChainOutput",
    "StageRouter",
    "generate_chains",
    "install_router",
    "parse_plan",
    "split_plan",
    "start_marker_steps",
]
