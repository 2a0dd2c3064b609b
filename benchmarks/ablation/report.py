"""Aggregate per-seed results into the table (mean ± sample standard deviation over
seeds), the plot, and the results file; refresh the table block in docs/ablation.md."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.ablation.arms import ARMS, LABELS
from benchmarks.ablation.task import STAGES

LOSS_KEYS = [f"loss_{s}" for s in STAGES]
EM_KEYS = [f"em_{s}" for s in STAGES] + ["em_answer_skipped"]
COLUMNS = {
    "loss_analysis": "loss analysis",
    "loss_guidance": "loss guidance",
    "loss_answer": "loss answer",
    "em_analysis": "EM analysis %",
    "em_guidance": "EM guidance %",
    "em_answer": "EM answer %",
    "em_answer_skipped": "EM answer, stages skipped %",
}
BEGIN, END = "<!-- ablation-table:begin -->", "<!-- ablation-table:end -->"


def aggregate(results: list[dict]) -> dict[str, dict[str, Any]]:
    """arm -> {key: (mean, sd, n)} plus the parameter count."""
    out: dict[str, dict[str, Any]] = {}
    for arm in [a for a in ARMS if any(r["arm"] == a for r in results)]:
        rows = [r for r in results if r["arm"] == arm]
        stats: dict[str, Any] = {"params": rows[0]["adapter_parameters"]}
        stats["n"] = len(rows)
        for key in LOSS_KEYS + EM_KEYS:
            values = [r[key] for r in rows if not math.isnan(r[key])]
            mean = statistics.fmean(values) if values else math.nan
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            stats[key] = (mean, sd)
        out[arm] = stats
    return out


def table(agg: dict[str, dict[str, Any]]) -> str:
    """Markdown table; EM in percent."""
    head = ["arm", "adapter params", *COLUMNS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, stats in agg.items():
        cells = [LABELS[arm], f"{stats['params']:,}"]
        for key in COLUMNS:
            mean, sd = stats[key]
            scale, fmt = (100.0, "{:.1f}") if key.startswith("em_") else (1.0, "{:.3f}")
            cells.append(f"{fmt.format(mean * scale)} ± {fmt.format(sd * scale)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed(
    results: list[dict], keys: tuple[str, ...] = ("em_answer", "em_answer_skipped")
) -> str:
    """Markdown table of every seed's exact match (%) for ``keys``: outcomes here are
    often all-or-nothing per seed, which a mean ± sd hides."""
    seeds = sorted({r["seed"] for r in results})
    short = {"em_answer": "EM answer", "em_answer_skipped": "EM skipped"}
    head = ["arm", *(f"{short.get(k, k)} % s{s}" for k in keys for s in seeds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    runs = {(r["arm"], r["seed"]): r for r in results}
    for arm in [a for a in ARMS if any(r["arm"] == a for r in results)]:
        cells = [LABELS[arm]]
        for key in keys:
            for seed in seeds:
                run = runs.get((arm, seed))
                cells.append("–" if run is None else f"{100 * run[key]:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_text(results: list[dict]) -> str:
    """Both tables, as printed and as written into the docs page."""
    return (
        table(aggregate(results)) + "\n\nPer seed (EM skipped: answer with the "
        "intermediate stages skipped):\n\n" + per_seed(results)
    )


def plot(agg: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Grouped bars: exact match per stage and with stages skipped; held-out loss."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "the ablation plot needs matplotlib: pip install 'axolotl-mote[eval]'"
        ) from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(agg)
    fig, (ax_em, ax_loss) = plt.subplots(
        1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [4, 3]}
    )
    for ax, keys, scale, ylabel in (
        (ax_em, EM_KEYS, 100.0, "held-out exact match (%)"),
        (ax_loss, LOSS_KEYS, 1.0, "held-out loss (nats/token)"),
    ):
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            xs = [k + (i - (len(arms) - 1) / 2) * width for k in range(len(keys))]
            means = [agg[arm][key][0] * scale for key in keys]
            sds = [agg[arm][key][1] * scale for key in keys]
            ax.bar(xs, means, width, yerr=sds, capsize=2, label=LABELS[arm])
        ax.set_xticks(range(len(keys)))
        names = [COLUMNS[k].replace(" %", "").replace(", ", ",\n") for k in keys]
        ax.set_xticklabels(names)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    ax_loss.set_ylim(bottom=min(agg[a][k][0] for a in arms for k in LOSS_KEYS) * 0.9)
    ax_em.legend(fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_docs(
    results: list[dict], experiment: dict, docs: Path, name: str, command: str
) -> str:
    """Results JSON, plot (``<name>_plot.png``) and the table block of ``<name>.md``."""
    agg = aggregate(results)
    text = report_text(results)
    docs.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for r in results})
    (docs / f"{name}_results.json").write_text(
        json.dumps(
            {
                "command": command,
                "experiment": experiment,
                "seeds": seeds,
                "runs": results,
                "table": text,
            },
            indent=1,
        )
        + "\n"
    )
    plot(
        agg,
        docs / f"{name}_plot.png",
        f"MoTE ablation on the synthetic conflicting-stage task "
        f"(mean ± sd over seeds {seeds})",
    )
    page = docs / f"{name}.md"
    if page.exists():
        body = page.read_text()
        if BEGIN in body and END in body:
            head, rest = body.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            page.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return text
