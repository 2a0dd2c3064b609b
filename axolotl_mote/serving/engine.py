"""What a per-request-adapter server computes, on the MoTE model itself.

An inference server serving MoTE's exported stage adapters runs *every* token of a
request (prompt, earlier stages, new tokens) through the one adapter the request names.
On the MoTE model that is routing every token to that stage: the exported adapter of
stage k is exactly MoTE's layer with all tokens routed to k (``export.py``), and the
``prompt`` adapter is every token at ``EXPECTED_STEP``. :func:`complete_with_adapter`
does that, so ``axolotl-mote serve`` can answer ``/v1/completions`` the way vLLM would,
and the fidelity measurement can run the stage-switching client without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from axolotl_mote.constants import EXPECTED_STEP

PROMPT_ADAPTER = "prompt"


@dataclass
class Completion:
    token_ids: list[int]  # generated, the stop token excluded
    finish_reason: str  # "stop" | "length"
    stop_token_id: int | None = None  # the stop token that ended it, if one did


class UnknownAdapterError(KeyError):
    """The request names an adapter this model does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def adapter_steps(state: Any) -> dict[str, int]:
    """Adapter name -> the step id every token is routed to: stage names, ``prompt``."""
    names = list(state.config.stage_names) if state.config is not None else []
    out = {name: i for i, name in enumerate(names)}
    out[PROMPT_ADAPTER] = EXPECTED_STEP
    return out


class _BiasProcessor:
    """Adds an OpenAI-style ``logit_bias`` (token id -> bias) to the logits."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


@torch.no_grad()
def complete_with_adapter(
    model: Any,
    adapter: str,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int = 16,
    stop_token_ids: Sequence[int] = (),
    logit_bias: dict[int, float] | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    logits_processor: Sequence[Any] = (),
) -> Completion:
    """Generate from ``prompt_ids`` with every token routed to ``adapter``'s stage.

    ``logits_processor``: run after ``logit_bias`` (the server's per-row control)."""
    from transformers import LogitsProcessorList

    from axolotl_mote.generation.auto import routed_by
    from axolotl_mote.tuner.model import get_routing_state

    steps = adapter_steps(get_routing_state(model))
    if adapter not in steps:
        raise UnknownAdapterError(
            f"unknown adapter {adapter!r}; this model serves {sorted(steps)}"
        )
    step = steps[adapter]
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    processors = LogitsProcessorList()
    if logit_bias:
        processors.append(
            _BiasProcessor({int(k): float(v) for k, v in logit_bias.items()})
        )
    processors.extend(logits_processor)
    stop = stop_ids(model, stop_token_ids)
    sample = temperature > 0
    if sample:
        torch.manual_seed(seed)
    with routed_by(model, lambda i, kwargs: torch.full_like(i, step)):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            eos_token_id=stop or None,
            pad_token_id=stop[0] if stop else 0,
            logits_processor=processors,
        )
    new = out[0, ids.shape[1] :].tolist()
    if stop and new and new[-1] in stop:
        return Completion(new[:-1], "stop", new[-1])
    return Completion(new, "length")


def stop_ids(model: Any, stop_token_ids: Sequence[int] = ()) -> list[int]:
    """Like vLLM: the requested stop tokens, then the model's end of sequence."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    requested = [int(t) for t in stop_token_ids]
    return requested + [t for t in eos if t not in requested]


@torch.no_grad()
def token_logprobs(
    model: Any,
    tokenizer: Any,
    adapter: str,
    prompt_ids: Sequence[int],
    generated: Sequence[int],
    *,
    top: int,
    echo: bool,
) -> dict[str, list]:
    """OpenAI's legacy ``logprobs`` object for ``generated`` (and the prompt with
    ``echo``), from one forward of the whole sequence with every token routed to
    ``adapter``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the ``top`` most
    likely tokens, the chosen one always included) and ``text_offset``. The first
    prompt token has no logprob (``None``), as in OpenAI's and vLLM's replies."""
    from axolotl_mote.generation.auto import routed_by
    from axolotl_mote.tuner.model import get_routing_state

    step = adapter_steps(get_routing_state(model))[adapter]
    ids = list(prompt_ids) + list(generated)
    device = next(model.parameters()).device
    tensor = torch.tensor([ids], dtype=torch.long, device=device)  # [1, L]
    with routed_by(model, lambda i, kwargs: torch.full_like(i, step)):
        logits = model(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits
    logp = torch.log_softmax(logits[0].float(), dim=-1)  # [L, V]
    first = 0 if echo else len(prompt_ids)
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    offset = 0
    for pos in range(first, len(ids)):
        token = ids[pos]
        text = tokenizer.decode([token])
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if pos == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        row = logp[pos - 1]  # [V]: the distribution that predicted ``token``
        out["token_logprobs"].append(float(row[token]))
        best: dict[str, float] = {}
        if top > 0:
            values, indices = row.topk(top)
            best = {
                tokenizer.decode([int(i)]): float(v) for v, i in zip(values, indices)
            }
        best.setdefault(text, float(row[token]))
        out["top_logprobs"].append(best)
    return out
