"""Prompt templates: stage names, markers and chat formats as data.

A template is a YAML file (see ``prompt_templates/aligncot.yaml``). It declares the
ordered reasoning stages of a chain, the start/end marker token of each stage, which
stages are trained (get an expert and a loss), and optional data-generation prompts.

``mote.template`` in the Axolotl config is either the name of a file shipped in
``prompt_templates/`` (``aligncot``) or a path to the user's own file. Every template is
validated here, once, with errors that name the file, the key and the fix.
"""

from __future__ import annotations

import functools
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from axolotl_mote.constants import PROMPT_STEP


class UnknownStageError(ValueError, KeyError):
    """A stage name or record key the template does not have (or cannot use there)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StageMode(str, Enum):
    """What a stage does in a training sequence."""

    TRAIN = "train"  # own expert, labels on its tokens (markers included)
    CONTEXT = "context"  # in the sequence, labels -100, routed like the prompt
    OMIT = "omit"  # left out of training sequences (e.g. a data-generation check)


class Stage(BaseModel):
    """One reasoning stage of a chain."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Stage name, e.g. question_analysis. Unique.")
    key: str = Field(description="Record key holding this stage's text, e.g. analysis.")
    start: str = Field(description="Start marker token, e.g. <|analysis|>.")
    end: str = Field(description="End marker token, e.g. <|/analysis|>.")
    mode: StageMode = Field(default=StageMode.TRAIN, description="train|context|omit")
    skippable: bool = Field(
        default=True,
        description="Whether a chain may leave this stage out (and whether step "
        "skipping may hide it from later stages).",
    )
    title: str | None = Field(default=None, description="Human-readable title.")
    start_text: str | None = Field(
        default=None,
        description="Words whose mean token embedding initialises a new start marker "
        "(mote.marker_init: describe). Default: the title, e.g. 'Question Analysis:'.",
    )
    end_text: str | None = Field(
        default=None,
        description="Words that initialise a new end marker. Default: "
        "'End of <title>.'",
    )

    @property
    def display_title(self) -> str:
        return self.title or self.name.replace("_", " ").title()

    def marker_texts(self) -> dict[str, str]:
        """Descriptive text per marker, for initialising the marker embedding rows."""
        return {
            self.start: self.start_text or f"{self.display_title}:",
            self.end: self.end_text or f"End of {self.display_title.lower()}.",
        }


class ChatFormat(BaseModel):
    """How the conversation and the assistant turn are rendered."""

    model_config = ConfigDict(extra="forbid")

    jinja: str | None = Field(
        default=None,
        description="A Jinja chat template. None uses the tokenizer's chat template "
        "(which Axolotl's own `chat_template:` key may have set).",
    )


