"""``MotePlugin``: the switchboard between Axolotl's hooks and MoTE's modules.

Each hook is a few lines that delegate to the module named for the job:

==========================  ==================================================
hook                        does
==========================  ==================================================
register                    defaults (LoRA kernels off, marker tokens), file checks
pre_model_load              seed the embedding resize and expert init
get_input_args              the ``mote:`` block (args.py)
pre_lora_load               marker rows: init and training (tokens.py)
get_lora_config_kwargs      rank blocks per expert (tuner/config.py)
post_lora_load              attach routing to the PEFT LoRA layers (tuner/model.py)
get_trainer_cls             MoteTrainer (trainer.py)
get_collator_cls_and_kwargs step-id padding, packed or not (data/collator.py)
add_callbacks_post_trainer  mote_config.json in checkpoints, stats (callbacks.py)
post_train                  mote_config.json next to the final adapter
==========================  ==================================================
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin

from axolotl_mote.log import get_logger

LOG = get_logger("axolotl_mote.plugin")

_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


class MotePlugin(BasePlugin):
    """Mixture of insighTful Experts: step-routed LoRA experts for Axolotl."""

    def __init__(self) -> None:
        super().__init__()
        self._lora_extra: dict[str, Any] = {}

    # --- config ----------------------------------------------------------------------
    def get_input_args(self) -> str:
        return "axolotl_mote.args.MoteArgs"

    def register(self, cfg: dict) -> None:
        from axolotl_mote.integration import prepare_raw_config

        prepare_raw_config(cfg)

    # --- model -----------------------------------------------------------------------
    def pre_model_load(self, cfg) -> None:
        from axolotl_mote.integration import seed_model_init

        seed_model_init(cfg)

    def pre_lora_load(self, cfg, model) -> None:
        from axolotl_mote.integration import prepare_marker_rows

        self._lora_extra = prepare_marker_rows(cfg, model)

    def get_lora_config_kwargs(self, cfg) -> dict:
        from axolotl_mote.runtime import build_mote_config

        kwargs = build_mote_config(cfg).peft_kwargs(
            lora_alpha=cfg.lora_alpha or cfg.lora_r or 8,
            use_rslora=bool(cfg.peft_use_rslora),
            rank_pattern=cfg.lora_rank_pattern,
            alpha_pattern=cfg.lora_alpha_pattern,
        )
        return {**kwargs, **self._lora_extra}

    def post_lora_load(self, cfg, model) -> None:
        from axolotl_mote.integration import attach_to_axolotl_model

        attach_to_axolotl_model(cfg, model)

    # --- training --------------------------------------------------------------------
    def get_trainer_cls(self, cfg):
        from axolotl_mote.trainer import MoteTrainer

        return MoteTrainer

    def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
        from axolotl_mote.data.collator import collator_for

        # exactly as Axolotl picks its batch-sampler collator for this split
        packed = cfg.eval_sample_packing if is_eval else cfg.sample_packing
        return collator_for(bool(packed)), {}

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        from axolotl_mote.callbacks import MoteSaveCallback, StageStatsCallback

        return [MoteSaveCallback(cfg), StageStatsCallback(cfg, trainer)]

    def post_train(self, cfg, model) -> None:
        from axolotl_mote.saving import write_mote_config

        write_mote_config(cfg, cfg.output_dir)
