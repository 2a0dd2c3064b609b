"""Per-stage statistics of a tokenized chain dataset, from its ``step_ids`` column.

``axolotl preprocess`` prints them (the strategy logs after tokenizing) and training
logs them once at the start. Computed from step ids alone, so they describe exactly what
the experts will see.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP
from axolotl_mote.templates import PromptTemplate


def stage_stats(
    step_rows: Iterable[Sequence[int]], template: PromptTemplate
) -> dict[str, Any]:
    """Token counts per stage and how often each stage plan occurs."""
    names = [s.name for s in template.trained_stages]
    tokens: Counter[int] = Counter()
    plans: Counter[str] = Counter()
    chains = 0
    for row in step_rows:
        # plain ints: a tensor row's elements would each count as a distinct key
        row = row.tolist() if hasattr(row, "tolist") else list(row)
        chains += 1
        tokens.update(row)
        seen: list[int] = []
        for step in row:
            if step >= 0 and (not seen or seen[-1] != step):
                seen.append(step)
        plans[" > ".join(names[s] for s in seen) or "(none)"] += 1
    skipped = {
        name: sum(n for plan, n in plans.items() if name not in plan.split(" > "))
        for name in names
    }
    return {
        "chains": chains,
        "tokens": {
            "prompt": tokens[PROMPT_STEP],
            **{name: tokens[i] for i, name in enumerate(names)},
            "padding": tokens[PAD_STEP],
        },
        "plans": dict(plans.most_common()),
        "chains_skipping": skipped,
    }


def format_stats(stats: dict[str, Any], title: str = "MoTE stage statistics") -> str:
    """A small fixed-width table for logs."""
    total = sum(v for k, v in stats["tokens"].items() if k != "padding") or 1
    lines = [f"{title}: {stats['chains']} chains"]
    for name, count in stats["tokens"].items():
        if name == "padding" and not count:
            continue
        lines.append(f"  tokens {name:<20} {count:>10}  ({100 * count / total:5.1f}%)")
    for name, count in stats["chains_skipping"].items():
        lines.append(f"  chains skipping {name:<12} {count:>10}")
    for plan, count in stats["plans"].items():
        lines.append(f"  plan {plan:<40} {count:>8}")
    return "\n".join(lines)
