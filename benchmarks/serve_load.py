"""Load test of ``axolotl-mote serve`` on loopback: correctness under concurrency,
throughput, latency, errors, and what batching gains.

A tiny random MoTE model (built in code, CPU) is served on 127.0.0.1 by the real
application (``build_app`` + uvicorn in a thread). For each level of 1, 4 and 16
concurrent clients, every client sends requests for ``--seconds`` seconds, drawn from a
fixed mix: valid chats (half streamed), valid completions, and invalid requests of
several kinds (bad JSON, an unknown role, ``n`` > 1, over the context, a body over the
limit). Every valid reply is checked against the answer computed in-process for its own
prompt (``generate_chains`` / ``complete_with_adapter``, greedy): ``lost`` counts valid
requests without a 200 reply, ``mismatched`` replies that are not their own prompt's
answer (``swapped``: another prompt's). Invalid requests must get their 4xx.

Then the 16-client level runs again against a server with ``--max-batch 1``: the
batching gain is the generated-tokens throughput with batching over without.

    python benchmarks/serve_load.py                 # 3 levels x 6 s + the batch-1 run
    python benchmarks/serve_load.py --seconds 20

The last line printed is a JSON object: ``lost``, ``mismatched``, per level the
throughput (generated tokens/s), p50/p99 latency of valid requests and errors by kind,
and ``batching_gain_16``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers (the tiny MoTE builder)

PROMPTS = [
    f"{q} (case {i})"
    for i, q in enumerate(
        [
            "How do I bake bread at home?",
            "What is the capital of France?",
            "Explain recursion in Python.",
            "How do I kill a stuck process?",
            "Write a haiku about rain.",
            "Why is the sky blue?",
            "How can I learn to swim?",
            "What does a compiler do?",
        ]
        * 3
    )
]
CHAT_TOKENS, COMPLETION_TOKENS = 32, 16


def build(tmp: Path):
    """(model, tokenizer): a tiny random MoTE model with the aligncot template."""
    from transformers import AutoTokenizer

    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.templates import load_template
    from axolotl_mote.tiny import build_tiny_model
    from tests.helpers.tiny import build_mote

    template = load_template("aligncot")
    model_dir = build_tiny_model(tmp / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    add_marker_tokens(tokenizer, template)
    model, _ = build_mote(model_dir, tokenizer, template, prompt_routing="random")
    return model.eval(), tokenizer


def expected(model, tokenizer) -> tuple[dict, dict]:
    """Each prompt's chat answer and completion text, computed in-process."""
    from axolotl_mote.generation import generate_chains
    from axolotl_mote.serving.engine import complete_with_adapter

    chats, completions = {}, {}
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        (out,) = generate_chains(model, tokenizer, messages, max_new_tokens=CHAT_TOKENS)
        chats[prompt] = out.answer or ""
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        done = complete_with_adapter(model, "safe_answer", ids,
                                     max_tokens=COMPLETION_TOKENS)  # fmt: skip
        completions[prompt] = tokenizer.decode(done.token_ids, skip_special_tokens=True)
    return chats, completions


