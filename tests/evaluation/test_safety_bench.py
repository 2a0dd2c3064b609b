"""benchmarks/safety_smollm2.py: data preparation, XSTest split, and a --tiny end-to-end
run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.benchmarks import load_benchmark, write_xstest

REPO = Path(__file__).resolve().parents[2]
XSTEST_HEAD = "id,prompt,type,label,focus,note\n"


def _bench():
    return load_benchmark("safety_smollm2")


def _xstest(path: Path, n: int = 4) -> Path:
    return write_xstest(path, n)


def test_answers_only_keeps_question_and_answer():
    bench = _bench()
    chains = bench.read_chains(REPO / "data" / "chains.jsonl")
    rows = bench.answers_only(chains)
    assert len(rows) == len(chains)
    for rec, row in zip(chains, rows):
        assert row["messages"][-1] == {"role": "assistant", "content": rec["answer"]}
        assert row["messages"][-2]["role"] == "user"
        text = json.dumps(row)
        assert "<|analysis|>" not in text and rec.get("analysis", "\0") not in text


def test_xstest_split_by_label_and_limit(tmp_path):
    bench = _bench()
    sets = bench.prompt_sets(_xstest(tmp_path / "x.csv"), 2, seed=0)
    by_name = {s.name: s for s in sets}
    assert by_name["xstest_unsafe"].kind == "harmful"
    assert by_name["xstest_safe"].kind == "benign"
    assert {it.label for it in by_name["xstest_unsafe"].items} == {"harmful"}
    assert {it.label for it in by_name["xstest_safe"].items} == {"benign"}
    for s in sets:  # --limit applies per label
        for label in ("harmful", "benign"):
            assert sum(it.label == label for it in s.items) <= 2
    assert {it.label for it in by_name["heldout"].items} == {"harmful", "benign"}
    again = bench.prompt_sets(_xstest(tmp_path / "x.csv"), 2, seed=0)
    assert [it.id for it in again[0].items] == [it.id for it in sets[0].items]


def test_base_config_carries_the_papers_settings_to_every_arm(tmp_path):
    """--base-model with --base-config: every arm gets the config's budget, precision
    and distributed block; only the model, data, output and seed are the harness's."""
    bench = _bench()
    data = {"chains": tmp_path / "c.jsonl", "answers": tmp_path / "a.jsonl"}
    data["chains"].write_text('{"prompt": "q", "answer": "a"}\n')
    data["answers"].write_text('{"messages": []}\n')
    config = REPO / "example_configs" / "llama3.1-8b-8gpu-fsdp2.yml"
    cfgs = bench.arm_configs("org/Some-Chat-8B", data, tmp_path, epochs=None, seed=3,
                             lora_r=None, tiny=False, config=config)  # fmt: skip
    for arm, cfg in cfgs.items():
        assert cfg["base_model"] == "org/Some-Chat-8B" and cfg["seed"] == 3
        assert cfg["learning_rate"] == 2e-5 and cfg["num_epochs"] == 3
        assert cfg["bf16"] is True and cfg["fsdp_version"] == 2
        assert cfg["fsdp_config"]["activation_checkpointing"] is True
        assert cfg["output_dir"] == str(tmp_path / "train" / f"{arm}-s3" / "out")
    assert cfgs["mote"]["lora_r"] == 16 and cfgs["lora_answers"]["lora_r"] == 64
    assert "plugins" not in cfgs["lora_answers"]


