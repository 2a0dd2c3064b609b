"""``python -m benchmarks.ablation``: run the ablation and print its table.

python -m benchmarks.ablation --docs docs                 # full run, writes docs/
python -m benchmarks.ablation --quick --work-dir /tmp/q   # a few steps per arm
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from benchmarks.ablation.report import report_text, write_docs
    from benchmarks.ablation.runner import FULL, QUICK, run

    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per arm (tests)"
    )
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--steps", type=int, help="training steps per arm")
    parser.add_argument("--arms", help="comma-separated subset of the six arms")
    parser.add_argument(
        "--work-dir", default="ablation_runs", help="runs and checkpoints"
    )
    parser.add_argument(
        "--docs",
        help="write <docs>/ablation{_plot.png,_results.json} "
        "and refresh the table in <docs>/ablation.md",
    )
    parser.add_argument("--name", default="ablation", help="file stem under --docs")
    parser.add_argument(
        "--no-resume", action="store_true", help="retrain finished runs"
    )
    args = parser.parse_args(argv)

    exp = QUICK if args.quick else FULL
    if args.seeds:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        exp = dataclasses.replace(exp, seeds=seeds)
    if args.steps:
        budget = dataclasses.replace(exp.budget, steps=args.steps)
        exp = dataclasses.replace(exp, budget=budget)
    if args.arms:
        exp = dataclasses.replace(exp, arms=tuple(args.arms.split(",")))
    results = run(exp, Path(args.work_dir), resume=not args.no_resume)
    command = "python -m benchmarks.ablation " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    if args.docs:
        text = write_docs(results, exp.to_dict(), Path(args.docs), args.name, command)
    else:
        text = report_text(results)
    print(
        f"\nseeds {list(exp.seeds)}; {exp.budget.steps} steps x "
        f"{exp.budget.micro_batch_size} chains per arm; mean ± sd over seeds\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
