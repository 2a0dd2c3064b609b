"""The stage-switching client: MoTE chains from a server with per-request adapters.

Any OpenAI-compatible completions endpoint that picks a LoRA adapter per request (vLLM
``--lora-modules``, SGLang ``--lora-paths``, ``axolotl-mote serve``) can generate MoTE
chains stage by stage, the way ``generate_chains`` does:

1. the prompt is rendered exactly as in training (the template's chat format,
   ``data/format.py``) and sent as token ids, so marker strings in it stay text;
2. the next stage is chosen: *adaptive* — one token from the current adapter (the
   ``prompt`` adapter before any stage), biased onto the start markers the plan rules
   allow (later stages up to the first one that cannot be skipped); *forced* — the next
   stage of the plan;
3. the stage is generated with its own adapter until its end marker (a stop token), or
   its token limit, then step 2 again; after the answer stage the chain ends.

The one approximation is the server's: every token of a request goes through the
request's adapter, so earlier stages are recomputed with the current stage's expert
(docs/serving.md measures what that changes). Requests go through the ``openai``
client with timeouts and retries; a server error is raised as :class:`ServingError`
naming the URL, the adapter and what the server said, never swallowed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from axolotl_mote.endpoints import openai_client, request

#: Bias that makes one of the allowed start markers the next token.
MARKER_BIAS = 100.0


class ServingError(RuntimeError):
    """The server could not be reached, refused the request, or timed out."""


class Backend(Protocol):
    def complete(
        self,
        adapter: str,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        stop_token_ids: list[int],
        logit_bias: dict[int, float] | None = None,
    ) -> tuple[list[int], str]:
        """(generated token ids without the stop token, finish reason)."""


class HTTPBackend:
    """An OpenAI-compatible ``/v1/completions`` endpoint, through the ``openai`` client.

    ``adapter_field``: ``model`` (vLLM, ``axolotl-mote serve``: the adapter is the model
    name) or ``lora_path`` (SGLang: sent in the request body beside ``model``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "EMPTY",
        timeout: float = 60.0,
        max_retries: int = 2,
        adapter_field: str = "model",
        served_model: str | None = None,
    ) -> None:
        if adapter_field not in ("model", "lora_path"):
            raise ValueError("adapter_field must be 'model' or 'lora_path'")
        self.base_url = base_url
        self.api = openai_client(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            needed_by="the stage-switching client",
        )
        self.adapter_field = adapter_field
        self.served_model = served_model

    def complete(self, adapter, prompt_ids, *, max_tokens, stop_token_ids,
                 logit_bias=None):  # fmt: skip
        extra: dict[str, Any] = {
            "stop_token_ids": list(stop_token_ids),
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        model = adapter
        if self.adapter_field == "lora_path":
            extra["lora_path"] = adapter
            model = self.served_model or adapter
        response = request(
            lambda: self.api.completions.create(
                model=model,
                prompt=list(prompt_ids),
                max_tokens=max_tokens,
                temperature=0.0,
                logit_bias={str(k): v for k, v in (logit_bias or {}).items()},
                extra_body=extra,
            ),
            error=ServingError,
            where=self.base_url,
            what=f"the request for adapter {adapter!r}",
        )
        choice = response.choices[0]
        ids = getattr(choice, "token_ids", None)
        if ids is None and choice.model_extra:
            ids = choice.model_extra.get("token_ids")
        if ids is None:
            raise ServingError(
                f"{self.base_url}: the server returned no token ids; use a server "
                "that supports return_token_ids (vLLM >= 0.10, axolotl-mote serve)"
            )
        return [int(t) for t in ids], str(choice.finish_reason)


@dataclass
class ClientChain:
    """One chain generated stage by stage through a server."""

    messages: list[dict[str, str]]
    plan: list[str]
    stages: dict[str, str]
    token_ids: list[int] = field(default_factory=list)  # markers included
    answer: str | None = None
    finish_reason: str = "answer_end"
    fallback_used: bool = False  # the answer stage was opened by the budget rule
    forced_ends: list[str] = field(default_factory=list)  # stages closed by a limit
    forced_plan: list[str] | None = None  # the requested plan (None: adaptive)
    dropped_stages: list[str] = field(default_factory=list)  # forced, not run: budget


class StageClient:
    """Stage-switching generation against a :class:`Backend` (usually HTTP)."""

    def __init__(self, backend: Backend, manifest: dict[str, Any], tokenizer: Any):
        from axolotl_mote.data.format import ChainFormatter
        from axolotl_mote.templates import PromptTemplate

        self.backend = backend
        self.manifest = manifest
        self.template = PromptTemplate.model_validate(manifest["template_data"])
        self.formatter = ChainFormatter(self.template, tokenizer)
        self.tokenizer = tokenizer
        self.stages = manifest["stages"]
        self.answer = next(
            i
            for i, s in enumerate(self.stages)
            if s["name"] == manifest["answer_stage"]
        )

    @classmethod
    def from_bundle(cls, bundle: str | Path, backend: Backend) -> StageClient:
        """A client for a serving bundle folder (its manifest and base tokenizer)."""
        from transformers import AutoTokenizer

        from axolotl_mote.serving.bundle import MANIFEST_NAME

        bundle = Path(bundle)
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        return cls(backend, manifest, AutoTokenizer.from_pretrained(bundle / "base"))

    def _reachable(self, after: int | None) -> list[int]:
        out = []
        for i in range((after + 1) if after is not None else 0, len(self.stages)):
            out.append(i)
            if not self.stages[i]["skippable"]:
                break
        return out

    def generate(
        self,
        prompt: str | list[dict[str, str]],
        plan: Sequence[str] | None = None,
        max_new_tokens: int = 256,
        max_stage_tokens: int | dict[str, int] | None = None,
        answer_reserve: int | None = None,
        stage_reserve: int | None = None,
    ) -> ClientChain:
        """One chain; ``plan``: stage names/keys to force, None lets the model choose.

        ``max_stage_tokens``: a cap for every stage, or per stage by name or record key
        (``{"analysis": 64}``), as ``generate_chains`` takes it.

        The budget follows ``generate_chains``' rules (``generation/plan.py``): the
        answer keeps ``answer_reserve`` tokens (default ``min(32, max_new_tokens //
        4)``) and is opened by the fallback when only that is left; a forced plan
        keeps ``stage_reserve`` content tokens and two markers for each later stage,
        drops the stages that cannot fit (``dropped_stages``), and its first marker
        is free, as ``generate_chains`` pre-fills it."""
        from axolotl_mote.generation import parse_plan
        from axolotl_mote.generation.plan import fit_plan, plan_cost

        messages = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        )
        forced = parse_plan(list(plan) if plan else None, self.template)
        reserve = (
            min(32, max_new_tokens // 4) if answer_reserve is None else answer_reserve
        )
        per_stage = max(1, reserve // 4) if stage_reserve is None else stage_reserve
        names = [s["name"] for s in self.stages]
        ids = self.formatter.prompt_ids(messages)
        chain = ClientChain(messages=messages, plan=[], stages={})
        remaining = max_new_tokens
        if forced is not None:
            chain.forced_plan = [names[s] for s in forced]
            forced, dropped = fit_plan(
                forced, max_new_tokens + 1, self.answer, reserve, per_stage
            )
            chain.dropped_stages = [names[s] for s in dropped]
            chain.fallback_used = bool(dropped)
            remaining += 1  # the first marker is given (generate_chains pre-fills it)
        current: int | None = None
        while remaining > 0:
            if forced is not None:
                pending = [s for s in forced if current is None or s > current]
                while len(pending) > 1 and remaining < plan_cost(
                    pending, self.answer, reserve, per_stage
                ):
                    chain.dropped_stages.append(names[pending.pop(0)])
                    chain.fallback_used = True
                if not pending:
                    break
                nxt = pending[0]
                later = [s for s in pending[1:] if s != self.answer]
            else:
                later = []
                if remaining <= reserve + 1 and self._reachable(current) != [
                    self.answer
                ]:
                    nxt, chain.fallback_used = self.answer, True
                else:
                    nxt = self._choose(ids, current)
            stage = self.stages[nxt]
            ids.append(stage["start_id"])
            chain.token_ids.append(stage["start_id"])
            remaining -= 1
            need = (
                1 if nxt == self.answer else reserve + 2 + len(later) * (per_stage + 2)
            )
            limit = max(0, remaining - need)
            cap = _stage_cap(max_stage_tokens, stage)
            if cap is not None:
                limit = min(limit, cap)
            content, reason = [], "length"
            if limit > 0:
                content, reason = self.backend.complete(
                    stage["adapter"], ids, max_tokens=limit,
                    stop_token_ids=[stage["end_id"]],
                )  # fmt: skip
                content = content[:limit]
            if reason != "stop":
                chain.forced_ends.append(stage["name"])
            ids += content
            chain.token_ids += content
            remaining -= len(content)
            if remaining > 0:  # as generate_chains: no end marker past the budget
                ids.append(stage["end_id"])
                chain.token_ids.append(stage["end_id"])
                remaining -= 1
            text = self.tokenizer.decode(content, skip_special_tokens=True)
            chain.plan.append(stage["name"])
            chain.stages[stage["name"]] = text
            current = nxt
            if nxt == self.answer:
                chain.answer = text
                break
        if chain.answer is None:
            chain.finish_reason = "length"
        return chain

    def _choose(self, ids: list[int], current: int | None) -> int:
        """The next stage, picked by the model among the reachable ones."""
        reachable = self._reachable(current)
        if len(reachable) == 1:
            return reachable[0]
        adapter = (
            self.manifest["prompt_adapter"]
            if current is None
            else self.stages[current]["adapter"]
        )
        bias = {self.stages[i]["start_id"]: MARKER_BIAS for i in reachable}
        token, _ = self.backend.complete(
            adapter, ids, max_tokens=1, stop_token_ids=[], logit_bias=bias
        )
        by_id = {self.stages[i]["start_id"]: i for i in reachable}
        if not token or token[0] not in by_id:
            raise ServingError(
                f"the server ignored logit_bias (token {token[:1]} is not a start "
                f"marker of {[self.stages[i]['name'] for i in reachable]}); force the "
                "stages with a plan"
            )
        return by_id[token[0]]


class LocalBackend:
    """The server's computation in-process (``engine.py``): for tests and fidelity."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def complete(self, adapter, prompt_ids, *, max_tokens, stop_token_ids,
                 logit_bias=None):  # fmt: skip
        from axolotl_mote.serving.engine import complete_with_adapter

        out = complete_with_adapter(
            self.model, adapter, prompt_ids, max_tokens=max_tokens,
            stop_token_ids=stop_token_ids, logit_bias=logit_bias,
        )  # fmt: skip
        return out.token_ids, out.finish_reason


def _stage_cap(limits: int | dict[str, int] | None, stage: dict) -> int | None:
    """The content cap of ``stage``: one number for all, or its entry by name or key."""
    if limits is None or isinstance(limits, int):
        return limits or None
    for name in (stage["name"], stage.get("key")):
        if name in limits:
            return int(limits[name])
    return None
