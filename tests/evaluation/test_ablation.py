"""The ablation (docs/ablation.md): the synthetic task, and a quick run of all six arms
through the real ``axolotl train``.

The quick run checks that every arm trains, is scored and reported, and that the arms
differ only where they should (same token ids and labels, equal parameter counts where
claimed). It asserts no winner: the experiment measures, it does not assume.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest

from benchmarks.ablation.task import (
    MARKERS,
    PLANS,
    STAGES,
    TaskSpec,
    make_split,
    stage_maps,
)


def test_task_is_deterministic_and_split_is_disjoint():
    spec = TaskSpec(n_train=200, n_eval=50)
    train, held_out = make_split(spec, seed=3)
    assert (train, held_out) == make_split(spec, seed=3)
    assert make_split(spec, seed=4)[0] != train
    assert len(train) == 200 and len(held_out) == 50
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert all("answer" in r for r in train + held_out)


def test_stages_transform_the_same_question_differently():
    spec = TaskSpec()
    maps = stage_maps(spec)
    assert sorted(maps) == sorted(STAGES)
    assert len({tuple(m) for m in maps.values()}) == len(STAGES)  # pairwise different
    train, _ = make_split(spec, seed=0)
    rec = next(r for r in train if all(s in r for s in STAGES))
    q = [int(t[1:]) for t in rec["prompt"].split()]
    for stage in STAGES:
        assert rec[stage].split() == [f"s{maps[stage][s]}" for s in q]


def test_some_chains_skip_stages():
    train, _ = make_split(TaskSpec(), seed=0)
    plans = {tuple(s for s in STAGES if s in r) for r in train}
    assert plans == {p for p, _ in PLANS}


def test_task_tokenizer_gives_markers_one_token(aligncot):
    from axolotl_mote.markers import marker_token_ids
    from benchmarks.ablation.task import build_tokenizer

    tok = build_tokenizer(TaskSpec())
    assert len(marker_token_ids(aligncot, tok)) == len(aligncot.markers)
    assert tok("s3 s0", add_special_tokens=False)["input_ids"] == [
        tok.convert_tokens_to_ids("s3"),
        tok.convert_tokens_to_ids("s0"),
    ]


def _prepared_rows(run_dir: Path) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    from datasets import load_from_disk

    (path,) = glob.glob(str(run_dir / "prepared" / "*") + "/")
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in load_from_disk(path)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """All six arms in quick mode, once for this module: (work dir, results)."""
    from axolotl.integrations.base import PluginManager

    from benchmarks.ablation.runner import QUICK, run

    work = tmp_path_factory.mktemp("ablation") / "work"
    try:
        results = run(QUICK, work)
    finally:
        PluginManager.get_instance().plugins.clear()
    return work, results


@pytest.mark.slow
def test_quick_ablation_runs_every_arm(quick_run, tmp_path):
    from benchmarks.ablation.arms import ARMS, LABELS
    from benchmarks.ablation.report import write_docs
    from benchmarks.ablation.runner import QUICK

    work, results = quick_run
    assert sorted(r["arm"] for r in results) == sorted(ARMS)
    for r in results:
        for key in ("loss_analysis", "loss_guidance", "loss_answer"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["arm"], key)
        for key in ("em_analysis", "em_guidance", "em_answer", "em_answer_skipped"):
            assert 0.0 <= r[key] <= 1.0, (r["arm"], key)
    by_arm = {r["arm"]: r for r in results}
    # equal parameters: rank 4r == 3 step experts + shared expert of rank r
    params = {arm: r["adapter_parameters"] for arm, r in by_arm.items()}
    assert params["lora_4r"] == params["mote"] == params["mote_noskip"]
    assert params["lora_r"] * 3 == params["mote_noshared"] == params["mote_noboth"]
    # the plain-LoRA arms (chat_template, no plugin) get exactly the plugin's tokens
    seed_dir = work / "seed0"
    assert _prepared_rows(seed_dir / "lora_r") == _prepared_rows(seed_dir / "mote")

    text = write_docs(results, QUICK.to_dict(), tmp_path / "docs", "ablation", "cmd")
    for arm in ARMS:
        assert LABELS[arm] in text
    saved = json.loads((tmp_path / "docs" / "ablation_results.json").read_text())
    assert saved["table"] == text and len(saved["runs"]) == len(ARMS)
    assert (tmp_path / "docs" / "ablation_plot.png").stat().st_size > 0


@pytest.mark.slow
def test_skipped_stage_scoring_equals_generate_chains(quick_run):
    """The scorer's answer-only decoding is what the generation API produces."""
    import torch

    from axolotl_mote.generation import generate_chains, install_router
    from benchmarks.ablation.runner import QUICK
    from benchmarks.ablation.scoring import encode, greedy, load_arm

    work, _ = quick_run
    _, held_out = make_split(QUICK.spec, 0)
    model, tok = load_arm(work / "model", work / "seed0" / "mote" / "out", True)
    items = encode(held_out, tok)
    n_new = QUICK.spec.length + 1
    contexts = [it["prompt"] + [it["stages"]["answer"][0]] for it in items]
    ours = greedy(model, contexts, n_new, tok.pad_token_id)
    outs = generate_chains(
        model,
        tok,
        [r["prompt"] for r in held_out],
        plan=["answer"],
        max_new_tokens=3 * n_new,
        answer_reserve=0,
        stop_after_answer=False,
        batch_size=len(held_out),
        output_logits=True,
    )
    # generate_chains constrains tokens inside a stage (no other marker, no end of
    # sequence) and closes it before its budget runs out (a larger budget here); the
    # scorer does neither. Compare up to the first token the plan forbids.
    end = items[0]["stages"]["answer"][2]
    forbidden = set(tok.convert_tokens_to_ids(list(MARKERS))) | {tok.eos_token_id}
    forbidden.discard(end)
    compared = 0
    for mine, out in zip(ours, outs):
        theirs = out.token_ids[1:]  # [0] is the pre-filled <|response|>
        for k, token in enumerate(mine):
            if token in forbidden:
                break
            assert theirs[k] == token
            compared += 1
            if token == end:
                break
    assert compared > 0
    # and the very first step's logits, before any constraint, are the same numbers
    install_router(model, tok)
    first = model.get_base_model()(input_ids=torch.tensor(contexts[:1])).logits[0, -1]
    assert torch.allclose(outs[0].logits[0], first, atol=1e-5)
