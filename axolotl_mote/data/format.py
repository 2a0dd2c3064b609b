"""Turning chains into token ids, labels and step ids: one formatter for train and
generate.

The conversation is rendered with the chat template (the tokenizer's, or the template
file's ``chat_format.jinja``) around a sentinel assistant message, then split at the
sentinel into a *prefix* (conversation + assistant header) and a *suffix* (end of turn).
A chain is assembled from ids, never by scanning text::

    prefix           | <|analysis|> text <|/analysis|> | <|response|> text … | suffix
    step  PROMPT …   |  0 ..........................0    |  2 ................. | 2 …
    label -100 …     |  ids (trained stage) ........... |  ids ............... | ids

Because segmentation comes from the record's structure, no text can move a stage
boundary: every text (the rendered conversation, each stage) is encoded with
:func:`~axolotl_mote.markers.encode_text`, which keeps a marker *string* inside text as
plain characters, never the marker token. Generation
uses :meth:`ChainFormatter.prompt_ids`, the same prefix the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from axolotl_mote.constants import IGNORE_INDEX, PROMPT_STEP
from axolotl_mote.data.schema import Chain
from axolotl_mote.markers import encode_text, marker_token_ids
from axolotl_mote.templates import PromptTemplate, StageMode

_SENTINEL = "\x00MOTE-ASSISTANT-TURN\x00"


@dataclass(frozen=True)
class StagePiece:
    key: str
    start_id: int
    end_id: int
    step: int  # expert id, or PROMPT_STEP for context stages
    trained: bool


class ChainFormatter:
    """Renders chains for one (template, tokenizer) pair."""

    def __init__(self, template: PromptTemplate, tokenizer: Any) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self.marker_ids = marker_token_ids(template, tokenizer)
        self.pieces: list[StagePiece] = []
        for stage in template.stages:
            if stage.mode is StageMode.OMIT:
                continue
            self.pieces.append(
                StagePiece(
                    key=stage.key,
                    start_id=self.marker_ids[stage.start],
                    end_id=self.marker_ids[stage.end],
                    step=template.step_id(stage.name),
                    trained=stage.mode is StageMode.TRAIN,
                )
            )

    # --- rendering -----------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """Return (prefix, suffix) text around the assistant turn."""
        text = self.tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": _SENTINEL}],
            tokenize=False,
            chat_template=self.template.chat_format.jinja,
        )
        if text.count(_SENTINEL) != 1:
            raise ValueError(
                f"the chat template of template {self.template.name!r} does not render "
                "the assistant message content verbatim exactly once; set "
                "`chat_format.jinja` in the template file or Axolotl's `chat_template:`"
            )
        prefix, suffix = text.split(_SENTINEL)
        return prefix, suffix

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation plus the assistant header (for generation)."""
        prefix, _ = self.render(messages)
        return self.encode([prefix])[0]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of ``texts``; marker strings in them stay plain text (markers.py)."""
        return encode_text(self.tokenizer, texts, self.template.markers)

    # --- training sequences ----------------------------------------------------------
    def encode_batch(self, chains: list[Chain]) -> dict[str, list[list[int]]]:
        """Tokenize chains in one batched tokenizer call per kind of text."""
        rendered = [self.render(c.messages) for c in chains]
        texts: list[str] = [p for p, _ in rendered] + [s for _, s in rendered]
        stage_slots: list[tuple[int, StagePiece]] = []
        for i, chain in enumerate(chains):
            for piece in self.pieces:
                if piece.key in chain.stages:
                    stage_slots.append((i, piece))
                    texts.append(chain.stages[piece.key])
        encoded = self.encode(texts)
        n = len(chains)
        out: dict[str, list[list[int]]] = {
            "input_ids": [],
            "labels": [],
            "step_ids": [],
        }
        per_chain: list[list[tuple[StagePiece, list[int]]]] = [[] for _ in chains]
        for (i, piece), ids in zip(stage_slots, encoded[2 * n :]):
            per_chain[i].append((piece, ids))
        for i in range(n):
            prefix_ids, suffix_ids = encoded[i], encoded[n + i]
            ids, labels, steps = self.assemble(prefix_ids, per_chain[i], suffix_ids)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["step_ids"].append(steps)
        return out

    @staticmethod
    def assemble(
        prefix_ids: list[int],
        stages: list[tuple[StagePiece, list[int]]],
        suffix_ids: list[int],
    ) -> tuple[list[int], list[int], list[int]]:
        """Concatenate segments; step ids and labels follow segment boundaries."""
        ids = list(prefix_ids)
        labels = [IGNORE_INDEX] * len(ids)
        steps = [PROMPT_STEP] * len(ids)
        last_step, last_trained = PROMPT_STEP, False
        for piece, text_ids in stages:
            segment = [piece.start_id, *text_ids, piece.end_id]
            ids += segment
            labels += segment if piece.trained else [IGNORE_INDEX] * len(segment)
            steps += [piece.step] * len(segment)
            last_step, last_trained = piece.step, piece.trained
        # The end of the turn is produced by the last stage's expert: train it there so
        # the model learns to stop after the answer.
        ids += suffix_ids
        labels += suffix_ids if last_trained else [IGNORE_INDEX] * len(suffix_ids)
        steps += [last_step] * len(suffix_ids)
        return ids, labels, steps