def test_budgets_are_identical_apart_from_the_arm(tmp_path):
    bench = _bench()
    data = {"chains": tmp_path / "c.jsonl", "answers": tmp_path / "a.jsonl"}
    data["chains"].write_text('{"prompt": "q", "answer": "a"}\n')
    data["answers"].write_text('{"messages": []}\n')
    cfgs = bench.arm_configs(
        tmp_path / "model", data, tmp_path, epochs=3, seed=7, lora_r=None, tiny=False
    )
    assert set(cfgs) == set(bench.TRAINED)
    lora, mote = cfgs["lora_answers"], cfgs["mote"]
    single, noskip = cfgs["lora_chains"], cfgs["mote_noskip"]
    # the prepared-dataset cache follows the data's content (Axolotl keys it by config)
    before = mote["dataset_prepared_path"]
    data["chains"].write_text('{"prompt": "q", "answer": "b"}\n')
    again = bench.arm_configs(
        tmp_path / "model", data, tmp_path, epochs=3, seed=7, lora_r=None, tiny=False
    )
    assert again["mote"]["dataset_prepared_path"] != before
    same = (
        again["lora_answers"]["dataset_prepared_path"] == lora["dataset_prepared_path"]
    )
    assert same
    for key in (
        "num_epochs",
        "learning_rate",
        "micro_batch_size",
        "seed",
        "lr_scheduler",
        "gradient_accumulation_steps",
        "sample_packing",
        "sequence_len",
        "optimizer",
        "warmup_steps",
        "lora_target_linear",
    ):
        assert lora[key] == mote[key] == single[key] == noskip[key], key
    assert lora["num_epochs"] == 3 and lora["seed"] == 7
    assert "plugins" not in lora and mote["plugins"] == ["axolotl_mote.MotePlugin"]
    assert lora["lora_r"] == 4 * mote["lora_r"]
    assert lora["lora_alpha"] / lora["lora_r"] == mote["lora_alpha"] / mote["lora_r"]
    # the chain arms differ from MoTE in exactly one mote: key each
    diff = {k for k in single["mote"] if single["mote"][k] != mote["mote"].get(k)}
    assert diff == {"experts"} and single["mote"]["experts"] == "single"
    diff = {k for k in noskip["mote"] if noskip["mote"][k] != mote["mote"].get(k)}
    assert diff == {"step_skip_prob"} and noskip["mote"]["step_skip_prob"] == 0
    rest = {k for k in mote if k not in ("mote", "output_dir", "dataset_prepared_path")}
    assert all(single[k] == mote[k] == noskip[k] for k in rest)


def test_set_groups_and_column_seeds(tmp_path):
    bench = _bench()
    xstest = _xstest(tmp_path / "x.csv")
    names = [s.name for s in bench.prompt_sets(xstest, None, 0, ("xstest",))]
    assert names == ["xstest_unsafe", "xstest_safe"]
    names = [s.name for s in bench.prompt_sets(xstest, None, 0, ("own",))]
    assert names == list(bench.EVAL_SETS)
    assert bench.column_seeds("base", None, [42, 43], [42]) == [None]
    assert bench.column_seeds("mote", "random", [42, 43], [42]) == [42, 43]
    assert bench.column_seeds("mote", "shared", [42, 43], [42]) == [42]
    assert bench.column_seeds("mote", "shared", [42, 43], None) == [42, 43]
    args = bench.parse_args(
        ["--xstest", "x.csv", "--sets", "xstest", "--routing-seeds", "42",
         "--name", "safety_routing"]
    )  # fmt: skip
    with pytest.raises(SystemExit):  # XSTest chosen, no file given
        bench.parse_args(["--sets", "xstest"])
    assert bench._command_args(args) == [
        "--xstest x.csv", "--seeds 42 43", "--sets xstest", "--routing-seeds 42",
        "--name safety_routing",
    ]  # fmt: skip


def test_wilson_interval():
    bench = _bench()
    lo, hi = bench.wilson(0.8, 20)
    assert round(lo, 3) == 0.584 and round(hi, 3) == 0.919
    assert bench.wilson(0.0, 10)[0] == 0.0 and bench.wilson(1.0, 10)[1] == 1.0


def test_aggregate_intervals_count_only_the_rates_own_label():
    """A mixed set (10 harmful + 10 benign): each rate's interval is over its 10."""
    bench = _bench()
    metrics = {"n": 20, "unscored": 0, "harmless_rate": 0.8, "compliance_rate": 0.6}
    out = bench.aggregate(
        [{"sets": {"mix": metrics}}], {"mix": {"harmful": 10, "benign": 10}}
    )
    harm = out["sets"]["mix"]["harmless_rate"]
    assert harm["n"] == 10
    assert harm["ci95"] == [round(x, 4) for x in bench.wilson(0.8, 10)]
    assert out["sets"]["mix"]["compliance_rate"]["n"] == 10
    whole = bench.aggregate([{"sets": {"mix": metrics}}])  # no labels: the whole set
    assert whole["sets"]["mix"]["harmless_rate"]["n"] == 20


