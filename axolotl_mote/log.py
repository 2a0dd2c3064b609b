"""Loggers that show up in Axolotl's console output.

Axolotl's logging config passes INFO records of loggers named ``axolotl*`` (our
``axolotl_mote.*`` names qualify) once the logger's own level lets them through; its
``get_logger`` also logs on the main process only. Outside Axolotl, plain ``logging``.
"""

from __future__ import annotations

import logging
from typing import Any


def get_logger(name: str) -> Any:
    try:
        from axolotl.utils.logging import get_logger as axolotl_get_logger
    except ImportError:  # pragma: no cover - axolotl is a hard dependency
        return logging.getLogger(name)
    return axolotl_get_logger(name)
