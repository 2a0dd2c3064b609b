"""``axolotl-mote serve``: an OpenAI-compatible server backed by exact MoTE generation.

* ``POST /v1/chat/completions`` (``model``: ``mote``): the **exact** model. Every
  request goes through ``generate_chains`` (stage routing by the emitted markers, the KV
  cache of each token computed by its own stage's expert); concurrent requests with
  the same settings are batched (``worker.py``). Extra request fields: ``plan``
  (``"analysis>answer"``, ``"full"``) and ``max_stage_tokens``; the reply's ``mote``
  field has the plan, every stage's text and what the plan rules changed. The message
  content is the answer stage (what a user sees).
* ``POST /v1/completions`` (``model``: a stage name, or ``prompt``): what a per-request
  adapter server computes (``engine.py``): every token routed to that stage; token-id
  prompts, lists of prompts, ``stop_token_ids``, ``logit_bias``, ``return_token_ids``,
  ``echo`` and ``logprobs`` (OpenAI's legacy format) as vLLM has them.
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), ``POST
  /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Bodies are validated by the Pydantic models of ``protocol.py``; every refusal is an
OpenAI-style JSON error. Both generation endpoints stream (server-sent events) with
``stream: true``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from fastapi import Request  # resolved by name in the handlers' string annotations

from axolotl_mote.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    describe_errors,
)
from axolotl_mote.serving.replies import (
    EXACT_MODEL,
    POLL,
    _error,
    _mote_field,
    _refusal,
    _usage,
)
from axolotl_mote.serving.worker import MoteWorker, Overloaded

#: Default body-size limit (``--max-body-bytes``).
MAX_BODY_BYTES = 4 * 1024 * 1024

__all__ = ["EXACT_MODEL", "MoteWorker", "ServerThread", "build_app"]


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it is
    parsed (``Content-Length`` checked first, chunked bodies counted as they come)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = _error(
            413,
            f"the request body is over the {self.limit}-byte limit (--max-body-bytes)",
        )
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(message)
            if not message.get("more_body"):
                break

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        return await self.app(scope, replay, send)


class Guard:
    """ASGI middleware: the API key on ``/v1/*`` (401 without it, as vLLM's
    ``--api-key``), and the request metrics. Plain ASGI rather than
    ``@app.middleware("http")``, which hides a client's disconnect from the
    handlers."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
              "/metrics", "/tokenize", "/detokenize", "/tokenizer_info")  # fmt: skip

    def __init__(self, app: Any, api_key: str | None, metrics: Any) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in self.ROUTES else "other"  # bounded label values
        status = {"code": 500}

        async def watched(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.monotonic()
        try:
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if (
                self.api_key
                and path.startswith("/v1")
                and (given != f"Bearer {self.api_key}")
            ):
                refusal = _error(
                    401,
                    "a valid API key is required: send `Authorization: Bearer "
                    "<key>` (--api-key)",
                )
                return await refusal(scope, receive, watched)
            await self.app(scope, receive, watched)
        finally:
            self.metrics.requests.labels(label, str(status["code"])).inc()
            if label.startswith("/v1/"):
                self.metrics.latency.labels(label).observe(time.monotonic() - start)


def build_app(
    worker: MoteWorker,
    *,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Any:
    """The FastAPI application around a :class:`MoteWorker`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from axolotl_mote.serving.engine import adapter_steps
    from axolotl_mote.serving.metrics import ServerMetrics
    from axolotl_mote.serving.streaming import stream
    from axolotl_mote.tuner.model import get_routing_state

    metrics = ServerMetrics(queue_depth=lambda: worker.waiting)
    worker.metrics = metrics
    app = FastAPI(title="axolotl-mote", version="1")
    app.state.worker, app.state.metrics = worker, metrics
    adapters = sorted(adapter_steps(get_routing_state(worker.model)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = describe_errors(list(exc.errors()))
        kind = request.headers.get("content-type", "application/json")
        if "json" not in kind and message.endswith("must be a JSON object"):
            message += f" sent as Content-Type: application/json (got {kind!r})"
        return _error(400, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body could not be read as UTF-8 JSON"
        return _error(exc.status_code, detail, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Guard, api_key=api_key, metrics=metrics)  # the outermost

    @app.get("/health")
    async def health():
        if worker.closing or not worker.thread.is_alive():
            return _error(503, "the server is shutting down")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        names = [EXACT_MODEL, *adapters]
        return {
            "object": "list",
            "data": [
                {
                    "id": n,
                    "object": "model",
                    "owned_by": "mote",
                    "max_model_len": worker.max_model_len,
                }
                for n in names
            ],
        }

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await _tokenize(worker, request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await _detokenize(worker, request)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = worker.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "model_max_length": worker.max_model_len,
            "vocab_size": len(tok),
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "chat_template": worker.template.chat_format.jinja,
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        if body.model != EXACT_MODEL:
            return _error(
                404,
                f"model {body.model!r}: chat completions serve the exact model "
                f"{EXACT_MODEL!r}; per-stage adapters are on /v1/completions",
                "model",
            )
        if body.stream:
            return await stream(worker, "chat", body, raw, StreamingResponse)
        out = await _run(worker, "chat", body, raw)
        if not isinstance(out, dict):
            return out
        return _chat_reply(out, metrics)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        if body.stream:
            return await stream(worker, "completion", body, raw, StreamingResponse)
        out = await _run(worker, "completion", body, raw)
        if not isinstance(out, dict):
            return out
        return _completion_reply(body, out, worker, metrics)

    return app


async def _run(worker: MoteWorker, kind: str, body: Any, raw: Request):
    """The worker's result for ``body``, or the error response; cancels the job when
    the client disconnects while it waits."""
    try:
        job = worker.submit(kind, body)
    except Overloaded as err:
        return _refusal(err)
    fut = asyncio.wrap_future(job.future)
    while not fut.done():
        await asyncio.wait({fut}, timeout=POLL)
        if not fut.done() and await raw.is_disconnected():
            job.cancel("disconnected")
            fut.add_done_callback(lambda f: f.exception())  # retrieved: no warning
            return _error(499, "the client disconnected")
    err = fut.exception()
    if err is not None:
        refusal = _refusal(err)
        if refusal is None:
            raise err
        return refusal
    return fut.result()


def _chat_reply(out: dict, metrics: Any) -> dict:
    metrics.prompt_tokens.inc(out["prompt_tokens"])
    metrics.generation_tokens.inc(out["completion_tokens"])
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": EXACT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": out["answer"]},
                "logprobs": None,
                "finish_reason": out["finish_reason"],
            }
        ],
        "usage": _usage(out["prompt_tokens"], out["completion_tokens"]),
        "mote": _mote_field(out),
    }


def _prompt_text(body: CompletionRequest, index: int, ids: list[int], tok) -> str:
    """The prompt exactly as received (a string), or its token ids decoded."""
    prompt = body.prompts()[index]
    return prompt if isinstance(prompt, str) else tok.decode(ids)


def _completion_reply(body: CompletionRequest, out: dict, worker, metrics) -> dict:
    choices, prompt_total, generated_total = [], 0, 0
    for c in out["choices"]:
        text = c["text"]
        if body.echo:
            text = (
                _prompt_text(body, c["index"], c["prompt_ids"], worker.tokenizer) + text
            )
        choice: dict[str, Any] = {
            "index": c["index"],
            "text": text,
            "logprobs": c["logprobs"],
            "finish_reason": c["finish_reason"],
        }
        if body.return_token_ids:
            choice["token_ids"] = c["token_ids"]
            choice["prompt_token_ids"] = c["prompt_ids"]
        choices.append(choice)
        prompt_total += len(c["prompt_ids"])
        generated_total += len(c["token_ids"]) + len(c["ended_by"])
    metrics.prompt_tokens.inc(prompt_total)
    metrics.generation_tokens.inc(generated_total)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": choices,
        "usage": _usage(prompt_total, generated_total),
    }


async def _tokenize(worker: MoteWorker, request: Request):
    """vLLM's ``/tokenize``: ``prompt`` (text) or ``messages`` (rendered with the
    template's chat format, as chat completions render them)."""
    from pydantic import ValidationError

    try:
        body = await request.json()
    except Exception:
        return _error(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object")
    if "messages" in body:
        try:
            req = ChatCompletionRequest.model_validate(
                {"model": EXACT_MODEL, "messages": body["messages"]}
            )
        except ValidationError as err:
            message, param = describe_errors(list(err.errors()))
            return _error(400, message, param)
        job = (worker.formatter.prompt_ids, req.conversation())
    elif isinstance(body.get("prompt"), str):
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            return _error(
                400, "add_special_tokens must be a boolean", "add_special_tokens"
            )
        job = (lambda: worker.tokenizer(body["prompt"], add_special_tokens=add)
               ["input_ids"],)  # fmt: skip
    else:
        return _error(400, "send `prompt` (a string) or `messages`", "prompt")
    try:
        ids = await asyncio.to_thread(_locked, *job)
    except Exception as err:  # e.g. a lone surrogate the tokenizer cannot encode
        return _error(400, f"cannot tokenize: {type(err).__name__}: {err}")
    return {"count": len(ids), "max_model_len": worker.max_model_len, "tokens": ids}


async def _detokenize(worker: MoteWorker, request: Request):
    try:
        body = await request.json()
    except Exception:
        return _error(400, "the request body is not valid JSON")
    tokens = body.get("tokens") if isinstance(body, dict) else None
    vocab = len(worker.tokenizer)
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
        for t in tokens
    ):
        return _error(
            400, f"`tokens` must be a list of token ids below {vocab}", "tokens"
        )
    text = await asyncio.to_thread(_locked, worker.tokenizer.decode, tokens)
    return {"prompt": text}


_TOKENIZER_LOCK = threading.Lock()


def _locked(fn, *args):
    with _TOKENIZER_LOCK:
        return fn(*args)


class ServerThread:
    """Run the server on ``host:port`` in a background thread (tests, notebooks)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.root = f"http://{host}:{port}"
        self.url = f"{self.root}/v1"
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
