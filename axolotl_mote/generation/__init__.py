"""Stage-aware generation for MoTE models (see docs/generation.md).

``router`` turns emitted markers into step ids (the routing state's resolver), ``plan``
keeps each row on its stage plan (a logits processor), ``chains`` is the Python API.
"""

from __future__ import annotations

from axolotl_mote.generation.chains import (
    ChainOutput,
    generate_chains,
    install_router,
    installed,
)
from axolotl_mote.generation.router import StageRouter, start_marker_steps

__all__ = [
    "ChainOutput",
    "StageRouter",
    "generate_chains",
    "install_router",
    "installed",
    "start_marker_steps",
]
