"""``results.json``, ``results.md`` and PNG plots, one column / bar per model.

* ``results.md`` — rates per set (the comparison table: one column per model), the
  judge's 1–10 ratings when asked for, mean tokens per stage, stage-plan shares, and
  rates and ratings per stage plan;
* ``rates.png`` — the rates per set, ``tokens_per_stage.png``, ``stage_plans.png``.

Plots use matplotlib's Agg backend (no display needed; ``pip install
axolotl-mote[eval]``). ``merge_results`` joins results files of separate runs into one
comparison.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RATE_KEYS = ("harmless_rate", "robustness", "compliance_rate")
_RATE_TITLES = {
    "harmless_rate": "harmless rate",
    "robustness": "robustness (harmless)",
    "compliance_rate": "compliance rate",
}


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(results), encoding="utf-8")
    paths.update(write_plots(results, out_dir))
    return paths


def merge_results(paths: list[str | Path]) -> dict[str, Any]:
    """One results dict from several results.json (same scorer; model names made
    unique)."""
    merged: dict[str, Any] | None = None
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if merged is None:
            merged = {**data, "models": {}}
        elif data["scorer"]["name"] != merged["scorer"]["name"]:
            raise ValueError(
                f"{path}: scored by {data['scorer']['name']!r}, the others by "
                f"{merged['scorer']['name']!r}; rates are not comparable"
            )
        else:
            merged["sets"].update(data["sets"])
        for name, entry in data["models"].items():
            key, n = name, 2
            while key in merged["models"]:
                key, n = f"{name} ({n})", n + 1
            merged["models"][key] = entry
    if merged is None:
        raise ValueError("no results files to merge")
    return merged


def rate_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, set, metric) for every rate some model has, in set order."""
    rows = []
    for set_name in results["sets"]:
        for key in RATE_KEYS:
            if any(
                key in m["sets"].get(set_name, {}) for m in results["models"].values()
            ):
                rows.append((f"{set_name}: {_RATE_TITLES[key]}", set_name, key))
    return rows


def _cell(value: Any, pct: bool = True) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if pct else f"{value:g}"


