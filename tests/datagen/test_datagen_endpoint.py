"""The endpoint backend against a real HTTP server on 127.0.0.1.

A FastAPI app answers ``/v1/chat/completions`` with the scripted chain replies (so every
branch of the rule is reached) and can be told to fail: every request after the N-th
(an endpoint that dies midway), each request's first attempt (a flaky one), or slowly
(a timeout). ``generate_data`` and the CLI run against it with the real ``openai``
client; the resumed run must equal a run that never failed, with no duplicates and no
losses.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.helpers.scripted_chains import QUESTIONS, prompt_kind, scripted_reply

pytest.importorskip("openai")
pytest.importorskip("fastapi")

from fastapi import FastAPI, Request  # noqa: E402  (module level: FastAPI resolves it)
from fastapi.responses import JSONResponse  # noqa: E402


class Behaviour:
    """What the scripted server does; tests change it while the server runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.served = 0  # successful replies
        self.fail_after: int | None = None  # HTTP 500 once `served` reaches this
        self.flaky = False  # HTTP 503 on each distinct request's first attempt
        self.delay = 0.0
        self.attempts: dict[str, int] = {}


def _app(behaviour: Behaviour):
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        with behaviour.lock:
            seen = behaviour.attempts.get(text, 0)
            behaviour.attempts[text] = seen + 1
            if (
                behaviour.fail_after is not None
                and behaviour.served >= behaviour.fail_after
            ):
                return JSONResponse({"error": {"message": "backend crashed"}}, 500)
            if behaviour.flaky and seen == 0:
                return JSONResponse({"error": {"message": "overloaded"}}, 503)
            behaviour.served += 1
        if behaviour.delay:
            time.sleep(behaviour.delay)
        reply = scripted_reply(prompt_kind(text), text)
        return {
            "id": "cmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                }
            ],
        }

    return app


@pytest.fixture(scope="module")
def endpoint():
    from axolotl_mote.serving.server import ServerThread

    behaviour = Behaviour()
    with ServerThread(_app(behaviour)) as thread:
        yield thread.url, behaviour


@pytest.fixture()
def server(endpoint):
    url, behaviour = endpoint
    behaviour.reset()
    return url, behaviour


def _generator(url, **kwargs):
    from axolotl_mote.datagen import OpenAIChatGenerator

    kwargs = {"max_retries": 0, "timeout": 10.0, "concurrency": 4} | kwargs
    return OpenAIChatGenerator(url, "scripted", **kwargs)


def _seeds():
    from axolotl_mote.datagen import Seed

    return [
        Seed(f"id-{i}", [{"role": "user", "content": q}], {})
        for i, q in enumerate(QUESTIONS)
    ]


def _lines(path):
    return (
        [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    )


def _run(url, out, **kwargs):
    from axolotl_mote.datagen import generate_data

    return generate_data(
        _generator(url, **kwargs), _seeds(), out, template="aligncot",
        batch_size=2, progress=False,
    )  # fmt: skip


def _strip(row):  # the run-specific fields
    return {k: v for k, v in row.items() if k != "meta"} | {
        "verdicts": row.get("meta", {}).get("datagen", {}).get("verdicts")
    }


def test_every_branch_over_http(server, tmp_path):
    url, behaviour = server
    report = _run(url, tmp_path / "a.jsonl")
    assert report.total == {"passed": 4, "failed_kept": 1, "malformed": 2}
    assert report.malformed_reasons == {"unparseable check verdict": 1, "empty text": 1}
    assert report.checkers == {f"scripted @ {url}": 5}
    rows = {r["id"]: r for r in _lines(tmp_path / "a.jsonl")}
    assert rows["id-3"]["meta"]["datagen"]["stages"] == [
        "analysis",
        "guidance",
        "answer",
    ]
    assert rows["id-0"]["meta"]["datagen"]["constrained_verdicts"] is False


def test_retries_with_backoff_recover_a_flaky_endpoint(server, tmp_path):
    url, behaviour = server
    behaviour.flaky = True
    report = _run(url, tmp_path / "flaky.jsonl", max_retries=2)
    assert sum(report.total.values()) == len(QUESTIONS)
    assert behaviour.attempts and set(behaviour.attempts.values()) == {2}


def test_an_endpoint_that_fails_midway_then_a_resumed_run(server, tmp_path):
    from axolotl_mote.datagen.backends import EndpointError

    url, behaviour = server
    reference = tmp_path / "reference.jsonl"
    _run(url, reference)  # a run that never failed
    behaviour.reset()
    behaviour.fail_after = 9  # the first batch (8 requests) finishes, the second dies
    out = tmp_path / "out.jsonl"
    with pytest.raises(EndpointError, match=r"HTTP 500 .*backend crashed"):
        _run(url, out)
    rejects = tmp_path / "out.rejects.jsonl"
    partial = {r["id"] for r in _lines(out)} | {r["id"] for r in _lines(rejects)}
    assert partial == {"id-0", "id-1"}  # exactly the finished batch was written
    behaviour.reset()
    report = _run(url, out)  # resumed
    assert report.skipped_done == 2
    ids = [r["id"] for r in _lines(out)] + [r["id"] for r in _lines(rejects)]
    assert sorted(ids) == sorted(f"id-{i}" for i in range(len(QUESTIONS)))  # no dups
    got = sorted(map(json.dumps, map(_strip, _lines(out))))
    want = sorted(map(json.dumps, map(_strip, _lines(reference))))
    assert got == want  # nothing lost, nothing changed


def test_timeouts_and_a_dead_endpoint_are_reported(server, tmp_path):
    from axolotl_mote.datagen.backends import EndpointError

    url, behaviour = server
    behaviour.delay = 1.5
    with pytest.raises(EndpointError, match="timed out"):
        _generator(url, timeout=0.3).complete([[{"role": "user", "content": "hi"}]])
    with pytest.raises(EndpointError, match="cannot connect"):
        _generator("http://127.0.0.1:9/v1").complete(
            [[{"role": "user", "content": "x"}]]
        )


def test_cli_stops_cleanly_and_a_rerun_continues(server, tmp_path):
    from click.testing import CliRunner

    from axolotl_mote.cli.main import main

    url, behaviour = server
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "prompt": q}) + "\n"
            for i, q in enumerate(QUESTIONS)
        )
    )
    out = tmp_path / "chains.jsonl"
    args = ["generate-data", "--input", str(seeds), "-o", str(out), "--endpoint", url,
            "--api-model", "scripted", "--batch-size", "2", "--retries", "0",
            "--timeout", "10"]  # fmt: skip
    behaviour.fail_after = 9
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert (
        "HTTP 500" in res.output and "rerun the same command to continue" in res.output
    )
    behaviour.reset()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") :].split("\n}\n")[0] + "\n}")
    assert report["skipped_done"] == 2
    assert sum(report["total"].values()) == len(QUESTIONS)
