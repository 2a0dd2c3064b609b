"""``MoteTrainer``: Axolotl's trainer with step routing around every forward *and*
backward.

Per micro-batch, :meth:`MoteTrainer._routed`:

1. pops ``step_ids`` from the batch (the model's forward never sees it);
2. applies step skipping (``mote.step_skip_prob``): replaces ``attention_mask`` with the
   4D step mask and, with ``skip_positions: shift``, the position ids;
3. sets the model's routing state, then runs the whole training step (forward, loss,
   backward) inside it, so gradient-checkpoint recomputation reads the same routing;
4. clears the state.

Random draws (prompt routing, skipped stages) are seeded from (seed, global step,
micro-step, rank): a resumed run draws what an uninterrupted run would have drawn.
Per-stage loss and token counts (``metrics.py``) are summed on the device over the
micro-steps between two log calls and added to the logs there: no full-vocabulary copy
of the logits, one host synchronisation per logging step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from axolotl.core.trainers.base import AxolotlTrainer

from axolotl_mote.attention import plans_expected, regions_active, uses_regions
from axolotl_mote.constants import STEP_IDS_KEY
from axolotl_mote.log import get_logger
from axolotl_mote.metrics import StageMetrics
from axolotl_mote.routing import draw_seed, route
from axolotl_mote.settings import MoteSettings, settings_of
from axolotl_mote.tuner.model import get_routing_state

LOG = get_logger("axolotl_mote")


def skip_steps(
    settings: MoteSettings,
    inputs: dict[str, Any],
    step_ids: torch.Tensor,
    key: int,
    marker_ids: set[int],
    regions: bool = False,
) -> Any:
    """Apply step skipping to a training batch in place (a no-op at p = 0).

    ``regions``: the model runs region attention (``attention.py``); returns the plan
    to hold active around forward and backward, the attention mask stays. Otherwise the
    dense (or flex) step mask replaces ``attention_mask``; returns None.
    """
    from axolotl_mote.masks import step_skipping

    options = settings.options
    new_inputs, plan = step_skipping(
        inputs,
        step_ids=step_ids,
        hideable=list(settings.hideable),
        p=settings.step_skip_prob,
        generator=torch.Generator().manual_seed(draw_seed(settings.seed, "skip", key)),
        marker_ids=marker_ids,
        markers_visible=bool(options.skip_markers_visible),
        shift_positions=options.skip_positions == "shift",
        attn_implementation=settings.attn_implementation,
        regions=regions,
    )
    inputs.update(new_inputs)
    return plan


class MoteTrainer(AxolotlTrainer):
    """AxolotlTrainer + routing state + step skipping + per-stage metrics."""

    _mote_micro: tuple[int, int] = (-1, 0)
    _mote_batch_steps: torch.Tensor | None = None
    _mote_marker_ids: set[int] | None = None

    # --- plumbing -----------------------------------------------------------------
    #: the run's settings, handed over by the plugin (``post_trainer_create``)
    mote_settings: MoteSettings | None = None

    @property
    def mote(self) -> MoteSettings:
        """The run's settings: the plugin's, or resolved once for this trainer."""
        if self.mote_settings is None:
            self.mote_settings = settings_of(self.axolotl_cfg)
        return self.mote_settings

    def _marker_ids(self) -> set[int]:
        if self._mote_marker_ids is None:
            from axolotl_mote.markers import marker_ids

            self._mote_marker_ids = set(
                marker_ids(self.processing_class, self.mote.template)
            )
        return self._mote_marker_ids

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and (
            STEP_IDS_KEY not in self._signature_columns
        ):
            self._signature_columns.append(STEP_IDS_KEY)

    def _draw_key(self, training: bool) -> int:
        """(global step, micro-step) -> an integer seed component, unique per batch."""
        step = int(self.state.global_step)
        last_step, micro = self._mote_micro
        micro = micro + 1 if last_step == step else 0
        self._mote_micro = (step, micro)
        rank = int(self.args.process_index)
        return ((step * 4096 + micro) * 64 + rank) * 2 + int(not training)

    @contextlib.contextmanager
    def _routed(self, model: Any, inputs: dict[str, Any], training: bool) -> Iterator:
        if STEP_IDS_KEY not in inputs:
            raise KeyError(
                f"MoTE: the batch has no '{STEP_IDS_KEY}' (keys: {sorted(inputs)}); "
                "use `type: axolotl_mote.aligncot` datasets, and clear "
                "dataset_prepared_path if the data was prepared without the plugin"
            )
        step_ids = inputs.pop(STEP_IDS_KEY)
        if step_ids.shape != inputs["input_ids"].shape:
            raise ValueError(
                f"MoTE: step_ids {tuple(step_ids.shape)} do not match input_ids "
                f"{tuple(inputs['input_ids'].shape)}"
            )
        key = self._draw_key(training)
        plan = None
        regions = training and uses_regions(model)  # evaluation never hides stages
        if training:
            plan = skip_steps(
                self.mote, inputs, step_ids, key, self._marker_ids(), regions
            )
        self._mote_batch_steps = step_ids
        state = get_routing_state(model)
        # the plan is held in a process-wide slot, seen by autograd's backward thread
        # (gradient-checkpoint recomputation runs there on CUDA)
        with route(state, step_ids, draw_key=key), regions_active(plan):
            try:
                yield
            finally:
                self._mote_batch_steps = None

    # --- hooks into the Trainer loop --------------------------------------------------
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The whole run expects step-skipping plans when the model runs regions: a
        training forward outside a training step then raises, never runs unmasked."""
        expected = self.mote.step_skip == "regions" and uses_regions(self.model)
        with plans_expected(expected):
            return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self._routed(model, inputs, training=True):
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self._routed(model, inputs, training=False):
            return super().prediction_step(
                model, inputs, prediction_loss_only, ignore_keys=ignore_keys
            )

    def compute_loss(
        self, model, inputs, return_outputs=False, num_items_in_batch=None
    ):
        if STEP_IDS_KEY in inputs:
            raise RuntimeError(
                "MoTE: compute_loss got step_ids; it must run inside training_step / "
                "prediction_step, which route the batch"
            )
        track = (
            self.mote.options.log_stage_metrics and self._mote_batch_steps is not None
        )
        result = super().compute_loss(
            model,
            inputs,
            return_outputs=return_outputs or track,
            num_items_in_batch=num_items_in_batch,
        )
        if not track:
            return result
        loss, outputs = result
        self._stage_metrics(model.training).add(
            getattr(outputs, "logits", None),
            inputs["labels"],
            self._mote_batch_steps,
        )
        return (loss, outputs) if return_outputs else loss

    # --- per-stage metrics (metrics.py): summed on the device, synced when logged ----
    def _stage_metrics(self, training: bool) -> StageMetrics:
        key = "_mote_train_metrics" if training else "_mote_eval_metrics"
        metrics = self.__dict__.get(key)
        if metrics is None:
            metrics = StageMetrics(self.mote.stage_names)
            self.__dict__[key] = metrics
        return metrics

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        evaluating = any(k.startswith("eval_") for k in logs)
        metrics = self._stage_metrics(training=not evaluating)
        if not metrics.has_loss and not self.__dict__.get("_mote_said_no_loss"):
            self.__dict__["_mote_said_no_loss"] = True
            LOG.warning(
                "MoTE: per-stage loss is off: the model's loss keeps no logits (a "
                "fused loss such as Liger or Cut-Cross-Entropy); tokens per stage are "
                "still logged"
            )
        logs.update(metrics.flush("eval_" if evaluating else ""))
        super().log(logs, *args, **kwargs)
