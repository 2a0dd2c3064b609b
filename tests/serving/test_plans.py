"""Forced plans under a short budget are kept or reported, the same way in
``generate_chains``, ``axolotl-mote serve`` and the stage-switching client; the client
falls back to the answer stage and its command says when a reply has no answer.

The expected plans are worked out by hand from the budget rule (generation/plan.py):
with ``max_new_tokens`` N the answer keeps A = min(32, N // 4) tokens and every other
stage of a forced plan S = max(1, A // 4) plus its two markers; the plan fits when
N + 1 (the first marker is pre-filled) >= sum of (S + 2) per stage before the answer
+ (A + 1).

* N = 12: A = 3, S = 1: 3 + 3 + 4 = 10 <= 13, all three stages run (the old rule
  closed the analysis at A + 2 tokens left and then skipped the guidance silently).
* N = 5: A = 1, S = 1: 3 + 3 + 2 = 8 > 6, so the guidance is dropped (3 + 2 <= 6).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("openai")

FULL = ["question_analysis", "answer_guidance", "safe_answer"]
PROMPT = "How do I bake bread at home?"
# (max_new_tokens, the stages that run, the stages dropped)
CASES = [
    (12, FULL, []),
    (5, ["question_analysis", "safe_answer"], ["answer_guidance"]),
]


@pytest.fixture(scope="module")
def server(saved):
    from axolotl_mote.serving.server import MoteWorker, ServerThread, build_app

    _, model, tokenizer = saved
    worker = MoteWorker(model, tokenizer, max_batch=2, batch_wait=0.01)
    with ServerThread(build_app(worker)) as thread:
        yield thread
    worker.close()


def _manifest(saved) -> dict:
    """What a bundle's manifest says about the adapter (without writing the bundle)."""
    from axolotl_mote.serving.bundle import stage_manifest
    from axolotl_mote.tuner.config import MoteConfig

    adapter, _, tokenizer = saved
    return stage_manifest(MoteConfig.load(adapter).prompt_template(), tokenizer)


@pytest.mark.parametrize(("budget", "plan", "dropped"), CASES)
def test_a_forced_plan_is_kept_or_reported_in_all_three_paths(
    saved, server, budget, plan, dropped
):
    import httpx

    from axolotl_mote.generation import generate_chains
    from axolotl_mote.serving.client import HTTPBackend, StageClient

    _, model, tokenizer = saved
    (out,) = generate_chains(model, tokenizer, PROMPT, plan="full",
                             max_new_tokens=budget)  # fmt: skip
    assert (out.plan, out.dropped_stages) == (plan, dropped)
    assert out.fallback_used == bool(dropped) and out.answer is not None
    assert len(out.token_ids) - 1 <= budget  # the pre-filled marker is not generated
    reply = httpx.post(f"{server.url}/chat/completions", timeout=60, json={
        "model": "mote", "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": budget, "plan": "full",
    }).json()  # fmt: skip
    mote = reply["mote"]
    assert (mote["plan"], mote["dropped_stages"]) == (plan, dropped)
    assert mote["forced_plan"] == FULL and mote["fallback_used"] == bool(dropped)
    assert reply["usage"]["completion_tokens"] <= budget
    client = StageClient(HTTPBackend(server.url), _manifest(saved), tokenizer)
    chain = client.generate(PROMPT, plan=FULL, max_new_tokens=budget)
    assert (chain.plan, chain.dropped_stages) == (plan, dropped)
    assert chain.answer is not None and len(chain.token_ids) - 1 <= budget


def test_the_client_falls_back_to_the_answer_on_a_short_budget(saved):
    """Adaptive: the model picks its stages; a budget too short for them still ends
    with the answer stage, and says so."""
    from axolotl_mote.serving.client import LocalBackend, StageClient

    _, model, tokenizer = saved
    client = StageClient(LocalBackend(model), _manifest(saved), tokenizer)
    for budget in (3, 6, 10):
        chain = client.generate(PROMPT, max_new_tokens=budget)
        assert chain.plan[-1] == "safe_answer" and chain.answer is not None, budget
        assert len(chain.token_ids) <= budget
        if chain.plan != ["safe_answer"] and budget <= 3:
            assert chain.fallback_used


def test_the_client_command_exits_non_zero_without_an_answer(saved, server, tmp_path):
    from click.testing import CliRunner

    from axolotl_mote.cli.main import main
    from axolotl_mote.serving.bundle import MANIFEST_NAME

    _, _, tokenizer = saved
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(_manifest(saved)))
    tokenizer.save_pretrained(tmp_path / "base")
    args = ["client", "--bundle", str(tmp_path), "--url", server.url, "--prompt",
            PROMPT]  # fmt: skip
    ok = CliRunner().invoke(main, [*args, "--plan", "full", "--max-new-tokens", "5"])
    assert ok.exit_code == 0, ok.output
    row = json.loads(ok.stdout.splitlines()[0])
    assert row["plan"] == ["question_analysis", "safe_answer"]
    assert row["dropped_stages"] == ["answer_guidance"] and row["answer"] is not None
    assert "answer_guidance" in ok.stderr and "dropped" in ok.stderr
    # adaptive with no budget: not even the answer's marker fits
    empty = CliRunner().invoke(main, [*args, "--max-new-tokens", "0"])
    assert empty.exit_code == 1
    assert json.loads(empty.stdout.splitlines()[0])["answer"] is None
    assert "no answer" in empty.stderr
