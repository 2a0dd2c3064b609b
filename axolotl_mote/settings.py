"""The resolved MoTE settings of a run: read the config once, freeze the result.

The ``mote:`` block is declared once (``args.py``) and validated with Axolotl's keys.
What follows from it, together with Axolotl's own keys (``lora_r``, ``seed``, the
attention implementation), is resolved here into one frozen :class:`MoteSettings`:
the parsed options, the template, the :class:`~axolotl_mote.tuner.config.MoteConfig`
of the experts, the seed, the step-skipping probability and the hideable stages.
Inside an ``axolotl train`` run the plugin resolves them once, at its first hook that
sees the validated config, and holds them (:func:`hold`); every module Axolotl calls
with that config (the dataset strategy, the model hooks, the trainer, saving) gets the
held object from :func:`settings_of` by the config's identity, without rebuilding a
key. Outside a run (library use, scripts, tests) :func:`resolve_settings` resolves a
config directly, cached by the values it reads.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from axolotl_mote.args import (
    MoteOptions,
    attention_of,
    step_skip_backend,
    step_skip_prob,
)
from axolotl_mote.templates import PromptTemplate, load_template
from axolotl_mote.tuner.config import MoteConfig


@dataclass(frozen=True)
class MoteSettings:
    """Everything MoTE needs from one Axolotl config, resolved and checked."""

    options: MoteOptions
    template: PromptTemplate
    config: MoteConfig  # the experts (what mote_config.json records)
    seed: int
    step_skip_prob: float  # resolved: the default depends on the attention
    step_skip_note: str | None  # why the default turned step skipping off, if it did
    hideable: tuple[int, ...]  # step ids step skipping may hide
    attn_implementation: str
    #: how step skipping runs: "off", "regions" (sdpa or flash), "dense" or "flex";
    #: decided once by ``args.step_skip_backend`` (a model with sliding-window or
    #: soft-capped attention turns "regions" into "dense" at load, under sdpa)
    step_skip: str = "off"

    @property
    def stage_names(self) -> list[str]:
        return list(self.config.stage_names)


def resolve_settings(cfg: Any) -> MoteSettings:
    """The settings of ``cfg`` (a validated Axolotl config, or a plain dict).

    Cached by the values it reads, so every hook and module of a run shares one object
    and a changed config gives a new one.
    """
    get = cfg.get if hasattr(cfg, "get") else lambda k: getattr(cfg, k, None)
    block = get("mote")
    if block is None:
        raise ValueError(
            "no `mote:` block: add `plugins: [axolotl_mote.MotePlugin]` and a `mote:` "
            "block (at least `mote: {}`) to your config"
        )
    if isinstance(block, MoteOptions):
        block = block.model_dump(mode="json")
    key = json.dumps(
        {
            "mote": dict(block),
            "lora_r": get("lora_r"),
            "seed": get("seed"),
            "attention": attention_of(cfg),
        },
        sort_keys=True,
        default=str,
    )
    return _resolve(key)


#: (the run's config, its settings): set by the plugin, one run at a time. The config
#: itself is kept, not its id: a freed config's id can be reused by another object
_HELD: tuple[Any, MoteSettings] | None = None


def hold(cfg: Any) -> MoteSettings:
    """Resolve the run's config once and hold the result (the plugin's first hook).

    Another config object (a new run in the same process) replaces what was held.
    """
    global _HELD
    if _HELD is None or _HELD[0] is not cfg:
        _HELD = (cfg, resolve_settings(cfg))
    return _HELD[1]


def release() -> None:
    """Forget the held settings (a new run starts: the plugin's ``register``)."""
    global _HELD
    _HELD = None


def settings_of(cfg: Any) -> MoteSettings:
    """The settings of ``cfg``: the held object when it is the run's config (no key
    rebuilt), else resolved from it (library use)."""
    held = _HELD
    if held is not None and held[0] is cfg:
        return held[1]
    return resolve_settings(cfg)


@functools.lru_cache(maxsize=16)
def _resolve(key: str) -> MoteSettings:
    data = json.loads(key)
    options = MoteOptions.model_validate(data["mote"])
    template = load_template(options.template)
    seed = options.seed if options.seed is not None else data["seed"]
    seed = int(seed if seed is not None else 42)
    config = MoteConfig(
        stage_names=[s.name for s in template.trained_stages],
        expert_rank=int(data["lora_r"] or 8),
        alpha=float(options.alpha),
        shared_expert=bool(options.shared_expert),
        prompt_routing=str(options.prompt_routing),
        experts=str(options.experts),
        seed=seed,
        template=template.name,
        template_data=template.model_dump(mode="json", exclude={"source"}),
    )
    p, note = step_skip_prob(options, data["attention"])
    hideable = tuple(template.hideable_steps(options.skip_stages))
    backend = step_skip_backend(data["attention"], options.step_skip_attention)
    return MoteSettings(
        options=options,
        template=template,
        config=config,
        seed=seed,
        step_skip_prob=p,
        step_skip_note=note,
        hideable=hideable,
        attn_implementation=data["attention"],
        step_skip=backend if (p > 0 and hideable and backend) else "off",
    )
