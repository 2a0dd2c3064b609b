"""``MoteConfig``: what the experts are, saved as mote_config.json beside the
adapter."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from axolotl_mote.constants import MOTE_CONFIG_NAME, PROMPT_ROUTINGS

#: PEFT pattern key matching every module, sorting after user keys (see peft_kwargs).
CATCH_ALL = "|.*"
#: Catch-all keys of adapters saved by earlier versions.
CATCH_ALL_KEYS = (CATCH_ALL, ".*")

#: Written into a MoTE adapter's adapter_config.json (``mark_routed_adapter``). PEFT
#: has no such field: a plain ``PeftModel.from_pretrained`` (or transformers'
#: ``load_adapter``) drops it with a UserWarning that prints this name, so loading a
#: routed adapter unrouted says what to use instead. The package's loaders and the
#: plugin's Axolotl runs silence that one warning (``quiet_routed_adapter_warning``).
ROUTED_ADAPTER_KEY = "mote_routed_adapter__load_with_axolotl_mote_load_mote_model"
ROUTED_ADAPTER_NOTE = (
    "A MoTE adapter: each token must be routed to its stage's expert. Load it with "
    "axolotl_mote.load_mote_model(BASE_MODEL, THIS_FOLDER), or in Axolotl with "
    "plugins: [axolotl_mote.MotePlugin]; plain PeftModel.from_pretrained runs every "
    "expert on every token."
)


def mark_routed_adapter(directory: str | Path) -> bool:
    """Add :data:`ROUTED_ADAPTER_KEY` to ``directory/adapter_config.json`` if there is
    one (idempotent); True when the file carries it."""
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    if data.get(ROUTED_ADAPTER_KEY) != ROUTED_ADAPTER_NOTE:
        data[ROUTED_ADAPTER_KEY] = ROUTED_ADAPTER_NOTE
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return True


def quiet_routed_adapter_warning() -> None:
    """Silence PEFT's "unexpected keyword" warning for :data:`ROUTED_ADAPTER_KEY` only
    (for loaders that route the adapter); every other PEFT warning still shows."""
    import warnings

    warnings.filterwarnings(
        "ignore", message=f"(?s).*'{ROUTED_ADAPTER_KEY}'", category=UserWarning
    )


def expert_rules(
    stage_names: list[str],
    expert_rank: Any,
    alpha: Any,
    shared_expert: bool,
    prompt_routing: str,
    stage_index: Callable[[str], int | None],
) -> list[str]:
    """Every rule on the experts, each message naming the ``mote:`` key and the fix.

    The single place these rules live: :class:`MoteConfig` raises them, and the
    config validation (``args.py``) reports them beside Axolotl's own keys before
    anything loads. ``stage_index`` maps a stage name or record key to its expert
    index (None: not a trained stage).
    """
    problems: list[str] = []
    if not stage_names:
        problems.append(
            "stage_names is empty: the template has no `mode: train` stage, and MoTE "
            "needs at least one trained stage (one expert)"
        )
    if (
        isinstance(expert_rank, bool)
        or not isinstance(expert_rank, int)
        or expert_rank < 1
    ):
        problems.append(
            f"lora_r (the expert_rank of each expert) must be an integer >= 1, got "
            f"{expert_rank!r}; set lora_r to the rank of one expert"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        problems.append(f"mote.alpha must be a number in (0, 1], got {alpha!r}")
    elif not 0.0 < alpha <= 1.0:
        problems.append(
            f"mote.alpha must be in (0, 1], got {alpha}; the paper uses 0.5"
        )
    if len(stage_names) == 1 and not shared_expert:
        problems.append(
            f"the template has a single trained stage ({stage_names[0]}) and "
            "mote.shared_expert is false: a single stage without a shared expert is a "
            "plain LoRA; use a template with more stages, enable the shared expert, "
            "or drop the plugin"
        )
    if prompt_routing == "shared" and not shared_expert:
        problems.append(
            "mote.prompt_routing: shared needs mote.shared_expert: true; use "
            "'random', 'expected' or a stage name"
        )
    elif prompt_routing not in PROMPT_ROUTINGS and stage_index(prompt_routing) is None:
        problems.append(
            f"mote.prompt_routing: {prompt_routing!r} is not 'random', 'shared', "
            f"'expected' or a trained stage ({stage_names})"
        )
    return problems


@dataclass
class MoteConfig:
    """Experts of a MoTE model. One PEFT LoRA of rank ``n_blocks * expert_rank`` per
    layer."""

    stage_names: list[str] = field(metadata={"help": "Trained stages, expert order."})
    expert_rank: int = field(default=8, metadata={"help": "Rank r of each expert."})
    alpha: float = field(default=0.5, metadata={"help": "Step-expert weight."})
    shared_expert: bool = field(default=True, metadata={"help": "Add a shared expert."})
    prompt_routing: str = field(
        default="random",
        metadata={"help": "random | shared | expected | a stage name."},
    )
    experts: str = field(
        default="routed",
        metadata={
            "help": "routed (MoTE) | single (one LoRA on every token, no routing)."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of random prompt routing."})
    template: str = field(default="aligncot", metadata={"help": "Template name."})
    template_data: dict[str, Any] | None = field(
        default=None, metadata={"help": "The full template, for self-description."}
    )
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows of the trained (resized) embedding: loaders resize the base "
            "model to it, so a compact adapter gives the trained logits."
        },
    )
    format_version: int = 1

    def __post_init__(self) -> None:
        problems = expert_rules(
            self.stage_names,
            self.expert_rank,
            self.alpha,
            self.shared_expert,
            self.prompt_routing,
            self._stage_index,
        )
        if self.experts not in ("routed", "single"):
            problems.append(
                f"mote.experts must be 'routed' or 'single', got {self.experts!r}"
            )
        if problems:
            raise ValueError("invalid MoTE config:\n  - " + "\n  - ".join(problems))

    @property
    def num_experts(self) -> int:
        return len(self.stage_names)

    @property
    def n_blocks(self) -> int:
        return self.num_experts + int(self.shared_expert)

    @property
    def peft_rank(self) -> int:
        return self.n_blocks * self.expert_rank

    def prompt_routing_index(self) -> int | str:
        """'random' / 'shared' / 'expected', or the expert index of a stage."""
        if self.prompt_routing in PROMPT_ROUTINGS:
            return self.prompt_routing
        index = self._stage_index(self.prompt_routing)
        if index is None:  # __post_init__ refused it already
            raise ValueError(f"prompt_routing {self.prompt_routing!r} is no stage")
        return index

    def resolve_prompt_routing(self, value: str | int | None) -> int | str:
        """An inference-time override (``--prompt-routing``) checked against this
        adapter: 'random' / 'shared' / 'expected' or a stage's expert index; None is
        the adapter's own. Raises ValueError naming the valid choices (before any model
        loads)."""
        from axolotl_mote.routing import PromptRouting

        if value is None:
            return self.prompt_routing_index()
        if isinstance(value, str) and value not in PROMPT_ROUTINGS:
            index = self._stage_index(value)
            if index is None:
                raise ValueError(
                    f"prompt routing {value!r} is not 'random', 'shared', 'expected' "
                    f"or a stage of this adapter ({', '.join(self.stage_names)})"
                )
            value = index
        parsed = PromptRouting.parse(value, self.num_experts, self.shared_expert)
        return parsed.value

    def _stage_index(self, name_or_key: str) -> int | None:
        """Expert index of a trained stage by name, or by record key via the
        template."""
        if name_or_key in self.stage_names:
            return self.stage_names.index(name_or_key)
        if self.template_data:
            for stage in self.template_data.get("stages", []):
                if (
                    stage.get("key") == name_or_key
                    and stage["name"] in self.stage_names
                ):
                    return self.stage_names.index(stage["name"])
        return None

    def peft_kwargs(
        self,
        lora_alpha: float,
        use_rslora: bool = False,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """PEFT LoraConfig kwargs giving every layer n_blocks rank blocks.

        PEFT scales a layer by ``lora_alpha / R`` (or ``/ sqrt(R)`` with rsLoRA); with
        ``R = n_blocks * r`` the alpha is multiplied by ``n_blocks`` (``sqrt``) so each
        expert keeps the scaling of a rank-r LoRA. A user's own patterns are composed
        the same way, and :data:`CATCH_ALL` covers every other layer.

        PEFT takes the *first* pattern that matches, and writes adapter_config.json with
        sorted keys; a plain ``".*"`` would sort first on reload and shadow the user's
        patterns. ``"|.*"`` matches everything too (an empty alternative or anything)
        and sorts after any key that starts with a letter, digit, ``.``, ``^`` or ``(``.
        """
        factor = math.sqrt(self.n_blocks) if use_rslora else float(self.n_blocks)
        ranks = {k: int(v) * self.n_blocks for k, v in (rank_pattern or {}).items()}
        alphas = {k: float(v) * factor for k, v in (alpha_pattern or {}).items()}
        ranks[CATCH_ALL] = self.peft_rank
        alphas[CATCH_ALL] = float(lora_alpha) * factor
        return {"rank_pattern": ranks, "alpha_pattern": alphas}

    def prompt_template(self):
        """The PromptTemplate this adapter was trained with."""
        from axolotl_mote.templates import PromptTemplate, load_template

        if self.template_data:
            return PromptTemplate.model_validate(self.template_data)
        return load_template(self.template)

    # --- persistence ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> Path:
        """Write mote_config.json, and mark the adapter_config.json beside it (if
        saved already) so that plain PEFT loading warns (``mark_routed_adapter``)."""
        path = Path(directory) / MOTE_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if self.experts != "single":
            mark_routed_adapter(directory)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> MoteConfig:
        path = Path(directory) / MOTE_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not a MoTE adapter"
            )
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
