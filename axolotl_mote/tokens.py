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
                AddedToken(
                    m, rstrip=False, lstrip=False, normalized=False, special=True
                )
                for m in missing
            ]
        }
    )


def marker_ids(tokenizer: Any, template: PromptTemplate) -> list[int]:
    """Token ids of all markers (start and end, stage order)."""
    from axolotl_mote.data.format import marker_token_ids

    return list(marker_token_ids(template, tokenizer).values())


def init_marker_rows(
    model: Any, tokenizer: Any, template: PromptTemplate, markers: list[str]
) -> dict[str, str]:
    """Set the embedding rows of ``markers`` to the mean embedding of their stage words.

    Why: a resize gives every new row (nearly) the same vector, so ``<|response|>`` and
    ``<|/response|>`` look alike to the model and, with tied embeddings, are predicted
    alike; a small model then closes a stage right after opening it. Starting each
    marker at the mean of its words (``"Safe Answer:"``, ``"End of safe answer."``)
    makes the markers distinct from the first step and gives the tokens after a start
    marker a context the base model already knows how to continue.
    Untied output rows get the mean of the same words' output rows. Returns
    ``{marker: text}`` for what was set. Works on ZeRO-3 partitioned weights.
    """
    import torch

    ids = dict(zip(template.markers, marker_ids(tokenizer, template)))
    texts: dict[str, str] = {}
    for stage in template.stages:
        texts.update(stage.marker_texts())
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    weights = [emb.weight]
    if out is not None and out.weight is not emb.weight:
        weights.append(out.weight)
    done: dict[str, str] = {}
    with torch.no_grad(), _gathered(weights):
        for marker in markers:
            words = tokenizer(texts[marker], add_special_tokens=False)["input_ids"]
            if not words or set(words) & set(ids.values()):
                raise ValueError(
                    f"marker {marker!r}: its init text {texts[marker]!r} must tokenize "
                    "to ordinary tokens; set start_text/end_text in the template"
                )
            for weight in weights:
                weight[ids[marker]] = weight[words].mean(0)
            done[marker] = texts[marker]
    return done


def _gathered(params: list[Any]):
    """Full tensors of ZeRO-3 partitioned parameters (rank 0's edit is broadcast)."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()
