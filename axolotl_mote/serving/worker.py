"""The model worker behind ``axolotl-mote serve``: one thread owns the model.

HTTP handlers :meth:`MoteWorker.submit` validated requests as :class:`Job`\\ s; the
worker thread checks each against the context (``max_model_len``), batches compatible
chat jobs into one ``generate_chains`` call, runs completions one at a time, and
resolves each job's future. Limits live here:

* **queue**: at most ``max_queue`` jobs wait; one more raises :class:`Overloaded`
  (the server answers 503 with ``Retry-After``).
* **per-row control**: a logits processor (:class:`RowControl`) sees every new token
  of every row. It feeds the row's tracker (streaming, stop strings) and, when the
  row's job is cancelled (client gone, time limit, stop string, shutdown), forces
  end of sequence in that row only: the other rows of the batch go on unchanged, and
  ``generate`` returns once every row has ended.
* **shutdown**: :meth:`MoteWorker.shutdown` refuses new jobs, fails queued ones and
  ends running rows at their next token.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor

from axolotl_mote.serving.tracking import ChainTracker, TextTracker, cut_at_stop

#: Chat tokens generated when a request gives no ``max_tokens`` (capped by the context).
DEFAULT_CHAT_TOKENS = 256
#: Completion tokens when a request gives no ``max_tokens`` (OpenAI's default).
DEFAULT_COMPLETION_TOKENS = 16


class RequestError(ValueError):
    """A request the model cannot run as asked (400, or ``status``)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class Overloaded(RuntimeError):
    """The queue is full, the server is shutting down, or the job waited too long."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(RuntimeError):
    """The job was cancelled before it ran (its client went away)."""


@dataclass
class Job:
    kind: str  # "chat" | "completion"
    request: Any  # protocol.ChatCompletionRequest | protocol.CompletionRequest
    deadline: float | None = None  # time.monotonic() by which generation must end
    sink: Callable[[dict], None] | None = None  # stream events, from the worker thread
    future: Future = field(default_factory=Future)
    stop_reason: str | None = (
        None  # "disconnected" | "time_limit" | "shutdown" | "stop"
    )
    # filled by the worker before the job runs
    prompts: list[list[int]] = field(default_factory=list)
    max_tokens: int = 0
    plan: Any = None
    left_queue: bool = False

    def cancel(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def should_stop(self, now: float) -> bool:
        if self.stop_reason is None and self.deadline is not None:
            if now >= self.deadline:
                self.stop_reason = "time_limit"
        return self.stop_reason is not None

    def emit(self, event: dict) -> None:
        if self.sink is not None:
            self.sink(event)


class RowControl(LogitsProcessor):
    """Per row: feed each new token to ``feeds[i]``; force ``end_id`` in a row whose
    job should stop. Runs after the plan rules, so it overrides them."""

    def __init__(
        self,
        jobs: list[Job],
        feeds: list[Callable[[int], None]],
        end_id: int,
        start_ids: set[int] | None = None,
    ) -> None:
        self.jobs, self.feeds, self.end_id = jobs, feeds, end_id
        self.start_ids = start_ids or set()
        self.ended = [False] * len(jobs)
        self._seen: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        length = input_ids.shape[1]
        last = input_ids[:, -1].tolist()  # [B]
        if self._seen is None:  # first step: only a prefilled start marker is output
            for i, token in enumerate(last):
                if token in self.start_ids:
                    self.feeds[i](token)
        elif length > self._seen:
            for i, token in enumerate(last):
                if not self.ended[i]:
                    if token == self.end_id:
                        self.ended[i] = True
                    self.feeds[i](token)
        self._seen = length
        now = time.monotonic()
        for i, job in enumerate(self.jobs):
            if not self.ended[i] and job.should_stop(now):
                scores[i] = float("-inf")  # [V]
                scores[i, self.end_id] = 0.0
        return scores


def model_context(model: Any, tokenizer: Any) -> int:
    """The model's context length: ``max_position_embeddings``, else the tokenizer's."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    raise ValueError("cannot tell the model's context length; pass --max-model-len")


