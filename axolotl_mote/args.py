"""The ``mote:`` block of an Axolotl config, declared once.

Axolotl merges ``MoteArgs`` into its config schema (``MotePlugin.get_input_args``), so
every key here is validated by ``axolotl train``/``preprocess`` like a core key. Each field
carries its user-facing description; ``docs/configuration.md`` is generated from them.
Cross-key rules against Axolotl's own keys live in ``MoteArgs._check_axolotl_keys``.

This module must stay cheap to import (no torch): Axolotl imports it while building the
config schema, before any model loads.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SkipPositions(str, Enum):
    """Position ids of tokens that follow a hidden (skipped) stage."""

    KEEP = "keep"
    SHIFT = "shift"


class MarkerInit(str, Enum):
    """Initial rows of newly added marker tokens."""

    DESCRIBE = "describe"
    RESIZE = "resize"


class MoteOptions(BaseModel):
    """Options of the MoTE plugin (the ``mote:`` block)."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    template: str = Field(
        default="aligncot",
        description="Prompt template: a name shipped in prompt_templates/ (aligncot, "
        "plan_solve_verify) or a path to your own template YAML. It declares the "
        "stages, their marker tokens, which stages are trained and the chat format.",
    )
    alpha: float = Field(
        default=0.5,
        description="Weight of the routed step expert; the shared expert gets "
        "1 - alpha (the paper's alpha, 0.5). Must be in (0, 1]. Ignored without a "
        "shared expert, where the step expert gets weight 1.",
    )
    shared_expert: bool = Field(
        default=True,
        description="Add a shared expert active on every token. false gives the "
        "paper's '- shared expert' ablation.",
    )
    prompt_routing: str = Field(
        default="random",
        description="Expert for question (prompt) tokens: 'random' (the paper: one "
        "randomly chosen step expert per sequence, reproducible from the seed), "
        "'shared' (shared expert only), or a stage name/key such as 'answer'.",
    )
    step_skip_prob: float = Field(
        default=0.0,
        description="Probability p (the paper's p_dropout) that, per example and per "
        "hideable earlier stage, every later stage is cut off from attending to it. "
        "0 turns step skipping off and keeps plain causal attention. Needs "
        "attn_implementation sdpa, eager or flex_attention.",
    )
    skip_stages: list[str] | None = Field(
        default=None,
        description="Stages (names or keys) that later stages may be cut off from. "
        "None: every earlier intermediate stage the template marks skippable "
        "(analysis and guidance in aligncot). The question and a stage's own tokens "
        "always stay visible.",
    )
    skip_markers_visible: bool = Field(
        default=False,
        description="Keep the start/end marker tokens of a hidden stage visible. "
        "false hides the whole span, as if the stage had not been written.",
    )
    skip_positions: SkipPositions = Field(
        default=SkipPositions.SHIFT.value,
        description="Position ids after a hidden stage: 'shift' them down by the hidden "
        "span's length (the default: exactly the positions inference gives when the "
        "stage is truly skipped), or 'keep' the original positions, leaving a gap.",
    )
    validate_files: bool = Field(
        default=True,
        description="Before training, read every local JSONL dataset of type "
        "axolotl_mote.* once and report bad records with file, line and fix.",
    )
    train_marker_embeddings: bool = Field(
        default=True,
        description="Train the embedding (and untied lm_head) rows of the stage "
        "markers through PEFT's trainable_token_indices, so the model learns to "
        "emit them; the rest of the embedding stays frozen.",
    )
    marker_init: MarkerInit = Field(
        default=MarkerInit.DESCRIBE.value,
        description="Initial embedding (and untied lm_head) rows of marker tokens new "
        "to the tokenizer: 'describe' sets each row to the mean embedding of the "
        "stage's words (start: 'Question Analysis:', end: 'End of question "
        "analysis.'; template keys start_text/end_text), so start and end markers "
        "differ from the first step; 'resize' keeps the rows the embedding resize "
        "gave (transformers' mean init, near-identical for every marker).",
    )
    log_stage_metrics: bool = Field(
        default=True,
        description="Log loss and token count per stage (train/loss_<stage>, "
        "train/tokens_<stage>) through the Trainer's logs (TensorBoard, W&B).",
    )
    seed: int | None = Field(
        default=None,
        description="Seed for prompt routing and step skipping draws. None uses the "
        "top-level `seed` (or 42).",
    )

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"mote.alpha must be in (0, 1], got {value}; the paper uses 0.5"
            )
        return value

    @field_validator("step_skip_prob")
    @classmethod
    def _prob_range(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"mote.step_skip_prob must be in [0, 1], got {value}")
        return value


