"""The ``type: axolotl_mote.aligncot`` dataset strategy.

Axolotl resolves ``type: axolotl_mote.aligncot`` to the module-level ``load`` below and
calls it with the tokenizer and the validated config. It returns a
``DatasetWrappingStrategy``: the raw dataset comes in, a dataset with exactly
``input_ids``, ``attention_mask``, ``labels`` and ``step_ids`` goes out, and per-stage
statistics are logged (``axolotl preprocess`` prints them).

Length: chains longer than ``sequence_len`` are counted and reported. With
``excess_length_strategy: truncate`` they are cut here, with ``step_ids`` in sync
(Axolotl's own truncation would cut only ids/labels); otherwise Axolotl drops (or
rejects) them.
"""

from __future__ import annotations

from typing import Any

from axolotl.prompt_tokenizers import DatasetWrappingStrategy

from axolotl_mote.constants import STEP_IDS_KEY
from axolotl_mote.data.format import ChainFormatter
from axolotl_mote.data.schema import parse_chain
from axolotl_mote.data.stats import format_stats, stage_stats
from axolotl_mote.log import get_logger
from axolotl_mote.settings import settings_of
from axolotl_mote.templates import PromptTemplate

LOG = get_logger("axolotl_mote.data")


class ChainDatasetStrategy(DatasetWrappingStrategy):
    """Tokenizes MoTE chain records into ids, labels and per-token step ids."""

    def __init__(
        self,
        template: PromptTemplate,
        tokenizer: Any,
        sequence_len: int,
        excess_length_strategy: str = "drop",
        source: str | None = None,
    ) -> None:
        self.template = template
        self.formatter = ChainFormatter(template, tokenizer)
        self.sequence_len = sequence_len
        self.excess_length_strategy = excess_length_strategy
        self.truncate = excess_length_strategy == "truncate"
        self.source = source
        self.last_stats: dict[str, Any] | None = None

    def tokenize_rows(
        self, rows: list[dict[str, Any]], indices: list[int]
    ) -> dict[str, list[list[int]]]:
        """Validate and tokenize a batch of raw records (errors name the row)."""
        where = f"{self.source} " if self.source else ""
        chains = [
            parse_chain(row, self.template, location=f"{where}row {idx}")
            for row, idx in zip(rows, indices)
        ]
        out = self.formatter.encode_batch(chains)
        if self.truncate:
            for key in ("input_ids", "labels", "step_ids"):
                out[key] = [seq[: self.sequence_len] for seq in out[key]]
        out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
        return out

    def _map_batch(self, batch: dict[str, list], indices: list[int]) -> dict:
        keys = list(batch)
        rows = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
        return self.tokenize_rows(rows, indices)

    def wrap_dataset(
        self,
        dataset,
        process_count: int | None = None,
        keep_in_memory: bool | None = False,
        **kwargs: Any,
    ):
        tokenized = dataset.map(
            self._map_batch,
            batched=True,
            with_indices=True,
            remove_columns=list(dataset.column_names),
            num_proc=process_count if process_count and process_count > 1 else None,
            keep_in_memory=bool(keep_in_memory),
            desc="MoTE: tokenizing chains",
        )
        self.last_stats = self.report(tokenized)
        return tokenized

    def report(self, tokenized) -> dict[str, Any]:
        """Log per-stage statistics and the over-length count; return the stats."""
        stats = stage_stats(tokenized[STEP_IDS_KEY], self.template)
        lengths = [len(ids) for ids in tokenized["input_ids"]]
        too_long = sum(n > self.sequence_len for n in lengths)
        stats["over_sequence_len"] = too_long
        LOG.info(
            format_stats(stats, f"MoTE stage statistics ({self.source or 'data'})")
        )
        if too_long and not self.truncate:
            fate = (
                "make Axolotl stop (excess_length_strategy: raise)"
                if self.excess_length_strategy == "raise"
                else "be dropped by Axolotl (excess_length_strategy: drop)"
            )
            LOG.warning(
                "MoTE: %d of %d chains are longer than sequence_len=%d and will %s. "
                "Raise sequence_len to keep them, or set excess_length_strategy: "
                "truncate.",
                too_long,
                len(lengths),
                self.sequence_len,
                fate,
            )
        elif too_long:
            LOG.warning(
                "MoTE: %d chains were truncated to sequence_len=%d (step_ids kept in "
                "sync); a truncated chain may lose its answer.",
                too_long,
                self.sequence_len,
            )
        return stats


def load(tokenizer: Any, cfg: Any, ds_cfg: Any = None, processor: Any = None):
    """Axolotl strategy entry point (``type: axolotl_mote.aligncot``)."""
    template = settings_of(cfg).template
    source = None
    if ds_cfg is not None:
        source = ds_cfg.get("path") if hasattr(ds_cfg, "get") else None
    return ChainDatasetStrategy(
        template,
        tokenizer,
        sequence_len=int(cfg.get("sequence_len") or 2048),
        excess_length_strategy=(cfg.get("excess_length_strategy") or "drop").lower(),
        source=source,
    )
