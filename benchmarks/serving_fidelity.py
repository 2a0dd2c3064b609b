"""How close is a served MoTE model (one adapter per stage) to the exact one?

A server with per-request LoRA adapters runs every token of a request through the one
adapter it names, so in a stage-switched chain the prompt and the earlier stages are
recomputed with the current stage's expert (``axolotl_mote/serving/client.py``). This
script runs, greedily, on the same prompts:

* **exact**: ``generate_chains`` (each token computed by its own stage's expert);
* **served**: the stage-switching client against the server's computation in-process
  (``serving.client.LocalBackend``: bit-for-bit what ``axolotl-mote serve`` and the
  exported adapters compute, without HTTP).

It reports the share of prompts with the identical answer, the identical stage plan,
and the mean per-token KL(exact ‖ served) over the exact path's generated tokens (each
position scored with the adapter the served path would have used for it). Results are
cached per prompt in ``--work-dir`` so a stopped run continues. The last line is one
JSON object.

    python benchmarks/serving_fidelity.py --adapter outputs/quickstart/adapter \\
        --prompts data/eval/harmful.jsonl --prompts data/eval/benign_scary.jsonl \\
        --prompts data/eval/jailbreak.jsonl --prompts data/eval/heldout.jsonl --limit 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kl_on_exact_path(model, tokenizer, chain, manifest, formatter) -> list[float]:
    """Per generated token: KL(exact next-token distribution ‖ served one)."""
    import torch

    from axolotl_mote.constants import EXPECTED_STEP
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    state = get_routing_state(model)
    prompt = formatter.prompt_ids(chain.messages)
    seq = torch.tensor([prompt + chain.token_ids])
    n_prompt = len(prompt)
    # the exact routing: the prompt as the generation routed it (its drawn expert)
    prompt_step = _prompt_step(model, tokenizer, prompt, formatter)
    exact_steps = torch.tensor([[prompt_step] * n_prompt + chain.step_ids])
    starts = {s["start_id"]: i for i, s in enumerate(manifest["stages"])}
    ends = {s["end_id"] for s in manifest["stages"]}
    # which adapter the served path predicted each generated token with
    served_adapter: list[int] = []
    current = EXPECTED_STEP  # before any stage: the prompt adapter
    inside = False
    for token in chain.token_ids:
        if token in starts and not inside:
            served_adapter.append(current)  # chosen by the previous stage's adapter
            current, inside = starts[token], True
        else:
            served_adapter.append(current)
            if token in ends:
                inside = False
    with torch.no_grad():
        with route(state, exact_steps):
            exact = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
        served = {}
        for step in set(served_adapter):
            with route(state, torch.full_like(seq, step)):
                served[step] = torch.log_softmax(
                    model(input_ids=seq).logits[0].float(), -1
                )
    out = []
    for j, step in enumerate(served_adapter):
        pos = n_prompt + j - 1  # logits at pos predict token pos + 1
        p, q = exact[pos], served[step][pos]
        out.append(float((p.exp() * (p - q)).sum()))
    return out


def _prompt_step(model, tokenizer, prompt_ids, formatter) -> int:
    from axolotl_mote.generation.router import StageRouter, start_marker_steps
    from axolotl_mote.tuner.model import get_routing_state

    state = get_routing_state(model)
    router = StageRouter(
        start_marker_steps(formatter.template, formatter.marker_ids),
        state.prompt_routing,
        state.num_experts,
        seed=state.seed,
    )
    return router.prompt_step(prompt_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--prompts", action="append", required=True)
    parser.add_argument("--limit", type=int, default=10, help="prompts per set")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-stage-tokens", type=int, default=48)
    parser.add_argument(
        "--work-dir", type=Path, default=Path("outputs/serving_fidelity")
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.evaluation import load_prompt_set
    from axolotl_mote.evaluation.scorers import StringMatchScorer, load_rubric
    from axolotl_mote.generation import generate_chains
    from axolotl_mote.loading import load_mote_model
    from axolotl_mote.serving.bundle import stage_manifest
    from axolotl_mote.serving.client import LocalBackend, StageClient
    from axolotl_mote.tuner.config import MoteConfig

    torch.set_num_threads(args.threads)
    base = (
        args.base_model
        or json.loads((args.adapter / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
    )
    model, tokenizer = load_mote_model(
        base, args.adapter, dtype="float32", device="cpu"
    )
    template = MoteConfig.load(args.adapter).prompt_template()
    manifest = stage_manifest(template, tokenizer)
    client = StageClient(LocalBackend(model), manifest, tokenizer)
    formatter = ChainFormatter(template, tokenizer)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cache = args.work_dir / "rows.jsonl"
    done = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    items = []
    for path in args.prompts:
        pset = load_prompt_set(path, limit=args.limit)
        items += [(f"{pset.name}/{it.id}", it) for it in pset.items]
    settings = f"{args.max_new_tokens}/{args.max_stage_tokens}"
    with open(cache, "a", encoding="utf-8") as sink:
        for key, item in items:
            if key in done and done[key]["settings"] == settings:
                continue
            exact = generate_chains(
                model, tokenizer, [item.messages], max_new_tokens=args.max_new_tokens,
                max_stage_tokens=args.max_stage_tokens,
            )[0]  # fmt: skip
            served = client.generate(
                item.messages, max_new_tokens=args.max_new_tokens,
                max_stage_tokens=args.max_stage_tokens,
            )  # fmt: skip
            kl = kl_on_exact_path(model, tokenizer, exact, manifest, formatter)
            row = {
                "key": key,
                "settings": settings,
                "exact_plan": exact.plan,
                "served_plan": served.plan,
                "exact_answer": exact.answer,
                "served_answer": served.answer,
                "mean_kl": statistics.fmean(kl) if kl else 0.0,
                "tokens": len(kl),
            }
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            done[key] = row
            print(f"{key}: plan same {row['exact_plan'] == row['served_plan']}, "
                  f"answer same {row['exact_answer'] == row['served_answer']}, "
                  f"KL {row['mean_kl']:.4f}", flush=True)  # fmt: skip
    rows = [done[k] for k, _ in items]
    scorer = StringMatchScorer.from_rubric(load_rubric())
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["key"].split("/")[0], []).append(row)
    print("| set | prompts | identical plans | identical answers | same refusal "
          "verdict | shared answer prefix (words) | mean token KL |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, group in [*groups.items(), ("all", rows)]:
        s = summarise(group, scorer)
        cells = [
            str(s["prompts"]), f"{s['identical_plans']:.0%}",
            f"{s['identical_answers']:.0%}", f"{s['same_refusal']:.0%}",
            f"{s['shared_prefix_words']:.1f}", f"{s['mean_token_kl']:.4f}",
        ]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    result = summarise(rows, scorer) | {
        "adapter": str(args.adapter),
        "settings": settings,
    }
    print(json.dumps(result))


def summarise(rows: list[dict], scorer) -> dict:
    """Shares over prompts; the KL is averaged over tokens."""
    n, tokens = len(rows), sum(r["tokens"] for r in rows) or 1

    def share(values) -> float:
        return round(sum(values) / n, 4)

    def prefix(a: str, b: str) -> int:
        words = 0
        for x, y in zip(a.split(), b.split()):
            if x != y:
                break
            words += 1
        return words

    return {
        "prompts": n,
        "identical_answers": share(
            r["exact_answer"] == r["served_answer"] for r in rows
        ),
        "identical_plans": share(r["exact_plan"] == r["served_plan"] for r in rows),
        "same_refusal": share(
            (scorer.refusal(r["exact_answer"]) is None)
            == (scorer.refusal(r["served_answer"]) is None)
            for r in rows
        ),
        "shared_prefix_words": round(
            statistics.fmean(
                prefix(r["exact_answer"], r["served_answer"]) for r in rows
            ),
            1,
        ),
        "mean_token_kl": round(
            sum(r["mean_kl"] * r["tokens"] for r in rows) / tokens, 4
        ),
    }


if __name__ == "__main__":
    main()
