"""``type: axolotl_mote.aligncot``: the MoTE chain dataset strategy.

Axolotl imports this module and calls its ``load``. The stages come from
``mote.template`` (aligncot by default, any template works), so one strategy serves
every template. The implementation lives in :mod:`axolotl_mote.integration.strategy`.
"""

from axolotl_mote.integration.strategy import load

__all__ = ["load"]
