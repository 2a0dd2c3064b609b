"""Trainer callbacks: routing metadata in every checkpoint, stage statistics at
start."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from axolotl_mote.constants import STEP_IDS_KEY
from axolotl_mote.log import get_logger

LOG = get_logger("axolotl_mote")


class MoteSaveCallback(TrainerCallback):
    """Writes mote_config.json into each ``checkpoint-N`` so it can be loaded alone."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def on_save(self, args, state, control, **kwargs):
        from axolotl_mote.integration.saving import write_mote_config

        if state.is_world_process_zero:
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(ckpt):
                write_mote_config(self.cfg, ckpt, kwargs.get("model"))
        return control


class StageStatsCallback(TrainerCallback):
    """Logs tokens per stage and stage-plan counts of the training set, once."""

    def __init__(self, cfg: Any, trainer: Any) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.stats: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        from axolotl_mote.data.stats import format_stats, stage_stats
        from axolotl_mote.settings import settings_of

        dataset = getattr(self.trainer, "train_dataset", None)
        if dataset is None or STEP_IDS_KEY not in getattr(dataset, "column_names", []):
            return control
        template = settings_of(self.cfg).template
        self.stats = stage_stats(dataset[STEP_IDS_KEY], template)
        if state.is_world_process_zero:
            LOG.info(format_stats(self.stats, "MoTE training set"))
        return control