class MoteWorker:
    """Runs every generation on one thread; batches compatible chat requests."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_batch: int = 8,
        batch_wait: float = 0.02,
        *,
        max_queue: int = 64,
        max_model_len: int | None = None,
        request_timeout: float | None = None,
        metrics: Any = None,
    ) -> None:
        from axolotl_mote.data.format import ChainFormatter
        from axolotl_mote.generation.generate import _eos_ids, resolve_template
        from axolotl_mote.generation.plan import StageSpec
        from axolotl_mote.tuner.model import get_routing_state

        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.max_queue, self.request_timeout = max_queue, request_timeout
        self.context = model_context(model, tokenizer)
        self.max_model_len = max_model_len or self.context
        self.template = resolve_template(get_routing_state(model), None)
        self.formatter = ChainFormatter(self.template, tokenizer)
        self.spec = StageSpec.from_template(self.template, self.formatter.marker_ids)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.metrics = metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0  # jobs submitted and not yet started
        self.closing = False
        self._lock = threading.Lock()
        self._running: list[Job] = []
        self.batches: list[int] = []  # sizes of the chat batches run (tests, metrics)
        self.finished: deque[tuple[Job, Any]] = deque(maxlen=256)  # (job, result)
        self.thread = threading.Thread(target=self._run, daemon=True, name="mote")
        self.thread.start()

    # --- the HTTP side ---------------------------------------------------------------
    def submit(self, kind: str, request: Any, sink=None) -> Job:
        with self._lock:
            if self.closing:
                raise Overloaded("the server is shutting down", retry_after=5)
            if self.waiting >= self.max_queue:
                raise Overloaded(
                    f"the server is busy: {self.waiting} requests are queued "
                    f"(--max-queue {self.max_queue}); retry later"
                )
            self.waiting += 1
        deadline = (
            time.monotonic() + self.request_timeout if self.request_timeout else None
        )
        job = Job(kind, request, deadline=deadline, sink=sink)
        self.jobs.put(job)
        return job

    def shutdown(self) -> None:
        """Refuse new jobs, fail queued ones, end running rows at their next token."""
        with self._lock:
            self.closing = True
            running = list(self._running)
        for job in running:
            job.cancel("shutdown")
        self.jobs.put(None)

    def close(self, timeout: float = 10.0) -> None:
        self.shutdown()
        self.thread.join(timeout=timeout)

    # --- the worker thread -----------------------------------------------------------
    def _run(self) -> None:
        pending: list[Job | None] = []  # taken from the queue, not yet prepared
        ready: list[Job] = []  # prepared, waiting for their batch
        while True:
            if ready:
                job = ready.pop(0)
            else:
                job = pending.pop(0) if pending else self.jobs.get()
                if job is None:
                    return self._drain([*ready, *pending])
                if not self._start(job):
                    continue
            if job.kind == "completion":
                self._execute([job], self._completion)
                continue
            batch = [job]
            for other in [r for r in ready if r.kind == "chat"]:
                if len(batch) < self.max_batch and _settings(other) == _settings(job):
                    batch.append(other)
                    ready.remove(other)
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch and not self.closing:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    pending.append(nxt)
                    break
                if not self._start(nxt):
                    continue
                if nxt.kind == "chat" and _settings(nxt) == _settings(job):
                    batch.append(nxt)
                else:
                    ready.append(nxt)
            self._execute(batch, self._chat)

    def _drain(self, rest: list[Job | None]) -> None:
        while True:
            try:
                rest.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for job in rest:
            if job is not None:
                self._fail(job, Overloaded("the server is shutting down", 5))

    def _start(self, job: Job) -> bool:
        """Prepare a job taken from the queue, or resolve it now (error, cancelled)."""
        if self.closing:
            self._fail(job, Overloaded("the server is shutting down", retry_after=5))
            return False
        if job.stop_reason is not None:
            self._fail(job, Cancelled(job.stop_reason))
            return False
        if job.should_stop(time.monotonic()):
            self._fail(job, Overloaded("the request timed out in the queue"))
            return False
        try:
            (self._prepare_chat if job.kind == "chat" else self._prepare_completion)(
                job
            )
        except Exception as err:  # RequestError, or a template refusing the plan
            self._fail(
                job, err if isinstance(err, RequestError) else RequestError(str(err))
            )
            return False
        return True

    def _leave_queue(self, job: Job) -> None:
        with self._lock:
            if not job.left_queue:
                job.left_queue = True
                self.waiting -= 1

    def _fail(self, job: Job, err: BaseException) -> None:
        self._leave_queue(job)
        if not job.future.done():
            job.future.set_exception(err)
        job.emit({"type": "end"})

    def _execute(self, jobs: list[Job], fn) -> None:
        for job in jobs:
            self._leave_queue(job)
            job.emit({"type": "start"})
        with self._lock:
            self._running = list(jobs)
        if self.closing:
            for job in jobs:
                job.cancel("shutdown")
        try:
            results = fn(jobs)
        except Exception as err:  # reported to every waiting request
            for job in jobs:
                self._fail(job, err)
        else:
            for job, result in zip(jobs, results):
                self.finished.append((job, result))
                if not job.future.done():
                    job.future.set_result(result)
                job.emit({"type": "end"})
        finally:
            with self._lock:
                self._running = []

    # --- chat ------------------------------------------------------------------------
    def _prepare_chat(self, job: Job) -> None:
        from axolotl_mote.generation import parse_plan, split_plan

        req = job.request
        try:
            job.plan = split_plan(req.plan)
            forced = parse_plan(req.plan, self.template)
        except ValueError as err:
            raise RequestError(str(err), "plan") from None
        if isinstance(req.max_stage_tokens, dict):
            for name in req.max_stage_tokens:
                try:
                    self.template.trained_index(name)
                except ValueError as err:
                    raise RequestError(str(err), "max_stage_tokens") from None
        ids = self.formatter.prompt_ids(req.conversation())
        prompt = len(ids) + (1 if forced else 0)  # a forced plan pre-fills its marker
        job.prompts = [ids]
        job.max_tokens = self._budget(
            prompt, req.requested_tokens(), DEFAULT_CHAT_TOKENS, "messages"
        )

    def _budget(
        self, prompt: int, requested: int | None, default: int, where: str
    ) -> int:
        limit = self.max_model_len
        if requested is None:
            if prompt >= limit:
                raise RequestError(
                    f"This model's maximum context length is {limit} tokens; the "
                    f"prompt has {prompt} tokens ({where}). Shorten the prompt.",
                    where,
                )
            return min(default, limit - prompt)
        if prompt + requested > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt + requested} tokens ({prompt} in the {where}, "
                f"{requested} in the completion). Reduce the {where} or max_tokens.",
                "max_tokens",
            )
        return requested

    def _chat(self, jobs: list[Job]) -> list[dict[str, Any]]:
        from axolotl_mote.generation import generate_chains

        first = jobs[0].request
        trackers = [
            ChainTracker(self.spec, self.tokenizer, j.request.stop_list(), self.eos_ids)
            for j in jobs
        ]
        if jobs[0].max_tokens == 0:
            chains = [None] * len(jobs)
        else:
            self.batches.append(len(jobs))
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(jobs))

            def feed(job: Job, tracker: ChainTracker):
                def on_token(token: int) -> None:
                    for event in tracker.add(token):
                        job.emit({"type": "mote", **event})
                    if tracker.stopped:
                        job.cancel("stop")

                return on_token

            control = RowControl(
                jobs,
                [feed(j, t) for j, t in zip(jobs, trackers)],
                self.eos_ids[0],
                set(self.spec.start_ids),
            )
            temperature = first.temperature or 0.0
            sample = (
                {"do_sample": True, "temperature": temperature} if temperature else {}
            )
            if temperature and first.top_p is not None:
                sample["top_p"] = first.top_p
            chains = generate_chains(
                self.model,
                self.tokenizer,
                [j.request.conversation() for j in jobs],
                plan=[j.plan for j in jobs],
                max_new_tokens=jobs[0].max_tokens,
                max_stage_tokens=first.max_stage_tokens,
                batch_size=len(jobs),
                seed=first.seed,  # None: the adapter's own seed
                logits_processor=[control],
                **sample,
            )
        return [self._chat_result(j, c, t) for j, c, t in zip(jobs, chains, trackers)]

    def _chat_result(self, job: Job, chain: Any, tracker: ChainTracker) -> dict:
        prompt = len(job.prompts[0])
        if chain is None:  # max_tokens 0
            return {
                "chain": None,
                "answer": "",
                "finish_reason": "length",
                "prompt_tokens": prompt,
                "completion_tokens": 0,
                "stopped": None,
                "tracker": tracker,
            }
        prefilled = chain.forced_plan is not None
        answer, hit = cut_at_stop(chain.answer or "", job.request.stop_list())
        if hit or job.stop_reason == "stop":
            reason = "stop"
        elif job.stop_reason is not None:
            reason = "length"
        elif chain.finish_reason == "answer_end" or (
            chain.finish_reason == "eos" and chain.answer is not None
        ):
            reason = "stop"
        else:
            reason = "length"
        return {
            "chain": chain,
            "answer": answer,
            "finish_reason": reason,
            "prompt_tokens": prompt + int(prefilled),
            "completion_tokens": len(chain.token_ids) - int(prefilled),
            "stopped": job.stop_reason if job.stop_reason != "stop" else None,
            "tracker": tracker,
        }

    # --- completions -----------------------------------------------------------------
    def _prepare_completion(self, job: Job) -> None:
        from axolotl_mote.serving.engine import adapter_steps
        from axolotl_mote.tuner.model import get_routing_state

        req = job.request
        steps = adapter_steps(get_routing_state(self.model))
        if req.model not in steps:
            raise RequestError(
                f"unknown adapter {req.model!r}; this model serves {sorted(steps)}",
                "model",
                status=404,
            )
        vocab = len(self.tokenizer)
        for name, ids in (
            ("stop_token_ids", req.stop_token_ids or []),
            ("logit_bias", [int(k) for k in req.logit_bias or {}]),
        ):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise RequestError(
                    f"{name}: token ids {bad[:5]} are outside the vocabulary "
                    f"(size {vocab})",
                    name,
                )
        prompts = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):  # as vLLM does: special tokens parsed
                prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            bad = [t for t in prompt if t >= vocab]
            if bad:
                raise RequestError(
                    f"prompt[{i}]: token ids {bad[:5]} are outside the vocabulary "
                    f"(size {vocab})",
                    "prompt",
                )
            if not prompt:
                raise RequestError(f"prompt[{i}] is empty", "prompt")
            prompts.append(list(prompt))
        longest = max(len(p) for p in prompts)
        job.prompts = prompts
        job.max_tokens = self._budget(
            longest, req.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt"
        )

    def _completion(self, jobs: list[Job]) -> list[dict[str, Any]]:
        from axolotl_mote.serving.engine import (
            complete_with_adapter,
            stop_ids,
            token_logprobs,
        )

        (job,) = jobs
        req = job.request
        stops = req.stop_list()
        choices = []
        end_ids = stop_ids(self.model, req.stop_token_ids or [])
        for index, ids in enumerate(job.prompts):
            tracker = TextTracker(self.tokenizer, stops, req.skip_special_tokens)

            def on_token(token: int, index=index, tracker=tracker) -> None:
                if token in end_ids:
                    return
                delta = tracker.add(token)
                if delta:
                    job.emit({"type": "text", "index": index, "text": delta})
                if tracker.stopped:
                    job.cancel("stop")

            generated, reason, ended_by = [], "length", []
            if job.max_tokens > 0 and not job.should_stop(time.monotonic()):
                control = RowControl([job], [on_token], end_ids[0] if end_ids else 0)
                out = complete_with_adapter(
                    self.model,
                    req.model,
                    ids,
                    max_tokens=job.max_tokens,
                    stop_token_ids=req.stop_token_ids or [],
                    logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
                    temperature=req.temperature or 0.0,
                    top_p=req.top_p,
                    seed=req.seed or 0,
                    logits_processor=[control],
                )
                generated, reason = out.token_ids, out.finish_reason
                if out.stop_token_id is not None:  # generated, as vLLM counts it
                    ended_by = [out.stop_token_id]
            text = self.tokenizer.decode(
                generated, skip_special_tokens=req.skip_special_tokens
            )
            text, hit = cut_at_stop(text, stops)
            if hit or job.stop_reason == "stop":
                reason = "stop"
            elif job.stop_reason is not None:
                reason = "length"
            logprobs = None
            if req.logprobs is not None:
                logprobs = token_logprobs(
                    self.model,
                    self.tokenizer,
                    req.model,
                    ids,
                    generated + ended_by,
                    top=req.logprobs,
                    echo=req.echo,
                )
            if job.stop_reason == "stop":
                job.stop_reason = None  # the next prompt of the list runs in full
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "finish_reason": reason,
                    "prompt_ids": ids,
                    "token_ids": generated,
                    "ended_by": ended_by,
                    "logprobs": logprobs,
                    "tracker": tracker,
                }
            )
        return [{"choices": choices, "stopped": job.stop_reason}]


def _settings(job: Job) -> tuple:
    req = job.request
    stage = req.max_stage_tokens
    stage = tuple(sorted(stage.items())) if isinstance(stage, dict) else stage
    return (job.max_tokens, req.temperature or 0.0, req.top_p, stage, req.seed)
