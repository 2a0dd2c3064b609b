"""Text-generation backends for data generation and LLM judges.

A backend is anything with ``complete(prompts, *, max_new_tokens, seed) -> list[str]``
(:class:`TextGenerator`): one chat (a list of ``{role, content}``) in, one reply out,
in order. Two ship here:

* :class:`HFChatGenerator` — a local Hugging Face causal LM (a path, or a loaded model
  and tokenizer), batched with left padding, greedy unless ``temperature`` is set;
* :class:`OpenAIChatGenerator` — an OpenAI-compatible ``/chat/completions`` endpoint
  (vLLM, TGI, llama.cpp server…), one request per prompt through ``urllib``. It is
  **not exercised by the test suite** (no server offline); it is small on purpose.

Tests pass their own object with the same method (a scripted generator) to drive the
check-then-extend branches deterministically.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

Messages = list[dict[str, str]]


class TextGenerator(Protocol):
    def complete(
        self, prompts: Sequence[Messages], *, max_new_tokens: int, seed: int
    ) -> list[str]:
        """One reply per chat, in order."""


def batch_seed(seed: int, tag: str) -> int:
    """A per-call seed from the run seed and a tag (stage + ids): stable across runs."""
    return (seed * 1_000_003 + zlib.crc32(tag.encode("utf-8"))) % (2**31 - 1)


class HFChatGenerator:
    """A local HF causal LM. ``model`` is a path or a loaded model (then pass
    ``tokenizer``)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        batch_size: int = 8,
        temperature: float | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        device: str | None = None,
        dtype: str = "auto",
        device_map: Any = None,
        load_in_4bit: bool = False,
    ) -> None:
        from transformers import AutoTokenizer

        from axolotl_mote.loading import load_base_model

        if isinstance(model, (str, os.PathLike)):
            path = model
            model = load_base_model(  # refuses a MoTE adapter folder
                path,
                dtype=dtype,
                device=device,
                device_map=device_map,
                load_in_4bit=load_in_4bit,
            )
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        if tokenizer is None:
            raise ValueError("HFChatGenerator: pass the tokenizer with a loaded model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.temperature, self.top_p = batch_size, temperature, top_p
        self.repetition_penalty = repetition_penalty
        self.last_token_counts: list[int] = []  # generated tokens per reply, last call

    def render(self, messages: Messages) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            return list(
                ids["input_ids"]
                if isinstance(ids, dict) or hasattr(ids, "keys")
                else ids
            )
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return tok(text + "Assistant:", add_special_tokens=True)["input_ids"]

    def complete(
        self, prompts: Sequence[Messages], *, max_new_tokens: int = 256, seed: int = 0
    ) -> list[str]:
        import torch

        tok, model = self.tokenizer, self.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(model.parameters()).device
        replies: list[str] = []
        self.last_token_counts = []
        stop = {pad, tok.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        for start in range(0, len(prompts), self.batch_size):
            seqs = [self.render(m) for m in prompts[start : start + self.batch_size]]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):  # left padding: every row ends at `width`
                ids[i, width - len(s) :] = torch.tensor(s)
                mask[i, width - len(s) :] = 1
            sample = bool(self.temperature)
            extra = (
                {"temperature": self.temperature, "top_p": self.top_p} if sample else {}
            )
            extra["repetition_penalty"] = self.repetition_penalty
            torch.manual_seed(batch_seed(seed, str(start)))
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    pad_token_id=pad,
                    **{k: v for k, v in extra.items() if v is not None},
                )
            for row in out[:, width:].tolist():
                n = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
                self.last_token_counts.append(n)
                replies.append(tok.decode(row[:n], skip_special_tokens=True).strip())
        return replies


class OpenAIChatGenerator:
    """An OpenAI-compatible chat endpoint, e.g. ``http://localhost:8000/v1`` (vLLM).

    The API key is read from ``api_key_env`` (default ``OPENAI_API_KEY``) when set;
    local servers usually need none. Untested offline: see docs/self_alignment.md.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.top_p = model, temperature, top_p
        self.api_key_env, self.timeout = api_key_env, timeout

    def complete(
        self, prompts: Sequence[Messages], *, max_new_tokens: int = 256, seed: int = 0
    ) -> list[str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        replies = []
        for i, messages in enumerate(prompts):
            body = {
                "model": self.model,
                "messages": messages,
                "max_tokens": max_new_tokens,
                "temperature": self.temperature or 0.0,
                "seed": batch_seed(seed, str(i)),
            }
            if self.top_p is not None:
                body["top_p"] = self.top_p
            request = urllib.request.Request(
                self.url, json.dumps(body).encode(), headers
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
            replies.append(
                (payload["choices"][0]["message"].get("content") or "").strip()
            )
        return replies


def _as_list(value: Any) -> list:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def build_generator(
    model: str | None = None,
    *,
    endpoint: str | None = None,
    api_model: str | None = None,
    **kwargs: Any,
) -> TextGenerator:
    """A local HF model (``model`` = path) or an endpoint (``endpoint`` +
    ``api_model``)."""
    if endpoint:
        if not api_model:
            raise ValueError("an endpoint needs the served model's name (--api-model)")
        for key in ("batch_size", "device", "dtype", "device_map", "load_in_4bit"):
            kwargs.pop(key, None)
        return OpenAIChatGenerator(endpoint, api_model, **kwargs)
    if not model:
        raise ValueError("give a local model path (--base-model) or an --endpoint")
    return HFChatGenerator(model, **kwargs)


def parse_verdict(text: str | None, labels: dict[str, Sequence[str]]) -> str | None:
    """Map a judge/check reply to one of ``labels`` (name -> accepted words), else None.

    The first word decides (case-insensitive, punctuation stripped: ``"Safe." ->
    SAFE``). Otherwise, if words of exactly one label appear in upper case anywhere in
    the text (``"Verdict: UNSAFE"``), that label; anything else (none, or several) is
    unparseable. Whole words only, so ``SAFE`` never matches inside ``UNSAFE``.
    """
    if not text or not text.strip():
        return None
    first = re.sub(r"[^\w-]", "", text.strip().split()[0]).lower()
    for name, words in labels.items():
        if first in {w.lower() for w in words}:
            return name
    found = {
        name
        for name, words in labels.items()
        for w in words
        if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)
    }
    return found.pop() if len(found) == 1 else None
