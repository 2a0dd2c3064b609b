"""Text-generation backends for data generation and LLM judges.

A backend is anything with ``complete(prompts, *, max_new_tokens, seed) -> list[str]``
(:class:`TextGenerator`): one chat (a list of ``{role, content}``) in, one reply out,
in order. Two ship here:

* :class:`HFChatGenerator` — a local Hugging Face causal LM (a path, or a loaded model
  and tokenizer), batched with left padding, greedy unless ``temperature`` is set;
* :class:`OpenAIChatGenerator` — an OpenAI-compatible ``/chat/completions`` endpoint
  (vLLM, TGI, llama.cpp server…) through the ``openai`` package: concurrent requests,
  timeouts, retries with backoff, errors that name the endpoint. Tested against a real
  HTTP server on 127.0.0.1 (``tests/datagen/test_datagen_endpoint.py``).

A generator may also have ``choose(prompts, options) -> list[int]``: constrained
decoding over a closed set of replies (greedy over the options' tokens). The
check-then-extend rule uses it for verdicts, which then always parse.

Tests pass their own object with the same method (a scripted generator) to drive the
check-then-extend branches deterministically.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

from axolotl_mote.endpoints import openai_client, request

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
        self.name = str(getattr(model, "name_or_path", "") or "local model")
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
        self,
        prompts: Sequence[Messages],
        *,
        max_new_tokens: int = 256,
        seed: int = 0,
        prefixes: Sequence[str] | None = None,
    ) -> list[str]:
        """One reply per chat; ``prefixes``: text the reply is made to start with
        (returned as part of it), e.g. an already chosen verdict word."""
        import torch

        tok, model = self.tokenizer, self.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(model.parameters()).device
        replies: list[str] = []
        self.last_token_counts = []
        stop = {pad, tok.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        for start in range(0, len(prompts), self.batch_size):
            seqs = [self.render(m) for m in prompts[start : start + self.batch_size]]
            heads = list(prefixes[start : start + len(seqs)]) if prefixes else []
            for seq, head in zip(seqs, heads):
                seq += tok(head, add_special_tokens=False)["input_ids"] if head else []
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
            for j, row in enumerate(out[:, width:].tolist()):
                n = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
                self.last_token_counts.append(n)
                text = tok.decode(row[:n], skip_special_tokens=True)
                head = heads[j] if j < len(heads) else ""
                replies.append((head + text).strip())
        return replies

    def choose(
        self, prompts: Sequence[Messages], options: Sequence[str], prefix: str = ""
    ) -> list[int]:
        """For each chat, the option greedy decoding picks when only the options'
        tokens may be generated (what ``prefix_allowed_tokens_fn`` does in
        ``generate``).

        All options are run teacher-forced in one batch; then, token by token, the
        likeliest allowed token is taken among the options still consistent with the
        tokens chosen so far (their logits at that position are the same: same
        prefix). The answer is always one of ``options`` (a check's verdict words),
        whatever the model would have written freely, and a multi-token option is not
        penalised for its length. An option that is a prefix of another wins when it
        ends first. ``prefix``: text the reply starts with before the option (e.g.
        ``"Rating: [["``).
        """
        import torch

        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        option_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
        if any(not ids for ids in option_ids):
            raise ValueError(f"every option must tokenize to something: {options}")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        lead = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        out: list[int] = []
        for messages in prompts:
            head = self.render(messages) + lead
            rows = [head + ids for ids in option_ids]
            width = max(len(r) for r in rows)
            batch = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for i, r in enumerate(rows):  # right padding: positions line up per row
                batch[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            with torch.no_grad():
                logits = model(
                    input_ids=batch.to(device), attention_mask=mask.to(device)
                ).logits.float()
            alive, k = list(range(len(options))), 0
            while len(alive) > 1:
                ended = [i for i in alive if len(option_ids[i]) == k]
                if ended:
                    alive = ended[:1]
                    break
                row = logits[alive[0], len(head) - 1 + k]
                best = max({option_ids[i][k] for i in alive}, key=lambda t: row[t])
                alive = [i for i in alive if option_ids[i][k] == best]
                k += 1
            out.append(alive[0])
        return out


class EndpointError(RuntimeError):
    """The endpoint could not be reached, refused a request, or timed out."""


class OpenAIChatGenerator:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, llama.cpp…).

    Through the ``openai`` package: ``concurrency`` requests in flight at once, each
    with ``timeout`` seconds and ``max_retries`` retries with exponential backoff (the
    client's own). A request that still fails raises :class:`EndpointError` naming the
    URL, the model and what the server said; ``generate_data`` has written every batch
    finished before it, so a rerun continues where it stopped. The API key comes from
    ``api_key_env`` (default ``OPENAI_API_KEY``) when set; local servers need none.
    Endpoints cannot constrain decoding: verdicts are parsed from free text, and the
    ones that do not parse are counted (``malformed``).
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
        max_retries: int = 3,
        concurrency: int = 8,
    ) -> None:
        self.base_url, self.model = base_url.rstrip("/"), model
        self.name = f"{model} @ {self.base_url}"
        self.temperature, self.top_p = temperature, top_p
        self.concurrency = max(1, concurrency)
        self.api = openai_client(
            self.base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            timeout=timeout,
            max_retries=max_retries,
            needed_by="an endpoint backend",
        )

    def _one(self, messages: Messages, max_new_tokens: int, seed: int) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_new_tokens,
            "temperature": self.temperature or 0.0,
            "seed": seed,
        }
        if self.top_p is not None:
            body["top_p"] = self.top_p
        reply = request(
            lambda: self.api.chat.completions.create(**body),
            error=EndpointError,
            where=self.name,
            what="a chat completion",
        )
        return (reply.choices[0].message.content or "").strip()

    def complete(
        self,
        prompts: Sequence[Messages],
        *,
        max_new_tokens: int = 256,
        seed: int = 0,
        prefixes: Sequence[str] | None = None,
    ) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        if prefixes and any(prefixes):
            raise ValueError("an endpoint cannot continue a prefilled reply")
        seeds = [batch_seed(seed, str(i)) for i in range(len(prompts))]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(
                pool.map(lambda a: self._one(a[0], max_new_tokens, a[1]),
                         zip(prompts, seeds))
            )  # fmt: skip


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
        kwargs.pop("repetition_penalty", None)
        return OpenAIChatGenerator(endpoint, api_model, **kwargs)
    if not model:
        raise ValueError("give a local model path (--base-model) or an --endpoint")
    for key in ("timeout", "max_retries", "concurrency"):
        kwargs.pop(key, None)
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