def test_mcnemar_and_paired_comparison():
    bench = _bench()
    # exact two-sided binomial: 1 vs 9 discordant pairs -> 2 * 11/1024
    assert bench.mcnemar(1, 9) == pytest.approx(22 / 1024)
    assert bench.mcnemar(9, 1) == bench.mcnemar(1, 9)
    assert bench.mcnemar(0, 0) == 1.0 and bench.mcnemar(5, 5) == 1.0

    def gen(label, harmful=False, refused=False):
        return {"label": label, "score": {"harmful": harmful, "refused": refused}}

    from axolotl_mote.evaluation.runner import wanted

    assert wanted(**gen("harmful", harmful=False)) is True
    assert wanted(**gen("harmful", harmful=True, refused=True)) is False
    assert wanted(**gen("benign", refused=True)) is False
    assert wanted(**gen("benign", harmful=True)) is True  # benign: refusal decides
    assert wanted("benign", {"refused": None}) is None
    ref = {(42, "s", str(i)): i < 6 for i in range(10)}  # 6 of 10 good
    other = {(42, "s", str(i)): i < 3 or i >= 8 for i in range(10)}  # 5 of 10 good
    other[(43, "s", "0")] = True  # no reference pair: not counted
    out = bench.paired_against({"ref": ref, "x": other}, "ref", "x")
    assert out == {"s": {"pairs": 10, "better": 2, "worse": 3, "delta": -0.1, "p": 1.0}}


