"""``type: axolotl_mote.chains``: an alias of ``axolotl_mote.aligncot`` for templates
that are not about safety (e.g. plan_solve_verify)."""

from axolotl_mote.integration.strategy import load

__all__ = ["load"]