def invalid_requests(limit: int) -> list[tuple[str, str, bytes, int]]:
    """(kind, path, body, expected status)."""
    chat = {"model": "mote", "messages": [{"role": "user", "content": "hi"}]}
    js = json.dumps
    return [
        ("bad_json", "/v1/chat/completions", b'{"model": "mote", "messages": [', 400),
        ("unknown_role", "/v1/chat/completions",
         js({**chat, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
        ("n_2", "/v1/chat/completions", js({**chat, "n": 2}).encode(), 400),
        ("over_context", "/v1/chat/completions",
         js({**chat, "max_tokens": 10**6}).encode(), 400),
        ("too_large", "/v1/completions",
         js({"model": "prompt", "prompt": "x" * (limit + 1)}).encode(), 413),
    ]  # fmt: skip


class Client(threading.Thread):
    def __init__(self, root, until, rng, chats, completions, limit, results):
        super().__init__(daemon=True)
        self.root, self.until, self.rng = root, until, rng
        self.chats, self.completions = chats, completions
        self.bad = invalid_requests(limit)
        self.results = results

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.root, timeout=120) as http:
            while time.monotonic() < self.until:
                roll = self.rng.random()
                start = time.monotonic()
                try:
                    if roll < 0.2:
                        record = self.invalid(http)
                    elif roll < 0.35:
                        record = self.completion(http)
                    else:
                        record = self.chat(http, stream=roll < 0.675)
                except Exception as err:  # noqa: BLE001 - counted, not raised
                    record = {"valid": roll >= 0.2, "error": type(err).__name__}
                record["latency"] = time.monotonic() - start
                self.results.append(record)

    def invalid(self, http) -> dict:
        kind, path, body, status = self.rng.choice(self.bad)
        reply = http.post(path, content=body,
                          headers={"content-type": "application/json"})  # fmt: skip
        ok = reply.status_code == status and "error" in reply.json()
        return {"valid": False, "kind": kind, "error": None if ok else
                f"{kind}: got {reply.status_code}"}  # fmt: skip

    def completion(self, http) -> dict:
        prompt = self.rng.choice(PROMPTS)
        reply = http.post("/v1/completions", json={
            "model": "safe_answer", "prompt": prompt, "max_tokens": COMPLETION_TOKENS,
            "temperature": 0,
        })  # fmt: skip
        if reply.status_code != 200:
            return {"valid": True, "error": f"completion {reply.status_code}"}
        body = reply.json()
        text = body["choices"][0]["text"]
        return self.check(prompt, text, self.completions, body["usage"])

    def chat(self, http, stream: bool) -> dict:
        prompt = self.rng.choice(PROMPTS)
        body = {"model": "mote", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": CHAT_TOKENS, "temperature": 0}  # fmt: skip
        if not stream:
            reply = http.post("/v1/chat/completions", json=body)
            if reply.status_code != 200:
                return {"valid": True, "error": f"chat {reply.status_code}"}
            data = reply.json()
            text = data["choices"][0]["message"]["content"]
            return self.check(prompt, text, self.chats, data["usage"])
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        text, usage = "", None
        with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                return {"valid": True, "error": f"stream {reply.status_code}"}
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    text += chunk["choices"][0]["delta"].get("content") or ""
                usage = chunk.get("usage") or usage
        return self.check(prompt, text, self.chats, usage)

    @staticmethod
    def check(prompt, text, table, usage) -> dict:
        out = {"valid": True, "tokens": (usage or {}).get("completion_tokens", 0)}
        if text != table[prompt]:
            swapped = any(
                text == v for k, v in table.items() if table[k] != table[prompt]
            )
            out["error"] = "swapped" if swapped else "mismatched"
        return out


def run_level(root, clients, seconds, chats, completions, limit, seed) -> dict:
    results: list = []
    until = time.monotonic() + seconds
    threads = [Client(root, until, random.Random(seed + i), chats, completions, limit,
                      results) for i in range(clients)]  # fmt: skip
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    valid = [r for r in results if r["valid"]]
    good = [r for r in valid if not r.get("error")]
    lat = sorted(r["latency"] for r in good)
    errors = Counter(r["error"].split(":")[0] for r in results if r.get("error"))
    return {
        "clients": clients,
        "requests": len(results),
        "valid": len(valid),
        "invalid_refused_correctly": sum(
            1 for r in results if not r["valid"] and not r.get("error")
        ),
        "lost": sum(
            1 for r in valid if r.get("error") not in (None, "mismatched", "swapped")
        ),  # fmt: skip
        "mismatched": sum(
            1 for r in valid if r.get("error") in ("mismatched", "swapped")
        ),
        "swapped": sum(1 for r in valid if r.get("error") == "swapped"),
        "tokens_per_s": round(sum(r.get("tokens", 0) for r in good) / wall, 1),
        "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3)
        if lat
        else None,
        "errors": dict(errors),
    }


def serve(model, tokenizer, max_batch: int, limit: int):
    from axolotl_mote.serving.server import MoteWorker, ServerThread, build_app

    worker = MoteWorker(model, tokenizer, max_batch=max_batch, batch_wait=0.02,
                        max_queue=256)  # fmt: skip
    return worker, ServerThread(build_app(worker, max_body_bytes=limit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per level")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    limit = 64 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build(Path(tmp))
    chats, completions = expected(model, tokenizer)
    levels = [int(x) for x in args.levels.split(",")]
    report: dict = {"levels": {}}
    worker, thread = serve(model, tokenizer, args.max_batch, limit)
    with thread:
        for clients in levels:
            level = run_level(thread.root, clients, args.seconds, chats, completions,
                              limit, args.seed)  # fmt: skip
            report["levels"][clients] = level
            print(json.dumps(level), flush=True)
    batches = list(worker.batches)
    worker.close()
    top = max(levels)
    single, thread = serve(model, tokenizer, 1, limit)
    with thread:
        unbatched = run_level(thread.root, top, args.seconds, chats, completions,
                              limit, args.seed)  # fmt: skip
    single.close()
    print(json.dumps({"max_batch_1": unbatched}), flush=True)
    batched = report["levels"][top]
    report |= {
        "lost": sum(v["lost"] for v in report["levels"].values()) + unbatched["lost"],
        "mismatched": sum(v["mismatched"] for v in report["levels"].values())
        + unbatched["mismatched"],
        f"tokens_per_s_{top}": batched["tokens_per_s"],
        f"p50_s_{top}": batched["p50_s"],
        f"p99_s_{top}": batched["p99_s"],
        f"tokens_per_s_{top}_max_batch_1": unbatched["tokens_per_s"],
        f"batching_gain_{top}": round(
            batched["tokens_per_s"] / max(unbatched["tokens_per_s"], 1e-9), 2
        ),
        "mean_chat_batch": round(sum(batches) / max(len(batches), 1), 2),
        "seconds_per_level": args.seconds,
        "torch_threads": args.threads,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