class PromptTemplate(BaseModel):
    """A validated MoTE prompt template."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    stages: list[Stage]
    answer_stage: str = Field(
        description="Name of the final stage; a chain must contain it and generation "
        "stops after it."
    )
    chat_format: ChatFormat = Field(default_factory=ChatFormat)
    generation: dict[str, Any] = Field(
        default_factory=dict,
        description="Data-generation and evaluation prompts (see "
        "axolotl_mote.datagen).",
    )
    source: str | None = Field(default=None, description="Where it was loaded from.")

    @model_validator(mode="after")
    def _check(self) -> PromptTemplate:
        problems: list[str] = []
        if not self.stages:
            problems.append("`stages` is empty: declare at least one stage")
        for attr in ("name", "key"):
            seen: set[str] = set()
            for stage in self.stages:
                value = getattr(stage, attr)
                if value in seen:
                    problems.append(f"duplicate stage {attr} {value!r}")
                seen.add(value)
        markers: dict[str, str] = {}
        for stage in self.stages:
            for which in ("start", "end"):
                marker = getattr(stage, which)
                if not marker.strip():
                    problems.append(f"stage {stage.name!r}: `{which}` marker is empty")
                elif marker in markers:
                    problems.append(
                        f"duplicate marker {marker!r}: used by {markers[marker]} and "
                        f"{stage.name}.{which}; every marker must be unique"
                    )
                markers.setdefault(marker, f"{stage.name}.{which}")
        names = [s.name for s in self.stages]
        if self.answer_stage not in names:
            problems.append(
                f"`answer_stage: {self.answer_stage}` is not a stage; choose one of "
                f"{names}"
            )
        else:
            answer = self.stage(self.answer_stage)
            if answer.mode is not StageMode.TRAIN:
                problems.append(f"answer stage {answer.name!r} must have `mode: train`")
            if answer.skippable:
                problems.append(
                    f"answer stage {answer.name!r} cannot be `skippable: true`"
                )
        if problems:
            where = f" ({self.source})" if self.source else ""
            raise ValueError(
                f"invalid MoTE template {self.name!r}{where}:\n  - "
                + "\n  - ".join(problems)
            )
        return self

    # --- lookups -----------------------------------------------------------------
    def stage(self, name_or_key: str) -> Stage:
        """Return a stage by name or record key."""
        for stage in self.stages:
            if name_or_key in (stage.name, stage.key):
                return stage
        raise UnknownStageError(
            f"template {self.name!r} has no stage {name_or_key!r}; stages: "
            f"{[s.name for s in self.stages]} (record keys {self.stage_keys})"
        )

    def trained_index(self, name_or_key: str) -> int:
        """Expert index (step id) of a trained stage, by name or record key."""
        stage = self.stage(name_or_key)
        if stage.mode is not StageMode.TRAIN:
            raise UnknownStageError(
                f"stage {stage.name!r} has mode {stage.mode.value}: only trained "
                "stages "
                f"({[s.name for s in self.trained_stages]}) have an expert"
            )
        return self.trained_stages.index(stage)

    @property
    def trained_stages(self) -> list[Stage]:
        """Stages with an expert, in template order; index = step id."""
        return [s for s in self.stages if s.mode is StageMode.TRAIN]

    @property
    def num_experts(self) -> int:
        """Number of step experts (the shared expert is not counted)."""
        return len(self.trained_stages)

    def step_id(self, name_or_key: str) -> int:
        """Step id of a stage: its expert index, or PROMPT_STEP for context stages."""
        stage = self.stage(name_or_key)
        if stage.mode is StageMode.TRAIN:
            return self.trained_stages.index(stage)
        if stage.mode is StageMode.CONTEXT:
            return PROMPT_STEP
        raise ValueError(f"stage {stage.name!r} has mode: omit and no step id")

    def hideable_steps(self, names: list[str] | None = None) -> list[int]:
        """Step ids step skipping may hide from later stages.

        ``names`` (``mote.skip_stages``): stage names or record keys; None: every
        trained stage marked ``skippable``. Only trained stages before the answer can
        be hidden; anything else raises naming the stage and the choices.
        """
        trained = self.trained_stages
        if names is None:
            return [i for i, s in enumerate(trained) if s.skippable]
        choices = [s.name for s in trained if s.name != self.answer_stage]
        out = []
        for name in names:
            try:
                stage = self.stage(name)
            except UnknownStageError:
                raise UnknownStageError(
                    f"mote.skip_stages: {name!r} is not a stage of template "
                    f"{self.name!r}; choose among {choices}"
                ) from None
            if stage.name == self.answer_stage:
                raise UnknownStageError(
                    f"mote.skip_stages: {name!r} is the answer stage, which later "
                    f"stages never follow and which is never hidden; choose among "
                    f"{choices}"
                )
            if stage.mode is not StageMode.TRAIN:
                raise UnknownStageError(
                    f"mote.skip_stages: {name!r} has mode {stage.mode.value} (no "
                    f"expert, nothing to hide); choose among {choices}"
                )
            out.append(trained.index(stage))
        return sorted(set(out))

    @property
    def markers(self) -> list[str]:
        """All marker strings, start then end, in stage order."""
        return [m for s in self.stages for m in (s.start, s.end)]

    @property
    def stage_keys(self) -> list[str]:
        return [s.key for s in self.stages]


def template_dir() -> Path:
    """Directory of the templates shipped with the package."""
    from axolotl_mote.resources import resource_dir

    return resource_dir("prompt_templates")


def available_templates() -> list[str]:
    return sorted(p.stem for p in template_dir().glob("*.yaml"))


@functools.lru_cache(maxsize=32)
def _load_cached(path: str) -> PromptTemplate:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"MoTE template {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"MoTE template {path} must be a YAML mapping")
    raw.setdefault("name", Path(path).stem)
    raw["source"] = path
    try:
        return PromptTemplate.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"invalid MoTE template {path}:\n{err}") from err


def load_template(name_or_path: str | Path) -> PromptTemplate:
    """Load a template by shipped name (``aligncot``) or by file path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise FileNotFoundError(
                f"mote.template: file {candidate} does not exist; give a path to a "
                f"template YAML or one of the shipped names {available_templates()}"
            )
        return _load_cached(str(candidate.resolve()))
    shipped = template_dir() / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ValueError(
            f"mote.template: unknown template {str(name_or_path)!r}; use one of "
            f"{available_templates()} or a path to your own .yaml file"
        )
    return _load_cached(str(shipped))
