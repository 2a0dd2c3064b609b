"""``axolotl-mote serve``: an OpenAI-compatible server backed by exact MoTE generation.

Two endpoints, the API surface vLLM serves LoRA adapters with:

* ``POST /v1/chat/completions`` (``model``: ``mote``): the **exact** model. Every
  request goes through ``generate_chains`` (stage routing by the emitted markers, the KV
  cache of each token computed by its own stage's expert). Concurrent requests are
  batched: the worker takes every request that arrives within ``batch_wait`` seconds, up
  to ``max_batch``, with the same sampling settings, into one ``generate_chains`` call.
  Extra request fields: ``plan`` (``"analysis>answer"``, ``"full"``), and
  ``max_stage_tokens``; the reply's ``mote`` field has the plan and every stage's text.
  The message content is the answer stage (what a user sees).
* ``POST /v1/completions`` (``model``: a stage name, or ``prompt``): what a per-request
  adapter server computes (``engine.py``): every token routed to that stage. With
  ``prompt`` as token ids, ``stop_token_ids``, ``logit_bias`` and ``return_token_ids``
  it is the endpoint the stage-switching client (``client.py``) talks to.

``GET /v1/models`` lists ``mote`` and the adapters. One worker thread owns the model;
the HTTP handlers only queue work, so the model never runs two forwards at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request  # resolved by name in the handlers' string annotations

EXACT_MODEL = "mote"


@dataclass
class _Job:
    kind: str  # "chat" | "completion"
    payload: dict[str, Any]
    future: Future = field(default_factory=Future)


class MoteWorker:
    """Runs every generation on one thread; batches compatible chat requests."""

    def __init__(
        self, model: Any, tokenizer: Any, max_batch: int = 8, batch_wait: float = 0.02
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches: list[int] = []  # sizes of the chat batches run (for tests)
        self.thread = threading.Thread(target=self._run, daemon=True, name="mote")
        self.thread.start()

    def submit(self, kind: str, payload: dict[str, Any]) -> Future:
        job = _Job(kind, payload)
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self.jobs.get()
            if job is None:
                return
            if job.kind == "completion":
                self._finish(job, self._completion, job.payload)
                continue
            batch = [job]
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    pending.append(nxt)
                    break
                same = nxt.kind == "chat" and _settings(nxt) == _settings(job)
                (batch if same else pending).append(nxt)
            self.batches.append(len(batch))
            try:
                results = self._chat([j.payload for j in batch])
            except Exception as err:  # report to every waiting request
                for j in batch:
                    j.future.set_exception(err)
            else:
                for j, result in zip(batch, results):
                    j.future.set_result(result)

    @staticmethod
    def _finish(job: _Job, fn, payload) -> None:
        try:
            job.future.set_result(fn(payload))
        except Exception as err:
            job.future.set_exception(err)

    def _chat(self, payloads: list[dict[str, Any]]) -> list[Any]:
        from axolotl_mote.generation import generate_chains, split_plan

        first = payloads[0]
        temperature = float(first.get("temperature") or 0.0)
        sample = {"do_sample": True, "temperature": temperature} if temperature else {}
        return generate_chains(
            self.model,
            self.tokenizer,
            [p["messages"] for p in payloads],
            plan=[split_plan(p.get("plan")) for p in payloads],
            max_new_tokens=int(first.get("max_tokens") or 256),
            max_stage_tokens=first.get("max_stage_tokens"),
            batch_size=len(payloads),
            seed=first.get("seed"),  # None: the adapter's own seed
            **sample,
        )

    def _completion(self, payload: dict[str, Any]) -> Any:
        from axolotl_mote.serving.engine import complete_with_adapter

        prompt = payload.get("prompt")
        if isinstance(prompt, str):  # as vLLM does: the text, special tokens parsed
            prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            if len(prompt) != 1:
                raise ValueError("one prompt per request")
            prompt = prompt[0]
        return complete_with_adapter(
            self.model,
            str(payload.get("model")),
            prompt or [],
            max_tokens=int(payload.get("max_tokens") or 16),
            stop_token_ids=payload.get("stop_token_ids") or [],
            logit_bias=payload.get("logit_bias") or None,
            temperature=float(payload.get("temperature") or 0.0),
            seed=int(payload.get("seed") or 0),
        )


def _settings(job: _Job) -> tuple:
    p = job.payload
    keys = ("max_tokens", "temperature", "max_stage_tokens", "seed")
    return tuple(str(p.get(k)) for k in keys)


def _error(status: int, message: str, code: str):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "code": code}},
    )


def build_app(worker: MoteWorker) -> Any:
    """The FastAPI application around a :class:`MoteWorker`."""
    from fastapi import FastAPI

    from axolotl_mote.serving.engine import UnknownAdapterError, adapter_steps
    from axolotl_mote.tuner.model import get_routing_state

    app = FastAPI(title="axolotl-mote", version="1")
    adapters = sorted(adapter_steps(get_routing_state(worker.model)))

    @app.get("/v1/models")
    async def models() -> dict:
        names = [EXACT_MODEL, *adapters]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "mote"} for n in names],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body.get("model", EXACT_MODEL) != EXACT_MODEL:
            return _error(
                404,
                f"model {body.get('model')!r}: chat completions serve the exact model "
                f"{EXACT_MODEL!r}; per-stage adapters are on /v1/completions",
                "model_not_found",
            )
        if not body.get("messages"):
            return _error(400, "`messages` is required", "invalid_messages")
        try:
            out = await asyncio.wrap_future(worker.submit("chat", body))
        except ValueError as err:
            return _error(400, str(err), "invalid_request")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": EXACT_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out.answer or ""},
                    "finish_reason": "stop" if out.answer is not None else "length",
                }
            ],
            "usage": {"completion_tokens": len(out.token_ids)},
            "mote": {"plan": out.plan, "stages": out.stages, "text": out.text},
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("logit_bias"):
            body["logit_bias"] = {int(k): v for k, v in body["logit_bias"].items()}
        try:
            out = await asyncio.wrap_future(worker.submit("completion", body))
        except UnknownAdapterError as err:
            return _error(404, str(err), "model_not_found")
        except ValueError as err:
            return _error(400, str(err), "invalid_request")
        choice: dict[str, Any] = {
            "index": 0,
            "text": worker.tokenizer.decode(
                out.token_ids,
                skip_special_tokens=bool(body.get("skip_special_tokens", True)),
            ),
            "finish_reason": out.finish_reason,
            "logprobs": None,
        }
        if body.get("return_token_ids"):
            choice["token_ids"] = out.token_ids
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [choice],
            "usage": {"completion_tokens": len(out.token_ids)},
        }

    return app


class ServerThread:
    """Run the server on ``host:port`` in a background thread (tests, notebooks)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.url = f"http://{host}:{port}/v1"
        config = uvicorn.Config(app, host=host, port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
