"""Self-alignment data generation (``axolotl-mote generate-data``;
docs/self_alignment.md).

``backends`` turns chats into replies (local HF model, OpenAI-compatible endpoint, or
any object with the same ``complete`` method); ``chain_rule`` is the paper's
check-then-extend rule; ``runner`` reads seed questions and writes chain records,
resumably. No torch at import time.
"""

from __future__ import annotations

from axolotl_mote.datagen.backends import (
    HFChatGenerator,
    OpenAIChatGenerator,
    TextGenerator,
    build_generator,
    parse_verdict,
)
from axolotl_mote.datagen.chain_rule import ON_FAIL, ChainRule, Outcome, Seed
from axolotl_mote.datagen.runner import DatagenReport, generate_data, load_seeds

__all__ = [
    "ON_FAIL",
    "ChainRule",
    "DatagenReport",
    "HFChatGenerator",
    "OpenAIChatGenerator",
    "Outcome",
    "Seed",
    "TextGenerator",
    "build_generator",
    "generate_data",
    "load_seeds",
    "parse_verdict",
]
