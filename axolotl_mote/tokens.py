"""Stage marker tokens: adding them to a tokenizer and finding their ids.

Inside ``axolotl train`` the plugin adds the markers through Axolotl's own
``special_tokens.additional_special_tokens`` key (``MotePlugin.register``), so the
tokenizer Axolotl saves and the embedding resize both include them. Outside Axolotl
(tests, generation from a base model) call :func:`add_marker_tokens`.
"""

from __future__ import annotations

from typing import Any

from axolotl_mote.templates import PromptTemplate


def add_marker_tokens(tokenizer: Any, template: PromptTemplate) -> int:
    """Add the template's markers as special tokens; returns how many were new."""
    from tokenizers import AddedToken

    missing = [m for m in template.markers if m not in tokenizer.get_vocab()]
    if not missing:
        return 0
    return tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(m, rstrip=False, lstrip=False, normalized=False, special=True)
                for m in missing
            ]
        }
    )


def marker_ids(tokenizer: Any, template: PromptTemplate) -> list[int]:
    """Token ids of all markers (start and end, stage order)."""
    from axolotl_mote.data.format import marker_token_ids

    return list(marker_token_ids(template, tokenizer).values())
