"""Server-sent events for ``stream: true`` on both generation endpoints.

The HTTP status is decided when the worker starts the job: a refusal before that
(context length, a full queue) is a plain JSON error. Then every worker event becomes
one chunk, as OpenAI and vLLM send them: chat deltas carry the answer stage's text in
``delta.content`` and every stage's boundaries and text in the ``mote`` extension
field (``{"stage", "event": "start"|"end"}``, ``{"stage", "text"}``); the last chunk
has the finish reason (and ``mote``'s plan and stages), then the usage chunk with
``stream_options.include_usage``, then ``data: [DONE]``. Text held back by the
trackers (a possible stop string, a partial character) is sent in the last chunk, so
the streamed text equals the non-streamed reply.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import Request

from axolotl_mote.serving.protocol import error_body
from axolotl_mote.serving.replies import (
    EXACT_MODEL,
    POLL,
    _error,
    _mote_field,
    _refusal,
    _usage,
)
from axolotl_mote.serving.worker import MoteWorker, Overloaded


async def stream(worker: MoteWorker, kind: str, body: Any, raw: Request, response):
    """Server-sent events: the status is decided when the job starts (a refusal before
    that is a plain JSON error); then one chunk per event, a final chunk with the
    finish reason, the usage chunk if asked, and ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(event: dict) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    try:
        job = worker.submit(kind, body, sink)
    except Overloaded as err:
        return _refusal(err)
    first = await _next_event(events, raw, job)
    if first is None:
        return _error(499, "the client disconnected")
    if first["type"] == "end" and job.future.exception() is not None:
        refusal = _refusal(job.future.exception())
        if refusal is not None:
            return refusal
    chunks = _chat_chunks if kind == "chat" else _completion_chunks
    return response(
        _sse(chunks(worker, body, job, events, raw, first)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _next_event(events: asyncio.Queue, raw: Request, job) -> dict | None:
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=POLL)
        except asyncio.TimeoutError:
            if await raw.is_disconnected():
                job.cancel("disconnected")
                return None


async def _sse(chunks):
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


async def _events_until_end(events, raw, job, first):
    event = first
    try:
        while event is not None and event["type"] != "end":
            yield event
            event = await _next_event(events, raw, job)
    finally:
        if not job.future.done():
            job.cancel("disconnected")  # the response was abandoned


async def _chat_chunks(worker, body, job, events, raw, first):
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": EXACT_MODEL,
    }
    usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(delta: dict, finish=None, **extra) -> dict:
        out = {
            **base,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
            **extra,
        }
        return {**out, "usage": None} if usage else out

    yield chunk({"role": "assistant", "content": ""})
    answer = worker.spec.names[worker.spec.answer]
    async for event in _events_until_end(events, raw, job, first):
        if event["type"] != "mote":
            continue
        mote = {k: v for k, v in event.items() if k != "type"}
        delta = (
            {"content": event["text"]}
            if (event.get("text") and event["stage"] == answer)
            else {}
        )
        yield chunk(delta, mote=mote)
    err = job.future.exception() if job.future.done() else None
    if err is not None:
        refusal = _refusal(err)
        message = str(err) if refusal is not None else f"internal error: {err}"
        yield error_body(message, status=500)
        return
    if not job.future.done():
        return
    out = job.future.result()
    tracker = out["tracker"].answer_sent()
    rest = tracker.rest(out["answer"]) if tracker is not None else out["answer"]
    yield chunk(
        {"content": rest} if rest else {}, out["finish_reason"], mote=_mote_field(out)
    )
    if usage:
        yield {
            **base,
            "choices": [],
            "usage": _usage(out["prompt_tokens"], out["completion_tokens"]),
        }


async def _completion_chunks(worker, body, job, events, raw, first):
    base = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }
    usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(index: int, text: str, finish=None) -> dict:
        out = {
            **base,
            "choices": [
                {
                    "index": index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
        }
        return {**out, "usage": None} if usage else out

    async for event in _events_until_end(events, raw, job, first):
        if event["type"] == "text":
            yield chunk(event["index"], event["text"])
    err = job.future.exception() if job.future.done() else None
    if err is not None:
        yield error_body(str(err), status=500)
        return
    if not job.future.done():
        return
    out = job.future.result()
    prompt = generated = 0
    for c in out["choices"]:
        yield chunk(c["index"], c["tracker"].rest(c["text"]), c["finish_reason"])
        prompt += len(c["prompt_ids"])
        generated += len(c["token_ids"]) + len(c["ended_by"])
    if usage:
        yield {**base, "choices": [], "usage": _usage(prompt, generated)}
