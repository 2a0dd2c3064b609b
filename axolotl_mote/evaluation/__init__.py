"""Safety evaluation of MoTE models (``axolotl-mote evaluate``; docs/evaluation.md).

``prompts`` reads prompt sets, ``scorers`` holds the pluggable scorers, ``runner``
generates (stage-routed for MoTE adapters) and computes metrics, ``report`` writes
results.json, results.md and the plots. Importing this package loads no torch.
"""

from __future__ import annotations

from axolotl_mote.evaluation.prompts import (
    KINDS,
    PromptItem,
    PromptSet,
    load_prompt_set,
)
from axolotl_mote.evaluation.report import merge_results, render_markdown, write_report
from axolotl_mote.evaluation.runner import (
    GenOptions,
    ModelSpec,
    evaluate_models,
    metrics_for,
)
from axolotl_mote.evaluation.scorers import (
    SCORERS,
    JudgeScorer,
    Score,
    ScoreInput,
    StringMatchScorer,
    build_scorer,
    load_rubric,
)

__all__ = [
    "KINDS",
    "SCORERS",
    "GenOptions",
    "JudgeScorer",
    "ModelSpec",
    "PromptItem",
    "PromptSet",
    "Score",
    "ScoreInput",
    "StringMatchScorer",
    "build_scorer",
    "evaluate_models",
    "load_prompt_set",
    "load_rubric",
    "merge_results",
    "metrics_for",
    "render_markdown",
    "write_report",
]
