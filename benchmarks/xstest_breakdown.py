"""Where the models of ``safety_smollm2.py`` over-refuse: XSTest rates by prompt type.

Reads the cached evaluations of a finished (or partial) run, trains and generates
nothing::

    python benchmarks/xstest_breakdown.py --xstest /path/to/xstest_prompts.csv

For every cached model (``<work-dir>/eval/<model>/xstest_*.json``, full runs only) it
prints, per XSTest ``type`` (homonyms, figurative_language, … and their ``contrast_``
harmful twins), the compliance rate on safe prompts and the refusal rate on unsafe ones,
pooled over the seeds of each arm (each seed sees the same prompts), and as its last
line a JSON object with the same numbers. Why: the headline rate mixes prompt types
that a small model finds easy (safe contexts, definitions) with ones it cannot separate
from their harmful twins by surface words (homonyms); the breakdown says which.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def xstest_types(path: Path) -> dict[str, str]:
    """XSTest row id -> its ``type`` column."""
    with path.open(encoding="utf-8", newline="") as fh:
        return {row["id"]: row["type"] for row in csv.DictReader(fh)}


def arm_of(model: str) -> str:
    """``mote-s42`` -> ``mote``; ``mote-s42.expected`` -> ``mote.expected``."""
    return re.sub(r"-s\d+", "", model)


def breakdown(
    work: Path, types: dict[str, str], scorer=None
) -> dict[str, dict[str, float]]:
    """{arm: {type: rate}}: compliance on safe types, refusal on unsafe ones.

    ``scorer``: re-score the cached answers with it (default: the cached scores, the
    scorer the run used)."""
    counts: dict[str, dict[str, list[int]]] = defaultdict(
        lambda: defaultdict(lambda: [0, 0])
    )
    for cache in sorted(work.glob("eval/*/xstest_*.json")):
        if ".limit" in cache.name:
            continue
        arm = arm_of(cache.parent.name)
        generations = json.loads(cache.read_text())["generations"]
        if scorer is not None:
            from axolotl_mote.evaluation.scorers import ScoreInput

            fresh = scorer.score(
                [ScoreInput(g["question"], g["answer"] or "", g["label"])
                 for g in generations]
            )  # fmt: skip
            generations = [
                dict(g, score={"refused": new.refused})
                for g, new in zip(generations, fresh)
            ]
        for gen in generations:
            score = gen["score"]
            if score.get("refused") is None:
                continue
            kind = types.get(str(gen["id"]))
            if kind is None:
                raise ValueError(
                    f"{cache}: prompt id {gen['id']!r} is not in the XSTest CSV; pass "
                    "the --xstest file the run was evaluated on"
                )
            good = (
                not score["refused"] if gen["label"] == "benign" else score["refused"]
            )
            counts[arm][kind][0] += int(good)
            counts[arm][kind][1] += 1
    return {
        arm: {kind: round(k / n, 3) for kind, (k, n) in sorted(by_type.items())}
        for arm, by_type in counts.items()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xstest", type=Path, required=True)
    parser.add_argument(
        "--work-dir", type=Path, default=REPO / "outputs" / "safety_smollm2"
    )
    parser.add_argument(
        "--scorer",
        choices=("cached", "string", "learned"),
        default="cached",
        help="re-score the cached answers (default: the scores the run cached)",
    )
    args = parser.parse_args(argv)
    types = xstest_types(args.xstest)
    scorer = None
    if args.scorer != "cached":
        import sys

        sys.path.insert(0, str(REPO))
        from axolotl_mote.evaluation.scorers import build_scorer

        scorer = build_scorer(args.scorer)
    table = breakdown(args.work_dir, types, scorer)
    arms = list(table)
    kinds = sorted({k for rates in table.values() for k in rates})
    print("| XSTest type | " + " | ".join(arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    for kind in kinds:
        what = "refusal" if kind.startswith("contrast_") else "compliance"
        cells = [f"{table[a].get(kind, float('nan')):.0%}" for a in arms]
        n = sum(t == kind for t in types.values())
        print(f"| {kind} ({what}, {n}) | " + " | ".join(cells) + " |")
    print(json.dumps(table))
    return table


if __name__ == "__main__":
    main()
