"""The ``mote:`` block of an Axolotl config, declared once.

Axolotl merges ``MoteArgs`` into its config schema (``MotePlugin.get_input_args``), so
every key here is validated by ``axolotl train``/``preprocess`` like a core key. Each
field carries its user-facing description; ``docs/configuration.md`` is generated from
them. Cross-key rules against Axolotl's own keys live in
``MoteArgs._check_axolotl_keys``.

This module must stay cheap to import (no torch): Axolotl imports it while building the
config schema, before any model loads.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class SkipPositions(str, Enum):
    """Position ids of tokens that follow a hidden (skipped) stage."""

    KEEP = "keep"
    SHIFT = "shift"


class StepSkipAttention(str, Enum):
    """How sdpa applies the step-skipping draw."""

    REGIONS = "regions"
    DENSE = "dense"


class MarkerTokens(str, Enum):
    """Where the marker tokens come from."""

    NEW = "new"
    RESERVED = "reserved"


class Experts(str, Enum):
    """How tokens reach the LoRA blocks."""

    ROUTED = "routed"
    SINGLE = "single"


class MarkerInit(str, Enum):
    """Initial rows of newly added marker tokens."""

    DESCRIBE = "describe"
    RESIZE = "resize"


class MoteOptions(BaseModel):
    """Options of the MoTE plugin (the ``mote:`` block)."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True, frozen=True)

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
    experts: Experts = Field(
        default=Experts.ROUTED.value,
        description="'routed': MoTE, each token to its stage's expert (plus the "
        "shared one). 'single': no routing, every token through all the blocks at "
        "weight 1, i.e. one plain LoRA of rank (experts + shared) x lora_r with the "
        "same markers, data, step skipping and budget: the paper's single-LoRA "
        "baseline on full chains (Table 4). Its adapter is a plain PEFT LoRA; "
        "per-stage export does not apply.",
    )
    prompt_routing: str = Field(
        default="random",
        description="Expert for question (prompt) tokens: 'random' (the paper: one "
        "randomly chosen step expert per sequence, reproducible from the seed; at "
        "inference one drawn per prompt, keyed by its tokens), 'expected' (every step "
        "expert at alpha / E: the expected value of 'random'), 'shared' (shared "
        "expert only), or a stage name/key such as 'answer'.",
    )
    step_skip_prob: float | None = Field(
        default=None,
        description="Probability p (the paper's p_dropout) that, per example and per "
        "hideable earlier stage, every later stage is cut off from attending to it. "
        "Unset: 0.3 (step skipping on, as in the paper, which gives no value; 0.3 is "
        "this project's choice) under every attention that can run it (sdpa, eager, "
        "flex_attention, flash attention as regions through its varlen kernel), and "
        "0 with a logged note under one that cannot (xformers). 0 turns it off: "
        "plain causal attention, the paper's '- step "
        "skipping' variant.",
    )
    step_skip_attention: StepSkipAttention = Field(
        default=StepSkipAttention.REGIONS.value,
        description="With attn_implementation sdpa: 'regions' runs attention as "
        "causal attention over gathered key regions (no T x T mask, close to plain "
        "causal speed at any length; models with sliding-window or soft-capped "
        "attention fall back to 'dense'); 'dense' passes the full [B, 1, T, T] step "
        "mask to sdpa (the reference the regions are tested against). eager and "
        "flex_attention always use their own mask.",
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
        description="Position ids after a hidden stage: 'shift' them down by the "
        "hidden span's length (the default: exactly the positions inference gives "
        "when the stage is truly skipped), or 'keep' the original positions, leaving "
        "a gap.",
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
    marker_tokens: MarkerTokens = Field(
        default=MarkerTokens.NEW.value,
        description="'new' adds the markers to the vocabulary (the embedding is "
        "resized; adapters still save only the new rows). 'reserved' renames unused "
        "reserved special tokens of the tokenizer (Llama-3's "
        "<|reserved_special_token_N|>) to the markers through Axolotl's "
        "added_tokens_overrides: no resize at all. Fails, naming the count, when the "
        "tokenizer has too few.",
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

    @field_validator("step_skip_prob")
    @classmethod
    def _prob_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"mote.step_skip_prob must be in [0, 1], got {value}")
        return value


#: Axolotl's fused LoRA kernels read lora_A/lora_B directly and bypass routing.
KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
#: How step skipping runs under each attention implementation that can take it; flash
#: flavours (``flash_attention_2``/``_3``, hub kernels) run it as regions through their
#: variable-length kernel (attention.py).
STEP_SKIP_BACKENDS = {
    "sdpa": ("regions", "dense"),  # mote.step_skip_attention picks one
    "eager": ("dense",),
    "flex_attention": ("flex",),
}
#: p when ``mote.step_skip_prob`` is unset and the attention can take step masks.
DEFAULT_STEP_SKIP_PROB = 0.3


def attention_of(data: Any) -> str:
    """The attention implementation an Axolotl config selects (default sdpa)."""
    get = data.get if hasattr(data, "get") else lambda k: getattr(data, k, None)
    if get("attn_implementation"):
        return str(get("attn_implementation"))
    for flag, name in (
        ("flash_attention", "flash_attention_2"),
        ("flex_attention", "flex_attention"),
        ("sdp_attention", "sdpa"),
        ("eager_attention", "eager"),
        ("xformers_attention", "xformers"),
    ):
        if get(flag):
            return name
    return "sdpa"


def step_skip_backend(
    attention: str, step_skip_attention: str = "regions"
) -> str | None:
    """How step skipping runs under ``attention``: ``regions`` (sdpa or any flash
    flavour), ``dense`` (sdpa's boolean or eager's additive mask), ``flex`` (a
    BlockMask), or None where it cannot run. The one place this is decided."""
    if "flash" in attention:
        return "regions"
    choices = STEP_SKIP_BACKENDS.get(attention)
    if not choices:
        return None
    return step_skip_attention if step_skip_attention in choices else choices[0]


def step_skip_prob(options: MoteOptions, attention: str) -> tuple[float, str | None]:
    """The p a run uses, and a note when the default had to turn step skipping off."""
    if options.step_skip_prob is not None:
        return float(options.step_skip_prob), None
    if step_skip_backend(attention) is not None:
        return DEFAULT_STEP_SKIP_PROB, None
    return 0.0, (
        f"MoTE: step skipping is off: attn_implementation {attention} cannot take "
        "step-skipping masks. Use attn_implementation: sdpa, eager, flex_attention or "
        "a flash attention to train the paper's step skipping (set "
        "mote.step_skip_prob: 0 to silence this note)"
    )


def _number(value: Any) -> float | None:
    return (
        value
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else None
    )


def _cross_key_problems(data: dict[str, Any], opts: MoteOptions | None) -> list[str]:
    """Rules between the mote: block and Axolotl's own keys; each names the fix."""
    problems: list[str] = []
    if data.get("adapter") not in ("lora", "qlora"):
        problems.append(
            f"adapter: {data.get('adapter')!r} -> MoTE builds its experts on PEFT "
            "LoRA; set `adapter: lora` (or qlora)"
        )
    if data.get("peft_use_dora"):
        problems.append(
            "peft_use_dora: true -> DoRA is not supported by MoTE; remove it"
        )
    for key in KERNEL_KEYS:
        if data.get(key):
            problems.append(
                f"{key}: true -> Axolotl's fused LoRA kernels bypass MoTE's routing; "
                f"set {key}: false (the plugin does so when the key is unset)"
            )
    for key in ("sequence_parallel_degree", "context_parallel_size"):
        value = data.get(key)
        if value is not None and (_number(value) or 0) > 1:
            problems.append(
                f"{key}: {value} -> sequence/context parallelism would split step_ids "
                "from their tokens; remove it"
            )
    attention = attention_of(data)
    if opts is not None and (opts.step_skip_prob or 0) > 0:
        if step_skip_backend(attention) is None:
            problems.append(
                f"attn_implementation: {attention} with mote.step_skip_prob > 0 -> "
                f"{attention} cannot express step-skipping masks; use "
                "attn_implementation: sdpa, eager, flex_attention or flash attention, "
                "or set mote.step_skip_prob: 0"
            )
    return problems


def _misspelled_block(data: dict[str, Any], known: set[str]) -> list[str]:
    """Unknown top-level keys that look like ``mote`` (Axolotl would drop them)."""
    import difflib

    out = []
    for key in data:
        if key == "mote" or key in known or not isinstance(key, str):
            continue
        lowered = key.lower()
        if (
            lowered.startswith("mote")
            or difflib.SequenceMatcher(None, lowered, "mote").ratio() >= 0.75
        ):
            out.append(
                f"{key}: is not a config key (Axolotl would drop it silently); did you "
                "mean `mote:`?"
            )
    return out


def _option_problems(raw: Any) -> tuple[MoteOptions | None, list[str]]:
    """Parse the mote: block; every problem as ``mote.<key>: message``."""
    if raw is None:
        raw = {}
    if isinstance(raw, MoteOptions):
        return raw, []
    if not isinstance(raw, dict):
        return None, [
            f"mote: must be a mapping of options, got {type(raw).__name__}; see "
            "docs/configuration.md"
        ]
    try:
        return MoteOptions.model_validate(raw), []
    except ValidationError as err:
        problems = []
        for item in err.errors():
            where = ".".join(str(p) for p in item["loc"]) or "(block)"
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = f"unknown key; valid keys: {sorted(MoteOptions.model_fields)}"
            problems.append(f"mote.{where}: {message} (got {item.get('input')!r})")
        return None, problems


def _template_problems(data: dict[str, Any], opts: MoteOptions) -> list[str]:
    """Rules that need the template: experts, stage names in routing and skip keys."""
    from axolotl_mote.templates import load_template
    from axolotl_mote.tuner.config import expert_rules

    try:
        template = load_template(opts.template)
    except (ValueError, FileNotFoundError) as err:
        return [str(err)]
    problems = []

    def stage_index(name: str) -> int | None:
        try:
            return template.trained_index(name)
        except ValueError:
            return None

    lora_r = data.get("lora_r")
    problems += expert_rules(
        [s.name for s in template.trained_stages],
        8 if lora_r is None else lora_r,
        opts.alpha,
        opts.shared_expert,
        opts.prompt_routing,
        stage_index,
    )
    try:
        template.hideable_steps(opts.skip_stages)
    except ValueError as err:
        problems.append(str(err))
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
        """Every MoTE rule at once, before Axolotl's own validation of the block."""
        if not isinstance(data, dict) or not _plugin_enabled(data):
            return data
        opts, problems = _option_problems(data.get("mote"))
        problems = _misspelled_block(data, set(cls.model_fields)) + problems
        problems += _cross_key_problems(data, opts)
        if opts is not None:
            problems += _template_problems(data, opts)
        if problems:
            raise ValueError(
                "axolotl-mote config errors:\n  - " + "\n  - ".join(problems)
            )
        return data


def _plugin_enabled(data: dict[str, Any]) -> bool:
    plugins = data.get("plugins") or []
    return any("axolotl_mote" in str(p) for p in plugins)
