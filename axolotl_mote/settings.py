"""The resolved MoTE settings of a run: read the config once, freeze the result.

The ``mote:`` block is declared once (``args.py``) and validated with Axolotl's keys.
What follows from it, together with Axolotl's own keys (``lora_r``, ``seed``, the
attention implementation), is resolved here into one frozen :class:`MoteSettings`:
the parsed options, the template, the :class:`~axolotl_mote.tuner.config.MoteConfig`
of the experts, the seed, the step-skipping probability and the hideable stages.
Every consumer (the plugin's hooks, the dataset strategy, the trainer, saving) asks
:func:`resolve_settings` and gets the same cached object; nobody re-parses the block.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from axolotl_mote.args import MoteOptions, attention_of, step_skip_prob
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
    return MoteSettings(
        options=options,
        template=template,
        config=config,
        seed=seed,
        step_skip_prob=p,
        step_skip_note=note,
        hideable=tuple(template.hideable_steps(options.skip_stages)),
        attn_implementation=data["attention"],
    )
