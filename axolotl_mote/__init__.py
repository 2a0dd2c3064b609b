"""axolotl-mote: MoTE (Mixture of insighTful Experts) for Axolotl.

``plugins: [axolotl_mote.MotePlugin]`` enables it; see README.md. Importing the package
is cheap: the plugin and everything heavy load lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["MotePlugin", "__version__", "load_mote_model", "load_template"]


def __getattr__(name: str) -> Any:
    if name == "MotePlugin":
        from axolotl_mote.plugin import MotePlugin

        return MotePlugin
    if name == "load_template":
        from axolotl_mote.templates import load_template

        return load_template
    if name == "load_mote_model":
        from axolotl_mote.loading import load_mote_model

        return load_mote_model
    raise AttributeError(f"module 'axolotl_mote' has no attribute {name!r}")
