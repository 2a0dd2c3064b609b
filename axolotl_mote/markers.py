"""Stage marker tokens: the one module that knows how markers become token ids.

A marker (``<|analysis|>``, ``<|/analysis|>``, …) is a special token the template
declares. It marks a stage boundary, and only the formatter (``data/format.py``) and
generation ever emit it. Everything about markers lives here:

* :func:`add_marker_tokens` adds them to a tokenizer (inside ``axolotl train`` the
  plugin adds them through Axolotl's ``special_tokens`` key instead, so Axolotl
  resizes);
* :func:`marker_token_ids` / :func:`marker_ids` find their ids, or raise naming the fix;
* :func:`encode_text` tokenizes user text so that a marker *string* inside it stays
  plain text: a record or a chat message that merely mentions ``<|analysis|>`` can never
  produce the marker token, so it can never move a stage boundary or change routing;
* :func:`init_marker_rows` starts new marker rows at the mean embedding of their stage
  words (``mote.marker_init: describe``);
* :func:`trainable_token_indices` makes only the marker rows trainable (PEFT).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

from axolotl_mote.templates import PromptTemplate


class MarkerTokenError(ValueError):
    """The tokenizer does not encode a marker as exactly one token."""


def add_marker_tokens(tokenizer: Any, template: PromptTemplate) -> int:
    """Add the template's markers as special tokens; returns how many were new."""
    from tokenizers import AddedToken

    missing = [m for m in template.markers if m not in tokenizer.get_vocab()]
    if not missing:
        return 0
    tokens = [
        AddedToken(m, rstrip=False, lstrip=False, normalized=False, special=True)
        for m in missing
    ]
    return tokenizer.add_special_tokens({"additional_special_tokens": tokens})


def marker_token_ids(template: PromptTemplate, tokenizer: Any) -> dict[str, int]:
    """Map each marker string to its single token id, or raise naming the marker."""
    out: dict[str, int] = {}
    for marker in template.markers:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise MarkerTokenError(
                f"marker {marker!r} of template {template.name!r} encodes to "
                f"{len(ids)} tokens; it must be one special token. With the plugin "
                "enabled, markers are added to the tokenizer automatically (plugins: "
                "[axolotl_mote.MotePlugin]); outside Axolotl call "
                "axolotl_mote.markers.add_marker_tokens(tokenizer, template)"
            )
        out[marker] = ids[0]
    return out


def marker_ids(tokenizer: Any, template: PromptTemplate) -> list[int]:
    """Token ids of all markers (start and end, stage order)."""
    return list(marker_token_ids(template, tokenizer).values())


def encode_text(
    tokenizer: Any, texts: Sequence[str], markers: Sequence[str]
) -> list[list[int]]:
    """Token ids of ``texts`` in which marker strings are plain text.

    Texts without a marker string are encoded in one batched call, as usual (other
    special tokens such as a chat template's ``<|im_start|>`` stay special). A text
    that contains one is cut at each marker string; the marker string alone is encoded
    with ``split_special_tokens=True`` (its characters, never the marker token) and the
    rest as usual. Training and generation both encode through here, so the same text
    always gives the same ids.
    """
    out: list[list[int] | None] = [None] * len(texts)
    pattern = _marker_pattern(tuple(markers))
    plain = [i for i, t in enumerate(texts) if pattern is None or not pattern.search(t)]
    if plain:
        encoded = tokenizer([texts[i] for i in plain], add_special_tokens=False)
        for i, ids in zip(plain, encoded["input_ids"]):
            out[i] = list(ids)
    for i, text in enumerate(texts):
        if out[i] is not None:
            continue
        ids: list[int] = []
        for piece in pattern.split(text):  # the capture group keeps the markers
            if not piece:
                continue
            as_text = piece in markers
            ids += tokenizer(
                piece, add_special_tokens=False, split_special_tokens=as_text
            )["input_ids"]
        out[i] = ids
    return out  # type: ignore[return-value]


def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern[str] | None:
    if not markers:
        return None
    longest_first = sorted(markers, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(m) for m in longest_first) + ")")


def new_markers(template: PromptTemplate, base_vocab: dict[str, int]) -> list[str]:
    """The template's markers that a base tokenizer does not know yet."""
    return [m for m in template.markers if m not in base_vocab]


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

    ids = marker_token_ids(template, tokenizer)
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
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def trainable_token_indices(
    model: Any, ids: Sequence[int], user: list[int] | dict[str, list[int]] | None
) -> dict[str, list[int]]:
    """PEFT ``trainable_token_indices`` for the marker rows (and the user's own).

    Only the marker rows of the input embedding (and of an untied output embedding)
    train, so the model learns to read and emit stage markers without unfreezing the
    vocabulary. Modules are named by their last path component, as PEFT matches them
    (``embed_tokens``, ``lm_head``; GPT-NeoX: ``embed_in``, ``embed_out``).
    """
    names = {id(m): n.split(".")[-1] for n, m in model.named_modules() if n}
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    ids = sorted(ids)
    targets = {names[id(emb)]: ids}
    if out is not None and out.weight is not emb.weight and id(out) in names:
        targets[names[id(out)]] = ids
    if isinstance(user, list):
        targets[names[id(emb)]] = sorted(set(user) | set(ids))
    elif isinstance(user, dict):
        for key, values in user.items():
            targets[key] = sorted(set(values) | set(targets.get(key, [])))
    return targets


def output_embedding_name(model: Any) -> str | None:
    """Last path component of the output embedding module (``lm_head``), if any.

    MoTE never puts LoRA experts on it: its marker rows train through
    ``trainable_token_indices``, which PEFT cannot apply to a LoRA-wrapped layer.
    """
    out = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is out and name:
            return name.split(".")[-1]
    return None


#: Names of unused reserved special tokens in common tokenizers (Llama-3, Qwen).
RESERVED_TOKEN = re.compile(r"^<\|(reserved_special_token_\d+|reserved_\d+)\|>$")


def reserved_token_overrides(
    tokenizer: Any, template: PromptTemplate
) -> dict[int, str]:
    """``{token id: marker}`` renaming unused reserved special tokens to the markers.

    For Axolotl's ``added_tokens_overrides`` (``mote.marker_tokens: reserved``): the
    vocabulary keeps its size, so nothing is resized. Markers the tokenizer already
    has are left alone. Raises naming the counts when there are too few.
    """
    vocab = tokenizer.get_vocab()
    wanted = [m for m in template.markers if m not in vocab]
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    listed = set(getattr(tokenizer, "all_special_tokens", []) or [])
    reserved = sorted(  # a token named in the special-token lists cannot be renamed
        i
        for i, tok in decoder.items()
        if RESERVED_TOKEN.match(str(tok.content)) and str(tok.content) not in listed
    )
    if len(reserved) < len(wanted):
        raise ValueError(
            f"mote.marker_tokens: reserved needs {len(wanted)} unused reserved special "
            f"tokens (<|reserved_special_token_N|>) for the markers of "
            f"{template.name!r}, the tokenizer has {len(reserved)}; use "
            "mote.marker_tokens: new"
        )
    return dict(zip(reserved, wanted))