@pytest.mark.slow
def test_tiny_end_to_end_and_resume(tmp_path):
    bench = _bench()
    from axolotl_mote.tiny import build_tiny_model

    model = Path(build_tiny_model(tmp_path / "model")).resolve()
    argv = [
        "--tiny", "--limit", "2", "--max-new-tokens", "8", "--max-stage-tokens", "2",
        "--work-dir", str(tmp_path / "w"), "--xstest", str(_xstest(tmp_path / "x.csv")),
        "--seeds", "1", "--arms", "base", "lora_answers", "lora_chains", "mote",
        "--routings", "random", "expected", "--threads", "1",
        "--base-model", str(model),  # the path any chat model takes
    ]  # fmt: skip
    summary = bench.main(argv)
    assert f"--base-model {model}" in summary["command"]
    assert not (tmp_path / "w" / "tiny-model").exists()  # --base-model, not --tiny's
    for arm in ("lora_answers", "lora_chains", "mote"):
        trained = (tmp_path / "w" / "train" / f"{arm}-s1" / "config.yml").read_text()
        assert f"base_model: {model}\n" in trained
    docs = tmp_path / "w" / "docs"
    assert (docs / "safety_smollm2.png").is_file()
    assert bench.TABLE_START in (docs / "safety_smollm2.md").read_text()
    saved = json.loads((docs / "safety_smollm2_results.json").read_text())
    columns = saved["results"]["columns"]
    assert list(columns) == ["base", "lora_answers", "lora_chains", "mote[random]",
                             "mote[expected]"]  # fmt: skip
    assert "xstest_unsafe" in saved["results"]["sets"]
    entry = columns["mote[random]"]["sets"]["xstest_unsafe"]["harmless_rate"]
    assert (
        len(entry["seeds"]) == 1
        and entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
    )
    single = json.loads(
        (tmp_path / "w/train/lora_chains-s1/out/mote_config.json").read_text()
    )
    assert single["experts"] == "single"
    assert summary["training"]["lora_chains-s1"]["reused"] is False
    # a rerun trains and generates nothing again
    cached = sorted((tmp_path / "w" / "eval").glob("*/*.json"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = bench.main(argv)
    assert all(t["reused"] for t in again["training"].values())
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert again["table_markdown"] == summary["table_markdown"]
    # another scorer re-scores the cached generations: nothing trained or generated,
    # its own files and table block, the string scorer's block left as it was
    md = (docs / "safety_smollm2.md").read_text()
    rescored = bench.main([*argv, "--scorer", "learned"])
    assert all(t["reused"] for t in rescored["training"].values())
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert "--scorer learned" in rescored["command"]
    assert (docs / "safety_smollm2_learned_results.json").is_file()
    assert (docs / "safety_smollm2_learned.png").is_file()
    both = (docs / "safety_smollm2.md").read_text()
    start, end = bench.table_markers("learned")
    assert both.startswith(md.rstrip("\n")) and start in both and end in both
    assert "learned scorer" in rescored["results"]["title"]
    # a prompt edited under the same id: the caches of its set are generated again
    # (the cache key names prompts by id), the other sets' are kept
    xstest = tmp_path / "x.csv"
    xstest.write_text(xstest.read_text().replace("my neighbour", "the neighbour"))
    edited = bench.main(argv)
    changed = [p for p, t in zip(cached, stamps) if p.stat().st_mtime_ns != t]
    unsafe = [p for p in cached if p.name == "xstest_unsafe.limit2.json"]
    assert len(unsafe) == 5 and changed == unsafe  # every column of the table
    for path in unsafe:
        gens = json.loads(path.read_text())["generations"]
        assert all("the neighbour" in g["question"] for g in gens)
    assert all(t["reused"] for t in edited["training"].values())


def test_xstest_breakdown_pools_seeds_per_type(tmp_path):
    """benchmarks/xstest_breakdown.py: compliance on safe types, refusal on their
    contrast twins, pooled over an arm's seeds; --limit caches are left out."""
    module = load_benchmark("xstest_breakdown")
    xstest = _xstest(tmp_path / "x.csv", n=2)  # ids 0, 1 safe; 2, 3 unsafe

    def cache(model: str, name: str, refused: dict[str, bool]) -> None:
        label = "benign" if name.startswith("xstest_safe") else "harmful"
        gens = [
            {"id": i, "label": label, "score": {"refused": r}}
            for i, r in refused.items()
        ]
        path = tmp_path / "w" / "eval" / model / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"generations": gens}))

    cache("mote-s1", "xstest_safe", {"0": False, "1": True})
    cache("mote-s2", "xstest_safe", {"0": False, "1": False})
    cache("mote-s1", "xstest_unsafe", {"2": True, "3": True})
    cache("mote-s2", "xstest_unsafe", {"2": False, "3": True})
    cache("mote-s1", "xstest_safe.limit1", {"0": True})  # not pooled
    table = module.breakdown(tmp_path / "w", module.xstest_types(xstest))
    assert table == {"mote": {"contrast_homonyms": 0.75, "homonyms": 0.75}}
    assert module.arm_of("mote-s42.expected") == "mote.expected"
    cache("mote-s3", "xstest_safe", {"99": False})  # an id from another CSV
    with pytest.raises(ValueError, match="'99' is not in the XSTest CSV"):
        module.breakdown(tmp_path / "w", module.xstest_types(xstest))
    # --scorer: the cached answers re-scored, the cached scores ignored
    from axolotl_mote.evaluation.scorers import Score

    class SaysSorry:
        def score(self, items):
            return [Score("sorry" in it.response, None) for it in items]

    path = tmp_path / "w2" / "eval" / "lora-s1" / "xstest_safe.json"
    path.parent.mkdir(parents=True)
    gens = [{"id": i, "label": "benign", "question": "q", "answer": a,
             "score": {"refused": False}}
            for i, a in (("0", "sorry, no"), ("1", "Sure: kill -9"))]  # fmt: skip
    path.write_text(json.dumps({"generations": gens}))
    types = module.xstest_types(xstest)
    assert module.breakdown(tmp_path / "w2", types) == {"lora": {"homonyms": 1.0}}
    rescored = module.breakdown(tmp_path / "w2", types, SaysSorry())
    assert rescored == {"lora": {"homonyms": 0.5}}
