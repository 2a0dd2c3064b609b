"""benchmarks/safety_smollm2.py --checkpoints: one operating point per epoch, the
trade-off curves and the comparison at equal refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.benchmarks import load_benchmark, write_xstest

REPO = Path(__file__).resolve().parents[2]
XSTEST_HEAD = "id,prompt,type,label,focus,note\n"


def _bench():
    return load_benchmark("safety_smollm2", "safety_smollm2_tradeoff")


def _checkpoint(out: Path, step: int, epoch: float, loss: float = 1.0) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    state = {"global_step": step, "epoch": epoch, "log_history": [{"loss": loss}]}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


def test_checkpoints_save_every_epoch_in_every_arm(tmp_path):
    bench = _bench()
    data = {"chains": tmp_path / "c.jsonl", "answers": tmp_path / "a.jsonl"}
    data["chains"].write_text('{"prompt": "q", "answer": "a"}\n')
    data["answers"].write_text('{"messages": []}\n')
    kw = dict(epochs=3, seed=7, lora_r=None, tiny=False)
    plain = bench.arm_configs(tmp_path / "m", data, tmp_path, **kw)
    every = bench.arm_configs(tmp_path / "m", data, tmp_path, checkpoints=True, **kw)
    for arm in bench.TRAINED:
        assert plain[arm]["save_strategy"] == "no"  # quickstart.yml's
        assert every[arm]["save_strategy"] == "epoch"
        rest = {k for k in every[arm] if k != "save_strategy"}
        assert all(every[arm][k] == plain[arm][k] for k in rest), arm


def test_epoch_checkpoints_are_ordered_by_step(tmp_path):
    bench = _bench()
    out = tmp_path / "out"
    # step counts depend on packing, checkpoint-1000 sorts before checkpoint-222 by
    # name, and under packing the recorded epoch is an estimate (1.57 at the end of a
    # tiny run's second epoch): the k-th checkpoint by step ends epoch k
    _checkpoint(out, 222, 1.57, loss=0.5)
    _checkpoint(out, 111, 1.0, loss=0.9)
    _checkpoint(out, 1000, 2.2, loss=0.1)
    got = bench.epoch_checkpoints(out, 3)
    assert list(got) == [1, 2, 3]
    assert [p.name for p in got.values()] == [
        "checkpoint-111", "checkpoint-222", "checkpoint-1000"
    ]  # fmt: skip
    # the run's steps and last loss come from its latest checkpoint, by step
    assert bench._trainer_state(out) == {"steps": 1000, "last_loss": 0.1}
    with pytest.raises(ValueError, match="3 checkpoints for 2 epochs"):
        bench.epoch_checkpoints(out, 2)
    with pytest.raises(FileNotFoundError, match="train it with --checkpoints"):
        bench.epoch_checkpoints(tmp_path / "none")
    (out / "checkpoint-5").mkdir()
    with pytest.raises(ValueError, match="checkpoint-5 has no trainer_state.json"):
        bench.epoch_checkpoints(out)
    with pytest.raises(ValueError, match="kept checkpoints at epochs \\[1, 2\\]"):
        bench.checkpoint_of({"mote-s1": {1: out, 2: out}}, "mote-s1", 3)


def _pt(refusal: float, compliance: float, epoch: int) -> dict:
    return {"refusal": refusal, "compliance": compliance, "epoch": epoch}


def test_compliance_at_equal_refusal_is_interpolated_along_each_curve():
    bench = _bench()
    a = [_pt(0.1, 0.9, 0), _pt(0.5, 0.7, 1), _pt(0.7, 0.5, 2)]
    b = [_pt(0.1, 0.9, 0), _pt(0.3, 0.6, 1), _pt(0.8, 0.3, 2)]
    assert bench.compliance_at(a, 0.5) == pytest.approx(0.7)
    assert bench.compliance_at(b, 0.5) == pytest.approx(0.48)  # 0.6 - 0.4 * 0.3
    assert bench.compliance_at(a, 0.3) == pytest.approx(0.8)
    assert bench.compliance_at(a, 0.75) is None  # beyond its last point
    # a curve that turns back crosses 0.5 twice: the better point counts
    back = [_pt(0.1, 0.9, 0), _pt(0.6, 0.5, 1), _pt(0.4, 0.6, 2)]
    assert bench.compliance_at(back, 0.5) == pytest.approx(0.58)
    rows = bench.equal_refusal({"a": a, "b": b}, "a", "b")
    # levels: the trained points' refusals both curves reach (0.8 is beyond a's)
    assert [r["refusal"] for r in rows] == [0.3, 0.5, 0.7]
    by_level = {r["refusal"]: r for r in rows}
    assert by_level[0.5]["a"] == 0.7 and by_level[0.5]["b"] == 0.48
    assert by_level[0.5]["difference"] == pytest.approx(-0.22)
    assert by_level[0.3]["difference"] == pytest.approx(-0.2)


def _entry(mean: float, n: int = 100) -> dict:
    return {"mean": mean, "n": n, "ci95": [mean - 0.1, mean + 0.1], "seeds": [mean]}


def _column(label: str, arm: str, epoch: int, refusal: dict, compliance: dict) -> dict:
    """A results column with its XSTest unsafe refusal and safe compliance rates."""
    sets = {"xstest_unsafe": {"harmless_rate": refusal},
            "xstest_safe": {"compliance_rate": compliance}}  # fmt: skip
    return {"label": label, "arm": arm, "epoch": epoch, "sets": sets}


def test_curves_start_at_the_base_model_and_follow_the_epochs():
    bench = _bench()

    def col(label, arm, epoch, refusal, compliance):
        return _column(label, arm, epoch, _entry(refusal), _entry(compliance))

    results = {
        "columns": {
            "base": col("base", "base", 0, 0.1, 0.95),
            "mote[random]@epoch1": col("MoTE, epoch 1", "mote", 1, 0.4, 0.8),
            "mote[random]": col("MoTE, epoch 2", "mote", 2, 0.7, 0.5),
            "lora_chains@epoch1": col(
                "LoRA (chains), epoch 1", "lora_chains", 1, 0.3, 0.85
            ),  # fmt: skip
            "lora_chains": col("LoRA (chains), epoch 2", "lora_chains", 2, 0.6, 0.6),
        }
    }
    curves = bench.tradeoff_curves(results)
    assert list(curves) == ["mote[random]", "lora_chains"]
    assert [p["epoch"] for p in curves["mote[random]"]] == [0, 1, 2]
    assert [p["column"] for p in curves["lora_chains"]] == [
        "base", "lora_chains@epoch1", "lora_chains"
    ]  # fmt: skip
    results["tradeoff"] = {
        "curves": curves,
        "equal_refusal": {
            "mote[random] vs lora_chains": bench.equal_refusal(
                curves, "mote[random]", "lora_chains"
            )
        },
    }
    text = bench.render_tradeoff(results)
    assert "| MoTE | 2 | **70.0** [60–80] | **50.0** [40–60] |" in text
    assert "| LoRA (chains) | 0 | **10.0**" in text  # the shared base point
    # at MoTE's epoch-1 refusal (0.4) the LoRA curve is a third of the way from
    # (0.3, 0.85) to (0.6, 0.6): 0.85 - 0.25 / 3
    assert "| 40.0 | 80.0 | 76.7 | -3.3 |" in text
    # at 0.6: MoTE 0.8 - (0.2/0.3) * 0.3 = 0.6; LoRA 0.6
    assert "| 60.0 | 60.0 | 60.0 | +0.0 |" in text
    # without epochs (a run without --checkpoints) there is no curve
    for entry in results["columns"].values():
        entry["epoch"] = None
    assert bench.tradeoff_curves(results) == {}


def test_with_two_seeds_each_seed_is_compared_on_its_own_curve(tmp_path):
    """Per seed, each trained point is that seed's value (the base model's single
    value is shared); the expected figures are interpolated by hand below."""
    bench = _bench()

    def rate(values):
        mean = sum(values) / len(values)
        return {"mean": mean, "n": 100, "ci95": [0.0, 1.0], "seeds": values}

    def col(label, arm, epoch, refusals, compliances):
        return _column(label, arm, epoch, rate(refusals), rate(compliances))

    results = {
        "columns": {
            "base": col("base", "base", 0, [0.1], [0.9]),
            "lora_chains@epoch1": col(
                "LoRA (chains), epoch 1", "lora_chains", 1, [0.3, 0.4], [0.7, 0.6]
            ),
            "lora_chains": col(
                "LoRA (chains), epoch 2", "lora_chains", 2, [0.7, 0.6], [0.5, 0.5]
            ),
            "mote[random]@epoch1": col(
                "MoTE, epoch 1", "mote", 1, [0.4, 0.2], [0.8, 0.8]
            ),
            "mote[random]": col("MoTE, epoch 2", "mote", 2, [0.6, 0.8], [0.6, 0.4]),
        }
    }
    results["tradeoff"] = bench.tradeoff(results, [42, 43])
    per_seed = results["tradeoff"]["per_seed"]
    assert list(per_seed) == ["42", "43"]
    pair = "lora_chains vs mote[random]"
    # seed 42: MoTE (.1,.9) (.4,.8) (.6,.6); LoRA (.1,.9) (.3,.7) (.7,.5)
    # at 0.3 MoTE is 2/3 of the way from .9 to .8; at 0.7 MoTE has no point
    got = {r["refusal"]: r["difference"] for r in per_seed["42"][pair]}
    assert got == pytest.approx({0.3: 0.8333 - 0.7, 0.4: 0.15, 0.6: 0.05}, abs=1e-4)
    # seed 43: MoTE (.1,.9) (.2,.8) (.8,.4); LoRA (.1,.9) (.4,.6) (.6,.5)
    got = {r["refusal"]: r["difference"] for r in per_seed["43"][pair]}
    assert got == pytest.approx({0.2: 0.0, 0.4: 0.0667, 0.6: 0.0333}, abs=1e-4)
    # the mean curves are made of the means: MoTE's epoch 1 at (0.3, 0.8)
    mote = results["tradeoff"]["curves"]["mote[random]"]
    assert (mote[1]["refusal"], mote[1]["compliance"]) == pytest.approx((0.3, 0.8))
    text = bench.render_tradeoff(results)
    assert "| 42 | 40.0 | 65.0 | 80.0 | +15.0 |" in text
    assert "| 43 | 20.0 | 80.0 | 80.0 | +0.0 |" in text
    results["title"] = "two seeds"
    bench.write_tradeoff_plot(results, tmp_path / "curves.png")  # each seed dotted
    assert (tmp_path / "curves.png").stat().st_size > 0
    # one seed: no per-seed block
    assert "per_seed" not in bench.tradeoff(results, [42])


def _xstest(path: Path, n: int = 2) -> Path:
    return write_xstest(path, n)


@pytest.mark.slow
def test_tiny_checkpoints_end_to_end(tmp_path):
    """Two epochs on the tiny model: each epoch's checkpoint of a MoTE adapter loads
    through the package's loader and is its own column; the final adapter is the last
    epoch's; the trade-off block goes to its own markers on --page."""
    bench = _bench()
    from safetensors.torch import load_file

    page = tmp_path / "page.md"
    page.write_text(f"# p\n\n{bench.TABLE_START}\nkept\n{bench.TABLE_END}\n")
    argv = [
        "--tiny", "--limit", "2", "--max-new-tokens", "6", "--max-stage-tokens", "2",
        "--work-dir", str(tmp_path / "w"), "--xstest", str(_xstest(tmp_path / "x.csv")),
        "--seeds", "1", "--arms", "base", "mote", "--routings", "random",
        "--sets", "xstest", "--threads", "1", "--epochs", "2", "--checkpoints",
        "--name", "curves", "--page", str(page),
    ]  # fmt: skip
    summary = bench.main(argv)
    out = tmp_path / "w" / "train" / "mote-s1" / "out"
    ckpts = bench.epoch_checkpoints(out, 2)
    assert list(ckpts) == [1, 2]
    assert (ckpts[1] / "mote_config.json").is_file()
    last = load_file(str(ckpts[2] / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter_model.safetensors"))
    assert last.keys() == final.keys()
    assert all(last[k].equal(final[k]) for k in last)  # the final adapter = epoch 2
    columns = summary["results"]["columns"]
    assert list(columns) == ["base", "mote[random]@epoch1", "mote[random]"]
    assert [c["epoch"] for c in columns.values()] == [0, 1, 2]
    assert columns["mote[random]"]["label"] == "MoTE, epoch 2"
    assert (tmp_path / "w/eval/mote-s1.epoch1/xstest_safe.limit2.json").is_file()
    curve = summary["results"]["tradeoff"]["curves"]["mote[random]"]
    assert [p["epoch"] for p in curve] == [0, 1, 2]
    docs = tmp_path / "w" / "docs"
    assert (docs / "curves.png").is_file() and "--checkpoints" in summary["command"]
    text = page.read_text()
    assert f"{bench.TABLE_START}\nkept\n{bench.TABLE_END}" in text  # untouched
    start, end = bench.table_markers("string", bench.TRADEOFF_BLOCK)
    assert start in text and end in text and "Trade-off points" in text
    # a rerun trains and generates nothing again
    cached = sorted((tmp_path / "w" / "eval").glob("*/*.json"))
    assert len(cached) == 6  # base, epoch 1, epoch 2 x two XSTest sets
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = bench.main(argv)
    assert all(t["reused"] for t in again["training"].values())
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    # --at-epochs with none: the final adapters only (the points that matter first)
    final = bench.main([*argv, "--at-epochs"])
    assert list(final["results"]["columns"]) == ["base", "mote[random]"]
    assert "--at-epochs" in final["command"]
    with pytest.raises(ValueError, match=r"--at-epochs \[5\]: mote was trained"):
        bench.main([*argv, "--at-epochs", "5"])


def test_at_epochs_needs_checkpoints():
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--at-epochs", "1"])
    args = bench.parse_args(["--checkpoints", "--at-epochs", "1", "2"])
    assert args.at_epochs == [1, 2]
    assert bench._command_args(args)[-2:] == ["--checkpoints", "--at-epochs 1 2"]
    none = bench.parse_args(["--checkpoints", "--at-epochs"])
    assert none.at_epochs == [] and "--at-epochs" in bench._command_args(none)
