"""generate-data: the check-then-extend rule, resume, malformed output, CLI.

The rule's branches are driven by a scripted generator (same ``complete`` method as the
real backends, replies chosen by the prompt); the tiny random Llama runs the real HF
path end to end.
"""

from __future__ import annotations

import json

import pytest

from axolotl_mote.datagen import (
    ChainRule,
    Seed,
    generate_data,
    load_seeds,
    parse_verdict,
)
from tests.helpers.scripted_chains import QUESTIONS, Scripted

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seeds(*questions):
    return [
        Seed(f"id-{i}", [{"role": "user", "content": q}], {"n": i})
        for i, q in enumerate(questions)
    ]


def _rows(path):
    return (
        [json.loads(line) for line in path.read_text().splitlines()]
        if path.exists()
        else []
    )


@pytest.mark.parametrize(
    "text,expected",
    [
        ("SAFE", "safe"),
        ("Safe. The reply declines.", "safe"),
        ("UNSAFE: gives steps", "unsafe"),
        ("**UNSAFE**", "unsafe"),
        ("The verdict is UNSAFE.", "unsafe"),
        ("I think it is SAFE", "safe"),
        ("maybe", None),
        ("", None),
        (None, None),
        ("Not sure: SAFE or UNSAFE", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text, {"safe": ["SAFE"], "unsafe": ["UNSAFE"]}) == expected


@pytest.mark.parametrize(
    "question,status,stages,verdicts",
    [
        ("easy question", "passed", ["answer"], ["safe"]),
        ("needs analysis", "passed", ["analysis", "answer"], ["unsafe", "safe"]),
        (
            "needs guidance",
            "passed",
            ["analysis", "guidance", "answer"],
            ["unsafe", "unsafe", "safe"],
        ),
        (
            "never safe",
            "failed_kept",
            ["analysis", "guidance", "answer"],
            ["unsafe", "unsafe", "unsafe"],
        ),
    ],
)
def test_chain_rule_branches(aligncot, question, status, stages, verdicts):
    (out,) = ChainRule(aligncot).run(Scripted(), _seeds(question))
    assert out.status == status and out.verdicts == verdicts
    record = out.record
    assert [k for k in ("analysis", "guidance", "answer") if k in record] == stages
    assert record["answer"] == f"reply-{len(stages) - 1} for {question}"
    assert record["meta"]["datagen"]["verdicts"] == verdicts
    assert record["meta"]["datagen"]["stages"] == stages
    assert record["meta"]["n"] == 0  # the seed's meta is carried over
    assert record["check"] == out_check(verdicts[-1])


def out_check(verdict):
    return "SAFE: fine." if verdict == "safe" else "UNSAFE - it helps harm."


@pytest.mark.parametrize(
    "on_fail,status,kept,review",
    [
        ("keep", "failed_kept", True, None),
        ("mark", "failed_marked", True, True),
        ("drop", "failed_dropped", False, None),
    ],
)
def test_on_fail_policy(aligncot, on_fail, status, kept, review):
    (out,) = ChainRule(aligncot, on_fail=on_fail).run(Scripted(), _seeds("never safe"))
    assert out.status == status and (out.record is not None) == kept
    if kept:
        assert out.record["meta"].get("needs_review") is review


@pytest.mark.parametrize(
    "question,reason",
    [
        ("bad verdict", "unparseable check verdict 'Hmm, hard to say.' (round 1)"),
        ("empty answer", "empty text in `answer` (round 1)"),
        ("marker", "stage marker '<|response|>' in `analysis` (round 2)"),
    ],
)
def test_malformed_output_is_rejected(aligncot, question, reason):
    (out,) = ChainRule(aligncot).run(Scripted(), _seeds(question))
    assert out.status == "malformed" and out.record is None and out.reason == reason


def test_batched_calls_only_for_open_questions(aligncot):
    gen = Scripted()
    outs = ChainRule(aligncot).run(
        gen, _seeds("easy question", "needs analysis", "needs guidance", "bad verdict")
    )
    assert [o.status for o in outs] == ["passed", "passed", "passed", "malformed"]
    assert [(k, n) for k, n, _ in gen.calls] == [
        ("answer0", 4),
        ("check", 4),  # everyone answers and is checked once
        ("analysis", 2),
        ("answer1", 2),
        ("check", 2),  # two were unsafe
        ("guidance", 1),
        ("answer2", 1),
        ("check", 1),
    ]
    again = Scripted()
    ChainRule(aligncot).run(
        again,
        _seeds("easy question", "needs analysis", "needs guidance", "bad verdict"),
    )
    assert again.calls == gen.calls  # seeds too: deterministic
    assert len({s for _, _, s in gen.calls}) == len(gen.calls)


def test_template_without_generation_prompts_is_rejected():
    from axolotl_mote.templates import load_template

    with pytest.raises(ValueError, match="lacks .*'answer', 'check', 'plan'"):
        ChainRule(load_template("plan_solve_verify"))


def test_resume_after_interruption(aligncot, tmp_path):
    seeds = _seeds(*QUESTIONS)
    full = tmp_path / "full.jsonl"
    report = generate_data(
        Scripted(),
        seeds,
        full,
        template=aligncot,
        batch_size=2,
        progress=False,
        on_fail="drop",
    )
    assert report.total == {"passed": 4, "malformed": 2, "failed_dropped": 1}
    assert report.malformed_reasons == {"unparseable check verdict": 1, "empty text": 1}
    assert report.verdict_paths == {
        "safe": 2,
        "unsafe>safe": 1,
        "unsafe>unsafe>safe": 1,
        "unsafe>unsafe>unsafe": 1,
    }
    report_file = json.loads((tmp_path / "full.report.json").read_text())
    assert report_file["total"] == report.total

    out = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of the third batch
        generate_data(
            Scripted(fail_after=13),
            seeds,
            out,
            template=aligncot,
            batch_size=2,
            progress=False,
            on_fail="drop",
        )
    first = _rows(out) + _rows(tmp_path / "part.rejects.jsonl")
    assert 0 < len(first) < len(seeds)
    with open(out, "a") as handle:  # and a line cut off mid-write
        handle.write('{"id": "id-6", "messages": [')
    resumed = generate_data(
        Scripted(),
        seeds,
        out,
        template=aligncot,
        batch_size=2,
        progress=False,
        on_fail="drop",
    )
    assert resumed.skipped_done == len(first)
    assert _rows(out) == _rows(full)  # same records, same order, no duplicates
    assert _rows(tmp_path / "part.rejects.jsonl") == _rows(
        tmp_path / "full.rejects.jsonl"
    )
    assert resumed.total == report.total
    again = generate_data(Scripted(), seeds, out, template=aligncot, progress=False)
    assert again.this_run == {} and again.skipped_done == len(seeds)


def test_load_seeds_jsonl_and_datasets(aligncot, tmp_path):
    from axolotl_mote.data.schema import ChainRecordError  # noqa: F401

    seeds = load_seeds("data/seed_questions.jsonl", aligncot)
    assert len(seeds) == 104 and len({s.id for s in seeds}) == 104
    assert any(len(s.messages) > 1 for s in seeds)  # multi-turn kept
    assert "harmful" in seeds[0].meta

    import datasets

    ds = datasets.Dataset.from_list(
        [
            {"question": "How do I bake bread?", "topic": "food"},
            {"question": "What is 2+2?", "topic": "math"},
        ]
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    seeds = load_seeds(tmp_path / "ds", aligncot, prompt_field="question")
    assert [s.messages[0]["content"] for s in seeds] == [
        "How do I bake bread?",
        "What is 2+2?",
    ]
    assert seeds[0].id.startswith("q-") and seeds[0].meta == {"topic": "food"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        load_seeds(bad, aligncot)
    bad.write_text('{"id": "a", "messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(ValueError, match="seed question .*must end with a user turn"):
        load_seeds(bad, aligncot)


class _FreeText:
    """A local model seen as an endpoint would be: ``complete`` only, no ``choose``."""

    def __init__(self, real):
        self.complete = real.complete


class _RealTextScriptedChecks:
    """Real tiny-model text for every stage; the check verdict scripted per question."""

    def __init__(self, real):
        self.real = real

    def complete(self, prompts, *, max_new_tokens, seed):
        texts = self.real.complete(prompts, max_new_tokens=max_new_tokens, seed=seed)
        if "SAFE or" not in prompts[0][-1]["content"]:
            return texts
        return ["SAFE" if "bread" in p[-1]["content"] else "UNSAFE" for p in prompts]


def test_real_tiny_model_end_to_end(aligncot, tiny_model_dir, tmp_path):
    from axolotl_mote.datagen import HFChatGenerator

    real = HFChatGenerator(str(tiny_model_dir), batch_size=2)
    seeds = _seeds(
        "How do I bake bread?",
        "How do I pick my neighbour's lock?",
        "What is the capital of France?",
    )
    # 1. all real, free text (as through an endpoint, which cannot constrain): a random
    # model's check is not a verdict -> every question malformed
    out = tmp_path / "real.jsonl"
    report = generate_data(
        _FreeText(real),
        seeds,
        out,
        template=aligncot,
        batch_size=2,
        max_new_tokens=6,
        check_max_new_tokens=4,
        progress=False,
    )
    rejects = _rows(tmp_path / "real.rejects.jsonl")
    assert report.total == {"malformed": 3} and _rows(out) == []
    assert all(r["status"] == "malformed" for r in rejects)
    assert sorted(r["id"] for r in rejects) == ["id-0", "id-1", "id-2"]
    # 2. real text, scripted checks: the branches on real generations
    out = tmp_path / "mixed.jsonl"
    report = generate_data(
        _RealTextScriptedChecks(real),
        seeds,
        out,
        template=aligncot,
        batch_size=2,
        max_new_tokens=6,
        progress=False,
        on_fail="mark",
    )
    rows = {r["id"]: r for r in _rows(out)}
    rejected = {r["id"] for r in _rows(tmp_path / "mixed.rejects.jsonl")}
    assert set(rows) | rejected == {"id-0", "id-1", "id-2"} and not set(rows) & rejected
    if "id-0" in rows:  # bread: safe straight away
        assert rows["id-0"]["meta"]["datagen"]["verdicts"] == ["safe"]
        assert "analysis" not in rows["id-0"] and rows["id-0"]["answer"].strip()
    for rid in set(rows) - {"id-0"}:
        assert rows[rid]["meta"]["needs_review"] is True
        assert rows[rid]["meta"]["datagen"]["verdicts"] == ["unsafe"] * 3
    from axolotl_mote.data.schema import validate_jsonl

    assert validate_jsonl(out, aligncot)["records"] == len(rows)


def test_cli_generate_data(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from axolotl_mote.cli.main import main

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "prompt": q}) + "\n"
            for i, q in enumerate(["Hi there", "How do I bake bread?"])
        )
    )
    out = tmp_path / "chains.jsonl"
    args = [
        "generate-data",
        "--input",
        str(seeds),
        "--output",
        str(out),
        "--base-model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "4",
        "--check-max-new-tokens",
        "3",
        "--batch-size",
        "2",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert '"skipped_done": 0' in res.output
    res = CliRunner().invoke(main, args)  # resumes: nothing left to do
    assert res.exit_code == 0 and '"skipped_done": 2' in res.output
    res = CliRunner().invoke(
        main, ["generate-data", "--input", str(seeds), "--output", str(out)]
    )
    assert res.exit_code == 2 and "local model path" in res.output


# --- constrained verdicts and a separate checker --------------------------------


@pytest.mark.parametrize(
    "options",
    [["SAFE", "UNSAFE"], ["UNSAFE", "SAFE"], ["yes", "no", "maybe not"], ["ab", "abc"]],
)
def test_choose_is_greedy_decoding_restricted_to_the_options(tiny_model_dir, options):
    """``choose`` against the naive reference: ``generate`` with
    ``prefix_allowed_tokens_fn`` over the options' token trie, greedy."""
    import torch

    from axolotl_mote.datagen import HFChatGenerator

    gen = HFChatGenerator(str(tiny_model_dir))
    tok = gen.tokenizer
    ids = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
    chats = [
        [{"role": "user", "content": q}]
        for q in ("Is this fine?", "How do I bake bread?", "Tell me a secret", "Hi")
    ]
    picks = gen.choose(chats, options)
    assert all(0 <= p < len(options) for p in picks)
    eos = tok.eos_token_id
    for chat, pick in zip(chats, picks):
        head = gen.render(chat)

        allowed = _trie_constraint(ids, len(head), eos)
        out = gen.model.generate(
            torch.tensor([head]), max_new_tokens=max(map(len, ids)) + 1,
            do_sample=False, prefix_allowed_tokens_fn=allowed, pad_token_id=eos,
        )[0, len(head):].tolist()  # fmt: skip
        out = out[: out.index(eos)] if eos in out else out
        if options == ["ab", "abc"] and out[: len(ids[0])] == ids[0]:
            assert pick == 0  # the shorter option wins once it is complete
        else:
            assert ids[pick] == out


def _trie_constraint(ids: list[list[int]], n_prompt: int, eos: int):
    """``prefix_allowed_tokens_fn``: the next tokens of the options still matching."""

    def allowed(_, prefix):
        done = prefix[n_prompt:].tolist()
        nxt = {
            i[len(done)] for i in ids if i[: len(done)] == done and len(i) > len(done)
        }
        return sorted(nxt) if nxt else [eos]

    return allowed


class _NamedChecker:
    """A separate checker: records its calls, verdict by a word in the question."""

    name = "checker-model"

    def __init__(self, real):
        self.real, self.calls = real, []

    def choose(self, prompts, options):
        self.calls.append(("choose", len(prompts)))
        return [0 if "bread" in p[-1]["content"] else 1 for p in prompts]

    def complete(self, prompts, *, max_new_tokens, seed, prefixes=None):
        self.calls.append(("complete", len(prompts)))
        return self.real.complete(
            prompts, max_new_tokens=max_new_tokens, seed=seed, prefixes=prefixes
        )


def test_constrained_verdicts_always_parse_on_a_real_model(
    aligncot, tiny_model_dir, tmp_path
):
    """The random tiny model writes no verdict word freely (every question was
    malformed above); constrained, every verdict parses and the reason follows it."""
    from axolotl_mote.datagen import HFChatGenerator

    real = HFChatGenerator(str(tiny_model_dir), batch_size=4)
    seeds = _seeds("How do I bake bread?", "How do I pick a lock?", "Hello", "Why?")
    out = tmp_path / "c.jsonl"
    report = generate_data(
        real, seeds, out, template=aligncot, batch_size=4, max_new_tokens=6,
        check_max_new_tokens=5, progress=False, on_fail="mark",
    )  # fmt: skip
    assert "malformed" not in report.total
    assert sum(report.total.values()) == 4 and len(_rows(out)) == 4
    for row in _rows(out):
        info = row["meta"]["datagen"]
        assert info["constrained_verdicts"] is True
        assert info["checker"] == str(tiny_model_dir)
        assert len(info["checks"]) == len(info["verdicts"])
        for text, verdict in zip(info["checks"], info["verdicts"]):
            assert (
                parse_verdict(text, {"safe": ["SAFE"], "unsafe": ["UNSAFE"]}) == verdict
            )
            assert text.split()[0] == verdict.upper()  # the word, then a free reason
    assert sum(report.stage_plans.values()) == 4
    assert report.checkers == {str(tiny_model_dir): 4}


def test_a_separate_checker_answers_every_check(aligncot, tiny_model_dir, tmp_path):
    from axolotl_mote.datagen import HFChatGenerator

    real = HFChatGenerator(str(tiny_model_dir), batch_size=4)
    aligned = Scripted()  # the model being aligned: answers and stages only
    checker = _NamedChecker(real)
    seeds = _seeds("easy question bread", "never safe")
    out = tmp_path / "sep.jsonl"
    generate_data(
        aligned, seeds, out, template=aligncot, batch_size=2, max_new_tokens=4,
        check_max_new_tokens=3, progress=False, checker=checker,
    )  # fmt: skip
    assert "check" not in {kind for kind, _, _ in aligned.calls}
    assert [k for k, _ in checker.calls] == ["choose", "complete"] * 3
    rows = {r["id"]: r for r in _rows(out)}
    assert rows["id-0"]["meta"]["datagen"]["verdicts"] == ["safe"]
    assert rows["id-1"]["meta"]["datagen"]["verdicts"] == ["unsafe"] * 3
    assert {r["meta"]["datagen"]["checker"] for r in rows.values()} == {"checker-model"}


def test_cli_check_model_options(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from axolotl_mote.cli.main import main

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"id": "s0", "prompt": "How do I bake bread?"}) + "\n")
    out = tmp_path / "chains.jsonl"
    base = ["generate-data", "--input", str(seeds), "-o", str(out),
            "--base-model", str(tiny_model_dir), "--max-new-tokens", "3",
            "--check-max-new-tokens", "2"]  # fmt: skip
    res = CliRunner().invoke(main, [*base, "--check-endpoint", "http://127.0.0.1:9/v1"])
    assert res.exit_code == 2 and "the checker" in res.output
    assert "--check-api-model" in res.output
    res = CliRunner().invoke(main, [*base, "--check-model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    (row,) = _rows(out)
    assert row["meta"]["datagen"]["checker"] == str(tiny_model_dir)
