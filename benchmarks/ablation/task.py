"""A synthetic chain task whose stages conflict, plus the tiny model it runs on.

Every question is ``length`` symbols drawn from a small alphabet. Each trained stage
rewrites the *same* question symbols through its own fixed permutation of the alphabet:

    question   c a j f
    analysis   perm_analysis(c) perm_analysis(a) ...      (the same positions,
    guidance   perm_guidance(c) ...                         three different maps)
    answer     perm_answer(c) ...

One adapter serving every stage must therefore map one input symbol to three different
outputs depending on which stage it is in: the conflict MoTE's step experts remove.
The answer depends on the question alone, so it can be produced with the intermediate
stages skipped; a fraction of the training chains skip them (``PLANS``), so the plain
data already contains shorter paths and step skipping adds more of them.

Everything is a pure function of ``seed``: the permutations (``task_seed``), the
questions and the train / held-out split (disjoint question sets).

The tokenizer is word level (one symbol, marker or chat token = one token; whitespace
separates words), so the plugin's chain formatter and Axolotl's chat_template strategy
tokenize the same chain into the same ids, and the stage markers are in the base
vocabulary: no arm adds or trains embedding rows.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("analysis", "guidance", "answer")  # aligncot record keys, template order
PLANS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("analysis", "guidance", "answer"), 0.4),
    (("analysis", "answer"), 0.2),
    (("guidance", "answer"), 0.2),
    (("answer",), 0.2),
)
MARKERS = (
    "<|analysis|>",
    "<|/analysis|>",
    "<|guidance|>",
    "<|/guidance|>",
    "<|response|>",
    "<|/response|>",
    "<|check|>",
    "<|/check|>",
)
_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
_WORDS = ["user", "assistant", "system"]


@dataclass(frozen=True)
class TaskSpec:
    """Sizes of the synthetic task (all arms and seeds share one spec)."""

    alphabet: int = 10
    length: int = 4
    n_train: int = 800
    n_eval: int = 100
    task_seed: int = 1234  # the permutations: the task itself, fixed across seeds

    def symbols(self) -> list[str]:
        return [f"s{i}" for i in range(self.alphabet)]


def stage_maps(spec: TaskSpec) -> dict[str, list[int]]:
    """One random permutation of the alphabet per stage, none equal to another."""
    rng = random.Random(spec.task_seed)
    maps: dict[str, list[int]] = {}
    for stage in STAGES:
        while True:
            perm = list(range(spec.alphabet))
            rng.shuffle(perm)
            if all(perm != p for p in maps.values()):
                maps[stage] = perm
                break
    return maps


def make_split(spec: TaskSpec, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out chain records (aligncot format), disjoint questions."""
    rng = random.Random(seed)
    maps = stage_maps(spec)
    symbols = spec.symbols()
    needed = spec.n_train + spec.n_eval
    if needed > spec.alphabet**spec.length // 2:
        raise ValueError("too few distinct questions for this many records")
    seen: set[tuple[int, ...]] = set()
    questions: list[tuple[int, ...]] = []
    while len(questions) < needed:
        q = tuple(rng.randrange(spec.alphabet) for _ in range(spec.length))
        if q not in seen:
            seen.add(q)
            questions.append(q)
    plans = [p for p, _ in PLANS]
    weights = [w for _, w in PLANS]
    records = []
    for i, q in enumerate(questions):
        plan = rng.choices(plans, weights)[0]
        rec: dict[str, Any] = {
            "id": f"q{i:05d}",
            "prompt": " ".join(symbols[s] for s in q),
        }
        for stage in plan:
            rec[stage] = " ".join(symbols[maps[stage][s]] for s in q)
        records.append(rec)
    return records[: spec.n_train], records[spec.n_train :]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")
    return path


def chat_record(rec: dict, markers: dict[str, tuple[str, str]]) -> dict:
    """The same chain as one assistant message (markers as text), for chat_template."""
    parts = []
    for stage in STAGES:
        if stage in rec:
            start, end = markers[stage]
            parts.append(f"{start} {rec[stage]} {end}")
    return {
        "id": rec["id"],
        "messages": [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": " ".join(parts)},
        ],
    }


def build_tokenizer(spec: TaskSpec):
    """Word-level tokenizer: specials, chat words, markers and the task symbols."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from axolotl_mote.tiny import CHATML_TEMPLATE

    words = _SPECIAL + list(MARKERS) + _WORDS + spec.symbols()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    tok.add_special_tokens(
        [AddedToken(w, normalized=False, special=True) for w in _SPECIAL[:]]
        + [AddedToken(m, normalized=False, special=True) for m in MARKERS]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *MARKERS],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_model(
    out_dir: Path,
    spec: TaskSpec,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """A random tiny Llama over the task tokenizer (idempotent); returns ``out_dir``."""
    from axolotl_mote.tiny import save_random_llama

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    return save_random_llama(
        out,
        build_tokenizer(spec),
        hidden_size=hidden_size,
        num_layers=num_layers,
        seed=seed,
        max_position_embeddings=256,
    )
