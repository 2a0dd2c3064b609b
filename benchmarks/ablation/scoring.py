"""Held-out measurements, computed the same way for every arm.

* **per-stage loss**: one teacher-forced forward over the held-out chains; the loss of a
  target token belongs to the stage of that token (its start marker included, the final
  ``<|im_end|>`` with the answer), as in the trainer's ``loss_<stage>`` logs.
* **per-stage exact match** (teacher-forced stage prefix): the context is the question,
  the record's gold earlier stages and the stage's start marker; greedy decoding of
  ``length + 1`` tokens must reproduce the stage's symbols and its end marker exactly.
* **skipped-inference answer accuracy**: the context is the question and the answer's
  start marker only (the forced plan *answer only*, what ``generate_chains(...,
  plan=["answer"])`` pre-fills); greedy decoding must reproduce the answer.

Both arms' kinds decode with ``model.generate`` (greedy, KV cache, left padding). A MoTE
model runs with the generation API's marker router installed
(:func:`axolotl_mote.generation.install_router`), so every token is routed by the stage
it belongs to, exactly as in ``generate_chains``; a single LoRA needs no routing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.ablation.task import STAGES


def load_arm(model_dir: Path, adapter_dir: Path, mote: bool):
    """(model, tokenizer) of a trained arm, in eval mode; MoTE with its router."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if mote:
        from axolotl_mote.generation import install_router
        from axolotl_mote.loading import load_mote_model

        model, tokenizer = load_mote_model(model_dir, adapter_dir)
        install_router(model, tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, tokenizer


def encode(records: list[dict], tokenizer: Any) -> list[dict[str, Any]]:
    """Per record: prompt ids, and per present stage its (start, content, end) ids."""
    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.templates import load_template

    template = load_template("aligncot")
    fmt = ChainFormatter(template, tokenizer)
    pieces = {p.key: p for p in fmt.pieces}
    out = []
    for rec in records:
        prefix, suffix = fmt.render([{"role": "user", "content": rec["prompt"]}])
        item = {
            "prompt": tokenizer(prefix, add_special_tokens=False)["input_ids"],
            "suffix": tokenizer(suffix, add_special_tokens=False)["input_ids"],
            "stages": {},
        }
        for key in STAGES:
            if key in rec:
                ids = tokenizer(rec[key], add_special_tokens=False)["input_ids"]
                item["stages"][key] = (pieces[key].start_id, ids, pieces[key].end_id)
        out.append(item)
    return out


def full_sequence(item: dict) -> tuple[list[int], list[str | None]]:
    """Token ids of the whole chain and the stage owning each token (None: prompt)."""
    ids, owner = list(item["prompt"]), [None] * len(item["prompt"])
    last = None
    for key in STAGES:
        if key in item["stages"]:
            start, content, end = item["stages"][key]
            seg = [start, *content, end]
            ids += seg
            owner += [key] * len(seg)
            last = key
    ids += item["suffix"]
    owner += [last] * len(item["suffix"])
    return ids, owner


@torch.no_grad()
def stage_losses(
    model: Any, items: list[dict], pad_id: int, batch: int = 64
) -> dict[str, float]:
    """Mean next-token loss per stage over the held-out chains (teacher forced)."""
    total = dict.fromkeys(STAGES, 0.0)
    count = dict.fromkeys(STAGES, 0)
    for lo in range(0, len(items), batch):
        seqs = [full_sequence(it) for it in items[lo : lo + batch]]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (s, _) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        # the transformers model itself: PEFT's forward calls its .forward directly,
        # which would skip the hook where the MoTE marker router runs
        out = model.get_base_model()(input_ids=ids, attention_mask=mask)
        logits = out.logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        )  # [B, T-1]: position t predicts token t+1
        for i, (s, owner) in enumerate(seqs):
            for t in range(1, len(s)):
                key = owner[t]
                if key is not None:
                    total[key] += float(nll[i, t - 1])
                    count[key] += 1
    return {k: total[k] / count[k] if count[k] else math.nan for k in STAGES}


@torch.no_grad()
def greedy(
    model: Any, contexts: list[list[int]], n_new: int, pad_id: int, batch: int = 128
) -> list[list[int]]:
    """Greedy continuation of ``n_new`` tokens for every context (left padded)."""
    outs: list[list[int]] = []
    for lo in range(0, len(contexts), batch):
        chunk = contexts[lo : lo + batch]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(chunk):
            ids[i, width - len(c) :] = torch.tensor(c)
            mask[i, width - len(c) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=None,
        )
        outs += gen[:, width:].tolist()
    return outs


def exact_match(model: Any, items: list[dict], pad_id: int) -> dict[str, float]:
    """Per-stage exact match with the gold earlier stages as context, and the
    skipped-inference answer accuracy (``answer_skipped``)."""
    contexts: dict[str, list[list[int]]] = {k: [] for k in (*STAGES, "answer_skipped")}
    targets: dict[str, list[list[int]]] = {k: [] for k in contexts}
    for it in items:
        context = list(it["prompt"])
        for key in STAGES:
            if key not in it["stages"]:
                continue
            start, content, end = it["stages"][key]
            contexts[key].append(context + [start])
            targets[key].append([*content, end])
            context = context + [start, *content, end]
        start, content, end = it["stages"]["answer"]
        contexts["answer_skipped"].append(list(it["prompt"]) + [start])
        targets["answer_skipped"].append([*content, end])
    scores = {}
    for key, ctx in contexts.items():
        if not ctx:
            scores[key] = math.nan
            continue
        n_new = max(len(t) for t in targets[key])
        got = greedy(model, ctx, n_new, pad_id)
        hits = sum(g[: len(t)] == t for g, t in zip(got, targets[key]))
        scores[key] = hits / len(ctx)
    return scores


def score_arm(
    model_dir: Path, adapter_dir: Path, mote: bool, records: list[dict]
) -> dict:
    """All held-out measurements of one trained arm."""
    model, tokenizer = load_arm(model_dir, adapter_dir, mote)
    items = encode(records, tokenizer)
    pad_id = tokenizer.pad_token_id
    out = {f"loss_{k}": v for k, v in stage_losses(model, items, pad_id).items()}
    out.update({f"em_{k}": v for k, v in exact_match(model, items, pad_id).items()})
    return out