def render_markdown(results: dict[str, Any]) -> str:
    models = list(results["models"])
    scorer = results["scorer"]
    head = "| | " + " | ".join(models) + " |\n|---|" + "---|" * len(models) + "\n"
    lines = ["# MoTE evaluation", ""]
    note = (
        " (approximate: its measured agreement with human labels is in "
        "docs/evaluation.md)"
        if scorer.get("approximate")
        else ""
    )
    lines += [
        f"Scorer: `{scorer['name']}`{note}. Sets: "
        + ", ".join(
            f"`{n}` ({s['kind']}, {s['n']} prompts)" for n, s in results["sets"].items()
        )
        + ".",
        "",
        "## Rates (higher is better)",
        "",
        head.rstrip("\n"),
    ]
    for label, set_name, key in rate_rows(results):
        cells = [
            _cell(results["models"][m]["sets"].get(set_name, {}).get(key))
            for m in models
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    unscored = [results["models"][m]["sets"] for m in models]
    if any(s.get("unscored") for sets in unscored for s in sets.values()):
        lines.append(
            "| unscored (judge reply unparseable) | "
            + " | ".join(
                str(sum(s.get("unscored", 0) for s in sets.values()))
                for sets in unscored
            )
            + " |"
        )
    lines += _ratings_table(results, models, head)
    lines += [
        "",
        "## Mean tokens per stage (replies that ran the stage)",
        "",
        head.rstrip("\n"),
    ]
    stages = _ordered(
        {
            s
            for m in models
            for s in results["models"][m]["overall"]["mean_tokens_per_stage"]
        }
    )
    for stage in stages:
        lines.append(
            f"| {stage} | "
            + " | ".join(
                _cell(
                    results["models"][m]["overall"]["mean_tokens_per_stage"].get(stage),
                    False,
                )
                for m in models
            )
            + " |"
        )
    lines.append(
        "| total generated | "
        + " | ".join(
            _cell(results["models"][m]["overall"]["mean_total_tokens"], False)
            for m in models
        )
        + " |"
    )
    lines += ["", "## Stage plans (share of all prompts)", "", head.rstrip("\n")]
    for plan in _plans(results):
        cells = []
        for m in models:
            counts = results["models"][m]["overall"]["stage_plans"]
            cells.append(_cell(counts.get(plan, 0) / max(sum(counts.values()), 1)))
        lines.append(f"| {plan} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Missing answers / answer forced by fallback: "
        + ", ".join(
            f"{m} {results['models'][m]['overall']['no_answer']}/"
            f"{results['models'][m]['overall']['fallback_used']}"
            for m in models
        ),
        "",
    ]
    lines += _plan_tables(results, models)
    return "\n".join(lines)


_RATING_TITLES = {
    "helpfulness": "Help (helpfulness, benign)",
    "harm_help": "Harm-Help (helpfulness, harmful)",
    "analysis_quality": "analysis quality",
    "guidance_quality": "guidance quality",
}


def _ratings_table(results: dict[str, Any], models: list[str], head: str) -> list[str]:
    """Mean judge ratings (1-10) per set; nothing when no rating was asked for."""
    keys: dict[tuple[str, str], None] = {}
    for set_name in results["sets"]:
        for m in models:
            for key in (
                results["models"][m]["sets"].get(set_name, {}).get("ratings", {})
            ):
                if key != "unrated":
                    keys[(set_name, key)] = None
    if not keys:
        return []
    lines = ["", "## Ratings (judge, 1–10, higher is better)", "", head.rstrip("\n")]
    for set_name, key in keys:
        cells = [
            _cell(
                results["models"][m]["sets"]
                .get(set_name, {})
                .get("ratings", {})
                .get(key),
                False,
            )
            for m in models
        ]
        title = _RATING_TITLES.get(key, key)
        lines.append(f"| {set_name}: {title} | " + " | ".join(cells) + " |")
    return lines


def _plan_tables(results: dict[str, Any], models: list[str]) -> list[str]:
    """Per model and set: n, rates and ratings of each stage plan it chose."""
    lines = ["## By stage plan", ""]
    for m in models:
        for set_name, metrics in results["models"][m]["sets"].items():
            plans = metrics.get("by_plan") or {}
            if len(plans) < 2 and results["models"][m].get("mote") is False:
                continue  # a plain model has one "plan": the set's row says it all
            cols = [
                k
                for k in (*RATE_KEYS, *_RATING_TITLES)
                if any(k in v for v in plans.values())
            ]
            lines += [
                f"**{m} / {set_name}**",
                "",
                "| plan | n | "
                + " | ".join(_RATE_TITLES.get(k, k) for k in cols)
                + " |",
                "|---|---|" + "---|" * len(cols),
            ]
            for plan, v in plans.items():
                cells = [_cell(v.get(k), k in RATE_KEYS) for k in cols]
                lines.append(f"| {plan} | {v['n']} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines if len(lines) > 2 else []


def _ordered(stages: set[str]) -> list[str]:
    order = ["question_analysis", "answer_guidance", "safe_answer"]
    return sorted(
        stages, key=lambda s: (order.index(s) if s in order else len(order), s)
    )


def _plans(results: dict[str, Any]) -> list[str]:
    seen: dict[str, int] = {}
    for entry in results["models"].values():
        for plan, n in entry["overall"]["stage_plans"].items():
            seen[plan] = seen.get(plan, 0) + n
    return sorted(seen, key=lambda p: -seen[p])


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    rows = rate_rows(results)
    stages = _ordered(
        {
            s
            for e in results["models"].values()
            for s in e["overall"]["mean_tokens_per_stage"]
        }
    )
    plans = _plans(results)

    def values(xs, get):
        return {m: [get(results["models"][m], x) for x in xs] for m in models}

    def share(entry, plan):
        counts = entry["overall"]["stage_plans"]
        return counts.get(plan, 0) / max(sum(counts.values()), 1)

    figures = {
        "rates": (
            "Rates per set",
            "rate",
            [r[0] for r in rows],
            values(rows, lambda e, r: e["sets"].get(r[1], {}).get(r[2]) or 0.0),
            (0, 1),
        ),
        "tokens_per_stage": (
            "Mean tokens per stage",
            "tokens",
            stages,
            values(
                stages, lambda e, s: e["overall"]["mean_tokens_per_stage"].get(s, 0.0)
            ),
            None,
        ),
        "stage_plans": (
            "Stage-plan distribution",
            "share of prompts",
            plans,
            values(plans, share),
            (0, 1),
        ),
    }
    paths = {}
    for key, (title, ylabel, labels, series, ylim) in figures.items():
        fig, ax = plt.subplots(
            figsize=(max(5.0, 1.2 * len(labels) * max(len(models), 1) / 2 + 2), 4)
        )
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            ax.bar(
                [x + i * width for x in range(len(labels))], series[m], width, label=m
            )
        ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(labels))])
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        if not labels:
            ax.text(0.5, 0.5, "nothing to show", ha="center", transform=ax.transAxes)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths[key] = out_dir / f"{key}.png"
        fig.savefig(paths[key], dpi=100)
        plt.close(fig)
    return paths
