"""Train-step time of step skipping (4D mask) vs plain causal vs explicit skipped
variants.

One random Llama (hidden 512, 4 layers, fp32, sdpa; PEFT LoRA r=16 on all 7 linear
layers, as MoTE trains), one batch of ``--batch`` chains of ``--seq`` tokens, each
question | analysis | guidance | answer (1/8, 5/16, 1/4, 5/16 of the tokens). A train
step is forward + backward + AdamW on the same chains, three ways:

* ``causal``    the chains with plain causal attention (sdpa's ``is_causal`` fast path);
* ``skip``      the chains with ``mote.step_skip_prob`` 0.5: the step-skipping mask is
                built every step (``apply_step_skipping``) and passed as a 4D bool mask;
* ``explicit``  the conventional way (paper, Appendix B): every chain *and* its 7
                skipped or partial variants, D_extra_1 = {QA, QAG} and
                D_extra_2 = {QG, QG·Ans, QA·Ans, Q·Ans}, each its own sequence.
                Variants of one kind have one length, so each kind is one
                unpadded causal micro-batch; gradients accumulate over the 8
                micro-batches, then one AdamW step.

Variants run interleaved (one step of each per round) so that load from other processes
hits all three alike; the median over rounds after warm-up is reported. The last line is
one JSON object with the time ratios ``skip_vs_causal`` and ``skip_vs_explicit``.

    python benchmarks/step_skipping.py            # default (~1.5 min on 2 cores)
    python benchmarks/step_skipping.py --quick    # small shapes, smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from axolotl_mote.constants import PROMPT_STEP  # noqa: E402
from axolotl_mote.masks import apply_step_skipping  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FRACTIONS = {
    PROMPT_STEP: 2,
    0: 5,
    1: 4,
    2: 5,
}  # sixteenths: Q, analysis, guidance, answer
#: the explicit datasets, as the stages each variant keeps (D_train, D_extra_1,
#: D_extra_2)
VARIANTS = [
    (PROMPT_STEP, 0, 1, 2),
    (PROMPT_STEP, 0),
    (PROMPT_STEP, 0, 1),
    (PROMPT_STEP, 1),
    (PROMPT_STEP, 1, 2),
    (PROMPT_STEP, 0, 2),
    (PROMPT_STEP, 2),
]


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    if not args.full:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
        )
    return model.train()


def make_chains(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, step_ids), both [batch, seq]."""
    lengths = {s: args.seq * f // 16 for s, f in FRACTIONS.items()}
    lengths[2] += args.seq - sum(lengths.values())
    steps = torch.cat([torch.full((lengths[s],), s) for s in FRACTIONS])  # [T]
    steps = steps.expand(args.batch, -1).clone()  # [B, T]
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 8000, steps.shape, generator=gen), steps


def step_causal(model, ids, steps, args, i) -> int:
    model(input_ids=ids, labels=ids).loss.backward()
    return ids.numel()


def step_skip(model, ids, steps, args, i) -> int:
    batch = apply_step_skipping(
        {"input_ids": ids, "labels": ids},
        step_ids=steps,
        hideable=[0, 1],
        p=0.5,
        generator=torch.Generator().manual_seed(i),
        marker_ids=None,
        markers_visible=False,
        shift_positions=False,
        attn_implementation="sdpa",
    )
    model(**batch).loss.backward()
    return ids.numel()


def step_explicit(model, ids, steps, args, i) -> int:
    tokens = 0
    for keep in VARIANTS:
        cols = torch.isin(steps[0], torch.tensor(keep))  # same layout in every row
        sub = ids[:, cols]  # [B, T_variant]
        (model(input_ids=sub, labels=sub).loss / len(VARIANTS)).backward()
        tokens += sub.numel()
    return tokens


def step_mask_only(ids, steps, i) -> None:
    apply_step_skipping(
        {"input_ids": ids},
        step_ids=steps,
        hideable=[0, 1],
        p=0.5,
        generator=torch.Generator().manual_seed(i),
        marker_ids=None,
        markers_visible=False,
        shift_positions=False,
        attn_implementation="sdpa",
    )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


STEPS = {"causal": step_causal, "skip": step_skip, "explicit": step_explicit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="full fine-tune, not LoRA")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.seq, args.steps, args.warmup = 128, 2, 128, 2, 1
    torch.set_num_threads(args.threads)
    model = build_model(args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids, steps = make_chains(args)
    times: dict[str, list[float]] = {name: [] for name in STEPS}
    tokens: dict[str, int] = {}
    for i in range(args.warmup + args.steps):
        for name, fn in STEPS.items():
            start = time.perf_counter()
            tokens[name] = fn(model, ids, steps, args, i)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    mask_ms = 1000 * statistics.median(
        _timed(lambda k=k: step_mask_only(ids, steps, k)) for k in range(5)
    )
    print(
        f"shape: hidden {args.hidden}, layers {args.layers}, seq {args.seq}, batch "
        f"{args.batch}, {'full' if args.full else 'LoRA r=16'}, fp32, sdpa, threads "
        f"{args.threads}, torch {torch.__version__}, {args.steps} timed rounds"
    )
    print(f"{'variant':>9} | {'step ms':>9} | {'tokens/step':>11} | {'÷ causal':>8}")
    for name in STEPS:
        print(
            f"{name:>9} | {med[name] * 1000:9.1f} | {tokens[name]:11d} | "
            f"{med[name] / med['causal']:8.3f}"
        )
    print(f"building the mask alone (apply_step_skipping): {mask_ms:.2f} ms per batch")
    result = {
        "skip_vs_causal": round(med["skip"] / med["causal"], 3),
        "skip_vs_explicit": round(med["skip"] / med["explicit"], 3),
        "step_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "tokens_per_step": tokens,
        "mask_build_ms": round(mask_ms, 2),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
