"""Builders from the Axolotl config to MoTE's library objects (torchtune-style).

The ``mote:`` block is declared once (``args.py``); this module turns it, plus Axolotl's
own keys (``lora_r``, ``seed``, ``attn_implementation``…), into the flat arguments of the
library classes: :class:`~axolotl_mote.tuner.config.MoteConfig` for the layers and
:class:`MoteRuntime` for what the trainer does per batch (routing, step skipping).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from axolotl_mote.templates import PromptTemplate, StageMode, load_template


def mote_options(cfg: Any) -> dict[str, Any]:
    """The ``mote:`` block with defaults applied, as a plain dict."""
    from axolotl_mote.args import MoteOptions

    block = cfg.get("mote") if hasattr(cfg, "get") else getattr(cfg, "mote", None)
    return MoteOptions.model_validate(dict(block or {})).model_dump()


def resolve_seed(cfg: Any, opts: dict[str, Any]) -> int:
    seed = opts.get("seed")
    if seed is None:
        seed = cfg.get("seed") if hasattr(cfg, "get") else None
    return int(seed if seed is not None else 42)


def build_mote_config(cfg: Any):
    """MoteConfig for the tuner, from the Axolotl config."""
    from axolotl_mote.tuner.config import MoteConfig

    opts = mote_options(cfg)
    template = load_template(opts["template"])
    return MoteConfig(
        stage_names=[s.name for s in template.trained_stages],
        expert_rank=int(cfg.get("lora_r") or 8),
        alpha=float(opts["alpha"]),
        shared_expert=bool(opts["shared_expert"]),
        prompt_routing=str(opts["prompt_routing"]),
        seed=resolve_seed(cfg, opts),
        template=template.name,
        template_data=template.model_dump(mode="json", exclude={"source"}),
    )


def hideable_steps(
    template: PromptTemplate, skip_stages: list[str] | None
) -> list[int]:
    """Step ids that step skipping may hide from later stages."""
    if skip_stages is None:
        stages = [s for s in template.trained_stages if s.skippable]
    else:
        stages = [template.stage(name) for name in skip_stages]
    out = []
    for stage in stages:
        if stage.mode is not StageMode.TRAIN:
            continue
        if stage.name == template.answer_stage:
            raise ValueError("mote.skip_stages cannot contain the answer stage")
        out.append(template.trained_stages.index(stage))
    return out


@dataclass
class MoteRuntime:
    """Per-batch behaviour of the trainer, resolved once from the config."""

    template: PromptTemplate
    seed: int
    step_skip_prob: float
    hideable: list[int]
    marker_ids: set[int]
    markers_visible: bool
    shift_positions: bool
    attn_implementation: str
    log_stage_metrics: bool

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.template.trained_stages]

    @classmethod
    def from_axolotl(cls, cfg: Any, tokenizer: Any) -> MoteRuntime:
        from axolotl_mote.data.format import marker_token_ids

        opts = mote_options(cfg)
        template = load_template(opts["template"])
        return cls(
            template=template,
            seed=resolve_seed(cfg, opts),
            step_skip_prob=float(opts["step_skip_prob"]),
            hideable=hideable_steps(template, opts["skip_stages"]),
            marker_ids=set(marker_token_ids(template, tokenizer).values()),
            markers_visible=bool(opts["skip_markers_visible"]),
            shift_positions=opts["skip_positions"] == "shift",
            attn_implementation=str(cfg.get("attn_implementation") or "sdpa"),
            log_stage_metrics=bool(opts["log_stage_metrics"]),
        )

    @contextlib.contextmanager
    def route(self, model: Any, step_ids: torch.Tensor, draw_key: int) -> Iterator:
        from axolotl_mote.routing import route
        from axolotl_mote.tuner.model import get_routing_state

        with route(get_routing_state(model), step_ids, draw_key=draw_key):
            yield

    def skip_steps(
        self, inputs: dict[str, Any], step_ids: torch.Tensor, key: int, training: bool
    ) -> None:
        """Apply step skipping to a training batch in place (evaluation: never)."""
        if not training or self.step_skip_prob <= 0 or not self.hideable:
            return
        from axolotl_mote.masks import apply_step_skipping

        generator = torch.Generator().manual_seed(hash((self.seed, key)) & (2**63 - 1))
        new_inputs = apply_step_skipping(
            inputs,
            step_ids=step_ids,
            hideable=self.hideable,
            p=self.step_skip_prob,
            generator=generator,
            marker_ids=self.marker_ids,
            markers_visible=self.markers_visible,
            shift_positions=self.shift_positions,
            attn_implementation=self.attn_implementation,
        )
        inputs.update(new_inputs)
