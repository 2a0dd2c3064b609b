"""``MotePlugin``: the switchboard between Axolotl's hooks and MoTE's modules.

Each hook is a few lines that delegate to the module named for the job
(``axolotl_mote/integration/``):

==========================  ===================================================
hook                        does
==========================  ===================================================
get_input_args              the ``mote:`` block and every rule on it (``args.py``)
register                    defaults, markers, data and merge checks (``config.py``)
pre_model_load              seed the embedding resize and expert init (``model.py``);
                            FSDP2 resume check on the validated config
pre_lora_load               marker rows: init and training (``model.py``)
get_lora_config_kwargs      rank blocks per expert (``model.py``)
post_lora_load              attach routing to the PEFT LoRA layers (``model.py``)
get_trainer_cls             routing around every step (``trainer.py``)
post_trainer_create         FSDP2's final save keeps the marker rows (``fsdp.py``)
get_collator_cls_and_kwargs step-id padding, packed or not (``integration/collator.py``)
add_callbacks_post_trainer  self-describing checkpoints, stats (``callbacks.py``)
post_train                  ``mote_config.json`` and model card (``saving.py``)
==========================  ===================================================

The run's settings are resolved once, at the first hook that sees the validated
config (``load_datasets``, or ``pre_model_load`` when no dataset is loaded), held
(``settings.hold``) for the modules Axolotl calls itself, and handed to the trainer.
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin

from axolotl_mote.settings import hold, release, settings_of


class MotePlugin(BasePlugin):
    """Mixture of insighTful Experts: step-routed LoRA experts for Axolotl."""

    def __init__(self) -> None:
        super().__init__()
        self._marker_kwargs: dict[str, Any] = {}

    # --- config ----------------------------------------------------------------------
    def get_input_args(self) -> str:
        return "axolotl_mote.args.MoteArgs"

    def register(self, cfg: dict) -> None:
        from axolotl_mote.data.schema import print_record_errors_once
        from axolotl_mote.integration.config import prepare_raw_config
        from axolotl_mote.tuner.config import quiet_routed_adapter_warning

        # this run routes MoTE adapters (lora_model_dir, resumes): PEFT's note on the
        # adapter_config.json key that names load_mote_model is not for it
        quiet_routed_adapter_warning()
        print_record_errors_once()  # a bad record: its message, no traceback
        prepare_raw_config(cfg)
        release()  # a new run: its settings are resolved at the first hook below

    def load_datasets(self, cfg, preprocess: bool = False):
        hold(cfg)  # the run's one resolution; Axolotl loads the datasets itself
        return None

    # --- model -----------------------------------------------------------------------
    def pre_model_load(self, cfg) -> None:
        from axolotl_mote.integration.config import check_fsdp2_resume
        from axolotl_mote.integration.model import seed_model_init

        hold(cfg)  # already held unless no dataset was loaded (inference, merge)
        check_fsdp2_resume(cfg, warn=False)  # the validated config: FSDP2 defaults
        seed_model_init(cfg)

    def pre_lora_load(self, cfg, model) -> None:
        from axolotl_mote.integration.model import prepare_marker_rows

        self._marker_kwargs = prepare_marker_rows(cfg, model)

    def get_lora_config_kwargs(self, cfg) -> dict:
        from axolotl_mote.integration.model import lora_config_kwargs

        return lora_config_kwargs(cfg, self._marker_kwargs)

    def post_lora_load(self, cfg, model) -> None:
        from axolotl_mote.integration.model import attach_to_axolotl_model

        attach_to_axolotl_model(cfg, model)

    # --- training --------------------------------------------------------------------
    def get_trainer_cls(self, cfg):
        from axolotl_mote.integration.trainer import MoteTrainer

        return MoteTrainer

    def post_trainer_create(self, cfg, trainer) -> None:
        from axolotl_mote.integration.fsdp import install_final_save, is_fsdp2

        trainer.mote_settings = settings_of(cfg)
        if is_fsdp2(cfg):
            install_final_save()

    def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
        from axolotl_mote.integration.collator import collator_for

        # exactly as Axolotl picks its batch-sampler collator for this split
        packed = cfg.eval_sample_packing if is_eval else cfg.sample_packing
        return collator_for(bool(packed)), {}

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        from axolotl_mote.integration.callbacks import (
            MoteSaveCallback,
            StageStatsCallback,
        )

        return [MoteSaveCallback(cfg), StageStatsCallback(cfg, trainer)]

    def post_train(self, cfg, model) -> None:
        from axolotl_mote.integration.saving import write_mote_config

        write_mote_config(cfg, cfg.output_dir, model)
