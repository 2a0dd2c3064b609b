"""Limits and operations: a full queue is a 503 with Retry-After, a request over its
time limit ends, a client that disconnects cancels its own row and no other, SIGTERM
with a request in flight exits within the bound; the API key, /health and /metrics.

The model's forwards are slowed down (``slow_model``) so that a request is still
running while the test acts on it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.serving.conftest import slow_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("openai")

KEY = "sekret"
PROMPTS = ["How do I bake bread at home?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def process(saved, tiny_model_dir):
    """``axolotl-mote serve`` in a subprocess, started before the other tests of the
    module so that its start-up (imports, loading) overlaps them."""
    adapter, _, _ = saved
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "axolotl_mote.cli.main", "serve", "--adapter",
           str(adapter), "--base-model", str(tiny_model_dir), "--port", str(port),
           "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    yield proc, f"http://127.0.0.1:{port}"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(saved, process):
    from axolotl_mote.serving.server import MoteWorker, ServerThread, build_app

    _, model, tokenizer = saved
    worker = MoteWorker(model, tokenizer, max_batch=2, batch_wait=0.5, max_queue=1)
    with ServerThread(build_app(worker, api_key=KEY)) as thread:
        yield thread, worker
    worker.close()


@pytest.fixture(scope="module")
def http(server):
    import httpx

    thread, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=thread.root, timeout=60, headers=headers) as client:
        yield client


def _long_completion(tokenizer, max_tokens: int) -> dict:
    """A completion that runs ``max_tokens`` tokens: markers and end of sequence
    biased away."""
    from axolotl_mote.markers import marker_token_ids
    from axolotl_mote.templates import load_template

    ids = [*marker_token_ids(load_template("aligncot"), tokenizer).values()]
    bias = {str(i): -100 for i in [*ids, tokenizer.eos_token_id]}
    return {"model": "answer_guidance", "prompt": "Once upon a time",
            "max_tokens": max_tokens, "logit_bias": bias}  # fmt: skip


def _wait(condition, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_api_key_health_and_metrics(server, http):
    import httpx

    thread, _ = server
    bare = httpx.post(f"{thread.url}/completions", json={"model": "prompt"})
    assert bare.status_code == 401
    assert bare.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{thread.root}/health").status_code == 200  # no key needed
    assert http.get("/v1/models").status_code == 200
    reply = http.post("/v1/completions", json={"model": "prompt", "prompt": [5, 6],
                                               "max_tokens": 3})  # fmt: skip
    usage = reply.json()["usage"]
    text = httpx.get(f"{thread.root}/metrics").text
    assert 'mote:requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'status="401"' in text
    assert "mote:num_requests_waiting 0.0" in text
    assert f"mote:generation_tokens_total {float(usage['completion_tokens'])}" in text
    assert "mote:e2e_request_latency_seconds_bucket" in text


def test_a_full_queue_is_503_with_retry_after(server, http, saved):
    _, model, tokenizer = saved
    _, worker = server
    replies: list = []
    long = _long_completion(tokenizer, 30)

    def send():
        replies.append(http.post("/v1/completions", json=long))

    with slow_model(model, 0.05):
        running = threading.Thread(target=send)
        running.start()
        _wait(lambda: worker._running)  # the first request is on the model
        queued = threading.Thread(target=send)
        queued.start()
        _wait(lambda: worker.waiting == 1)  # the second waits: the queue is full
        refused = http.post("/v1/completions", json=long)
        running.join(30)
        queued.join(30)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "--max-queue 1" in refused.json()["error"]["message"]
    assert [r.status_code for r in replies] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 30 for r in replies)
    assert http.post("/v1/completions", json={**long, "max_tokens": 2}).is_success


def test_a_request_over_its_time_limit_ends(server, http, saved):
    _, model, tokenizer = saved
    _, worker = server
    worker.request_timeout = 0.5
    try:
        with slow_model(model, 0.05):
            start = time.monotonic()
            reply = http.post("/v1/completions", json=_long_completion(tokenizer, 200))
            took = time.monotonic() - start
    finally:
        worker.request_timeout = None
    choice = reply.json()["choices"][0]
    assert reply.status_code == 200 and choice["finish_reason"] == "length"
    assert reply.json()["usage"]["completion_tokens"] < 40  # 200 take 10 s or more
    assert took < 3
    job, _ = worker.finished[-1]
    assert job.stop_reason == "time_limit"


def test_a_disconnect_cancels_its_row_only(server, saved):
    """Two chats batched; one client gives up: its row stops, the other row's chain
    is what generate_chains gives for the same batch."""
    import httpx

    from axolotl_mote.generation import generate_chains

    thread, worker = server
    _, model, tokenizer = saved
    body = {"model": "mote", "max_tokens": 40, "temperature": 0, "plan": "full"}
    headers = {"Authorization": f"Bearer {KEY}"}
    results: dict = {}

    def ask(prompt: str, timeout: float) -> None:
        chat = {**body, "messages": [{"role": "user", "content": prompt}]}
        try:
            results[prompt] = httpx.post(f"{thread.url}/chat/completions", json=chat,
                                         headers=headers, timeout=timeout)  # fmt: skip
        except httpx.TimeoutException:
            results[prompt] = "gave up"

    before = len(worker.batches)
    worker.max_queue = 2  # both wait for the batch together
    try:
        with slow_model(model, 0.05):
            threads = [
                threading.Thread(target=ask, args=(PROMPTS[0], 60)),
                threading.Thread(target=ask, args=(PROMPTS[1], 0.8)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        worker.max_queue = 1
    assert worker.batches[before:] == [2]
    assert results[PROMPTS[1]] == "gave up"
    kept = results[PROMPTS[0]].json()
    exact = generate_chains(
        model, tokenizer, PROMPTS, plan="full", max_new_tokens=40, batch_size=2
    )
    assert kept["mote"]["stages"] == exact[0].stages
    assert kept["usage"]["completion_tokens"] == len(exact[0].token_ids) - 1
    (gone,) = [r for j, r in worker.finished if j.stop_reason == "disconnected"]
    assert gone["completion_tokens"] < len(exact[1].token_ids) - 1


def test_a_stream_closed_by_its_client_stops_its_generation(server, http, saved):
    _, model, tokenizer = saved
    _, worker = server
    body = {**_long_completion(tokenizer, 200), "stream": True}
    done = len(worker.finished)
    with slow_model(model, 0.02):
        with http.stream("POST", "/v1/completions", json=body) as reply:
            lines = reply.iter_lines()
            while not next(lines).startswith("data: {"):
                pass  # one token has arrived; now hang up
        _wait(lambda: len(worker.finished) > done)
    job, result = worker.finished[-1]
    assert job.stop_reason == "disconnected"
    assert len(result["choices"][0]["token_ids"]) < 100  # 200 take 4 s or more


def test_sigterm_with_a_request_in_flight_exits_within_the_bound(process, saved):
    import httpx

    proc, root = process
    _, _, tokenizer = saved
    _wait(lambda: _healthy(root) or proc.poll() is not None, 180)
    assert proc.poll() is None, proc.stdout.read()
    body = {**_long_completion(tokenizer, 1900), "stream": True}
    got: list[str] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{root}/v1/completions", json=body,
                              timeout=60) as reply:  # fmt: skip
                for line in reply.iter_lines():
                    got.append(line)
        except httpx.HTTPError:
            got.append("broken")

    client = threading.Thread(target=stream)
    client.start()
    _wait(lambda: len(got) >= 4)  # tokens are streaming: the request is running
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    took = time.monotonic() - start
    client.join(10)
    assert took <= 10, took
    assert not client.is_alive()
    text_chunks = [line for line in got if line.startswith("data: {")]
    assert len(text_chunks) < 1900  # cut short, not run to the end


def _healthy(root: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{root}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