_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
_FLASH = ("flash_attention_2", "flash_attention_3", "flash")


def _cross_key_problems(data: dict[str, Any], opts: dict[str, Any]) -> list[str]:
    """Rules between the mote: block and Axolotl's own keys; each names the fix."""
    problems: list[str] = []
    if data.get("adapter") not in ("lora", "qlora"):
        problems.append(
            f"adapter: {data.get('adapter')!r} -> MoTE builds its experts on PEFT LoRA; "
            "set `adapter: lora` (or qlora)"
        )
    if data.get("peft_use_dora"):
        problems.append(
            "peft_use_dora: true -> DoRA is not supported by MoTE; remove it"
        )
    for key in _KERNEL_KEYS:
        if data.get(key):
            problems.append(
                f"{key}: true -> Axolotl's fused LoRA kernels bypass MoTE's routing; "
                f"set {key}: false (the plugin does so when the key is unset)"
            )
    for key in ("sequence_parallel_degree", "context_parallel_size"):
        if (data.get(key) or 1) > 1:
            problems.append(
                f"{key}: {data.get(key)} -> sequence/context parallelism would split "
                "step_ids from their tokens; remove it"
            )
    lora_r = data.get("lora_r")
    if lora_r is not None and (not isinstance(lora_r, int) or lora_r < 1):
        problems.append(
            f"lora_r: {lora_r!r} -> the expert rank must be an integer >= 1"
        )
    attn = data.get("attn_implementation") or (
        "flash_attention_2" if data.get("flash_attention") else None
    )
    if (opts.get("step_skip_prob") or 0) > 0 and attn in _FLASH:
        problems.append(
            f"attn_implementation: {attn} with mote.step_skip_prob > 0 -> flash "
            "attention cannot express step-skipping masks; use attn_implementation: "
            "sdpa, eager or flex_attention, or set mote.step_skip_prob: 0"
        )
    if data.get("excess_length_strategy") == "truncate" and data.get("sample_packing"):
        pass  # the strategy truncates step_ids in sync itself; nothing to do
    return problems


class MoteArgs(BaseModel):
    """Top-level plugin args: a single nested ``mote:`` key."""

    mote: MoteOptions | None = Field(
        default=None,
        description="MoTE (Mixture of insighTful Experts) options; see "
        "docs/configuration.md.",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_axolotl_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not _plugin_enabled(data):
            return data
        opts = data.get("mote") or {}
        if not isinstance(opts, dict):
            opts = dict(opts)
        problems = _cross_key_problems(data, opts)
        problems += _template_problems(opts)
        if problems:
            raise ValueError(
                "axolotl-mote config errors:\n  - " + "\n  - ".join(problems)
            )
        return data


def _plugin_enabled(data: dict[str, Any]) -> bool:
    plugins = data.get("plugins") or []
    return any("axolotl_mote" in str(p) for p in plugins)


def _template_problems(opts: dict[str, Any]) -> list[str]:
    """Rules that need the template: stage names in routing/skip keys, expert count."""
    from axolotl_mote.templates import load_template

    try:
        template = load_template(opts.get("template") or "aligncot")
    except (ValueError, FileNotFoundError) as err:
        return [str(err)]
    problems: list[str] = []
    shared = opts.get("shared_expert", True)
    routing = opts.get("prompt_routing", "random")
    if template.num_experts < 2 and not shared:
        problems.append(
            f"template {template.name!r} has a single trained stage and "
            "mote.shared_expert is false: that is a plain LoRA; use the template with "
            "more stages, enable the shared expert, or drop the plugin"
        )
    if routing == "shared" and not shared:
        problems.append(
            "mote.prompt_routing: shared needs mote.shared_expert: true; use 'random' "
            "or a stage name"
        )
    elif routing not in ("random", "shared"):
        try:
            stage = template.stage(routing)
            if stage.mode != "train":
                problems.append(
                    f"mote.prompt_routing: {routing!r} is not a trained stage"
                )
        except KeyError:
            problems.append(
                f"mote.prompt_routing: {routing!r} is not 'random', 'shared' or a "
                f"stage of {template.name!r} ({[s.name for s in template.stages]})"
            )
    for name in opts.get("skip_stages") or []:
        try:
            template.stage(name)
        except KeyError:
            problems.append(
                f"mote.skip_stages: {name!r} is not a stage of {template.name!r} "
                f"({[s.name for s in template.stages]})"
            )
    return problems
