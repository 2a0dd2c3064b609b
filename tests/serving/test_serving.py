"""Serving: the exact local server, the stage-switching client, the serving bundle.

A tiny random MoTE model is saved as an adapter; ``axolotl-mote serve``'s application
runs on 127.0.0.1 in a thread and is queried with the real ``openai`` client.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers.tiny import saved_aligncot_mote

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("openai")

PROMPTS = [
    "How do I bake bread at home?",
    "What is the capital of France?",
    "Can you explain recursion in Python?",
    "How do I kill a stuck process?",
]


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """(adapter dir, model, tokenizer): a tiny MoTE adapter with trained marker rows."""
    return saved_aligncot_mote(
        tiny_model_dir,
        tmp_path_factory.mktemp("serving") / "adapter",
        prompt_routing="random",
        train_markers=True,
    )


@pytest.fixture(scope="module")
def server(saved):
    from axolotl_mote.serving.server import MoteWorker, ServerThread, build_app

    _, model, tokenizer = saved
    worker = MoteWorker(model, tokenizer, max_batch=4, batch_wait=0.3)
    with ServerThread(build_app(worker)) as thread:
        yield thread.url, worker
    worker.close()


def _openai(url, **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="EMPTY", **kwargs)


def test_concurrent_chat_requests_give_generate_chains_stages(saved, server):
    from axolotl_mote.generation import generate_chains

    _, model, tokenizer = saved
    url, worker = server
    api = _openai(url)

    def ask(prompt):
        return api.chat.completions.create(
            model="mote",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=24,
            temperature=0,
            extra_body={"max_stage_tokens": 4},
        )

    before = list(worker.batches)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(ask, PROMPTS))
    assert any(size > 1 for size in worker.batches[len(before) :])  # batched
    expected = generate_chains(
        model, tokenizer, PROMPTS, max_new_tokens=24, max_stage_tokens=4
    )
    for reply, exact in zip(replies, expected):
        mote = reply.model_extra["mote"]
        assert mote["plan"] == exact.plan and mote["stages"] == exact.stages
        assert reply.choices[0].message.content == exact.answer


def test_models_and_errors_follow_the_openai_api(server):
    import openai

    url, _ = server
    api = _openai(url, max_retries=0)
    names = {m.id for m in api.models.list().data}
    assert names == {"mote", "prompt", "question_analysis", "answer_guidance",
                     "safe_answer"}  # fmt: skip
    with pytest.raises(openai.NotFoundError, match="unknown adapter 'nope'"):
        api.completions.create(model="nope", prompt=[1, 2], max_tokens=2)


def _clients(saved, url, **http):
    from axolotl_mote.serving.client import HTTPBackend, LocalBackend, StageClient

    _, model, tokenizer = saved
    manifest = _manifest(saved)
    return (
        StageClient(HTTPBackend(url, **http), manifest, tokenizer),
        StageClient(LocalBackend(model), manifest, tokenizer),
    )


def _manifest(saved) -> dict:
    """What a bundle's manifest says about the adapter (without writing the bundle)."""
    from axolotl_mote.serving.bundle import stage_manifest
    from axolotl_mote.tuner.config import MoteConfig

    adapter, _, tokenizer = saved
    return stage_manifest(MoteConfig.load(adapter).prompt_template(), tokenizer)


def test_the_stage_switching_client_against_the_server(saved, server):
    url, _ = server
    http, local = _clients(saved, url)
    end_ids = {s["end_id"] for s in http.stages}
    for prompt in PROMPTS[:2]:
        chain = http.generate(prompt, max_new_tokens=20, max_stage_tokens=3)
        same = local.generate(prompt, max_new_tokens=20, max_stage_tokens=3)
        assert (chain.plan, chain.stages) == (same.plan, same.stages)
        assert chain.plan[-1] == "safe_answer" and chain.answer is not None
        # stage boundaries: every stage closed by its own end marker, once
        assert sum(t in end_ids for t in chain.token_ids) == len(chain.plan)
    forced = http.generate(PROMPTS[0], plan=["analysis", "answer"], max_stage_tokens=2)
    assert forced.plan == ["question_analysis", "safe_answer"]
    starts = {s["start_id"] for s in http.stages}
    content, lengths = 0, []
    for token in forced.token_ids:  # content tokens of each stage, between its markers
        if token in starts:
            content = 0
        elif token in end_ids:
            lengths.append(content)
        else:
            content += 1
    assert len(lengths) == 2 and max(lengths) <= 2


def test_client_errors_are_reported(saved, server):
    import socket

    from axolotl_mote.serving.client import HTTPBackend, ServingError, StageClient

    url, _ = server
    _, _, tokenizer = saved
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    down = StageClient(HTTPBackend(dead, max_retries=0, timeout=2), _manifest(saved),
                       tokenizer)  # fmt: skip
    with pytest.raises(ServingError, match="cannot connect"):
        down.generate(PROMPTS[0])
    manifest = _manifest(saved)
    manifest["stages"][2]["adapter"] = "no_such_adapter"
    bad = StageClient(HTTPBackend(url, max_retries=0), manifest, tokenizer)
    with pytest.raises(ServingError, match=r"HTTP 404.*unknown adapter"):
        bad.generate(PROMPTS[0], plan=["answer"])
    slow = StageClient(HTTPBackend(url, max_retries=0, timeout=0.001),
                       _manifest(saved), tokenizer)  # fmt: skip
    with pytest.raises(ServingError, match="timed out"):
        slow.generate(PROMPTS[0], plan=["answer"])
    # the worker still runs the abandoned request: one more behind it waits it out, so
    # the next test has the model to itself
    _openai(url).completions.create(model="prompt", prompt=[1], max_tokens=1)


def test_the_bundle_loads_in_plain_peft_with_the_stage_logits(saved, tmp_path):
    """base/ + adapters/<stage> in plain PEFT == MoTE with every token on that stage."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from axolotl_mote.constants import EXPECTED_STEP
    from axolotl_mote.routing import route
    from axolotl_mote.serving.bundle import write_serving_bundle
    from axolotl_mote.tuner.model import get_routing_state

    adapter, model, tokenizer = saved
    manifest = json.loads(
        write_serving_bundle(adapter, tmp_path, dtype="float32").read_text()
    )
    assert manifest["stage_rank"] == 8 and manifest["prompt_rank"] == 16
    readme = (tmp_path / "README.md").read_text()
    assert "vllm serve" in readme and "--max-lora-rank 16" in readme
    assert "--max-loras 4" in readme and "sglang.launch_server" in readme
    ids = torch.tensor(
        [tokenizer("hi <|analysis|> a b <|/analysis|><|response|> c")["input_ids"]]
    )
    state = get_routing_state(model)
    steps = {s["name"]: i for i, s in enumerate(manifest["stages"])}
    steps["prompt"] = EXPECTED_STEP
    for name, step in steps.items():
        with torch.no_grad(), route(state, torch.full_like(ids, step)):
            expected = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        served = PeftModel.from_pretrained(base, tmp_path / "adapters" / name).eval()
        with torch.no_grad():
            got = served(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)
