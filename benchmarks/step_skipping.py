"""Train-step time of step skipping against plain causal attention, at any length.

One random Llama (hidden 512, 4 layers, fp32; PEFT LoRA r=16 on all 7 linear layers, as
MoTE trains), one batch of ``--batch`` chains of ``--seq`` tokens, each
question | analysis | guidance | answer (1/8, 5/16, 1/4, 5/16 of the tokens). A train
step is forward + backward + AdamW on the same chains:

* ``causal``      plain causal attention (sdpa's ``is_causal`` fast path);
* ``skip``        step skipping, p = 0.5 drawn every step, as MoTE trains by default
                  under sdpa: causal attention over gathered key regions
                  (``axolotl_mote/attention.py``), no ``T x T`` mask;
* ``skip_dense``  the same draws through the dense ``[B, 1, T, T]`` step mask (the
                  reference; ``mote.step_skip_attention: dense``);
* ``explicit``    the conventional way (paper, Appendix B): every chain *and* its 7
                  skipped or partial variants, D_extra_1 = {QA, QAG} and
                  D_extra_2 = {QG, QG·Ans, QA·Ans, Q·Ans}, each its own sequence
                  (``--explicit``; slow at long lengths, off by default);
* ``packed_sdpa``     four chains of ``seq / 4`` tokens packed per row, plain sdpa (the
                      block-diagonal mask transformers builds for packed rows);
* ``packed_regions``  the same packed rows with step skipping p = 0.5 as regions.

Variants run interleaved (one step of each per round, in process CPU time) so that load
from other processes hits all alike; each round's ratio is paired with the same round's
``causal`` (or ``packed_sdpa``) step and the median over rounds is reported. The last
line is one JSON object: ``skip_vs_causal`` (target <= 1.10), ``skip_dense_vs_causal``,
``packed_regions_vs_packed_sdpa`` and, with ``--explicit``, ``skip_vs_explicit``.

    python benchmarks/step_skipping.py --seq 2048 --batch 1
    python benchmarks/step_skipping.py --seq 4096 --batch 1
    python benchmarks/step_skipping.py --quick          # small shapes, smoke test
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
from axolotl_mote.attention import regions_active, register  # noqa: E402
from axolotl_mote.constants import PROMPT_STEP  # noqa: E402
from axolotl_mote.masks import step_skipping  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: sixteenths of a chain: Q, analysis, guidance, answer
FRACTIONS = {PROMPT_STEP: 2, 0: 5, 1: 4, 2: 5}
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
SKIP = dict(hideable=[0, 1], p=0.5, marker_ids=None, markers_visible=False)


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
        max_position_embeddings=max(4096, args.seq),
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    if not args.full:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
        )
    return model.train()


def chain_steps(length: int) -> torch.Tensor:
    lengths = {s: length * f // 16 for s, f in FRACTIONS.items()}
    lengths[2] += length - sum(lengths.values())
    return torch.cat([torch.full((lengths[s],), s) for s in FRACTIONS])  # [T]


def make_batch(args: argparse.Namespace, packed: bool):
    """(input_ids, step_ids, position_ids), each [batch, seq]."""
    if packed:
        n = args.seq // 4
        steps = torch.cat([chain_steps(n)] * 4)
        pos = torch.arange(n).repeat(4)
    else:
        steps, pos = chain_steps(args.seq), torch.arange(args.seq)
    steps = steps.expand(args.batch, -1).clone()
    pos = pos.expand(args.batch, -1).clone()
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 8000, steps.shape, generator=gen), steps, pos


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def step_plain(model, ids, steps, pos, i) -> None:
    _base(model).set_attn_implementation("sdpa")
    model(input_ids=ids, position_ids=pos, labels=ids).loss.backward()


def step_regions(model, ids, steps, pos, i) -> None:
    _base(model).set_attn_implementation(register())
    gen = torch.Generator().manual_seed(i)
    batch, plan = step_skipping(
        {"input_ids": ids, "position_ids": pos, "labels": ids},
        step_ids=steps, generator=gen, shift_positions=False, regions=True, **SKIP,
    )  # fmt: skip
    with regions_active(plan):
        model(**batch).loss.backward()


def step_dense(model, ids, steps, pos, i) -> None:
    _base(model).set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(i)
    batch, _ = step_skipping(
        {"input_ids": ids, "position_ids": pos, "labels": ids},
        step_ids=steps, generator=gen, shift_positions=False,
        attn_implementation="sdpa", **SKIP,
    )  # fmt: skip
    model(**batch).loss.backward()


def step_explicit(model, ids, steps, pos, i) -> None:
    _base(model).set_attn_implementation("sdpa")
    for keep in VARIANTS:
        cols = torch.isin(steps[0], torch.tensor(keep))  # same layout in every row
        sub = ids[:, cols]  # [B, T_variant]
        (model(input_ids=sub, labels=sub).loss / len(VARIANTS)).backward()


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
    parser.add_argument("--explicit", action="store_true", help="also time explicit")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.seq, args.steps, args.warmup = 128, 2, 128, 2, 1
    torch.set_num_threads(args.threads)
    model = build_model(args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    single, packed = make_batch(args, False), make_batch(args, True)
    variants = {
        "causal": (step_plain, single),
        "skip": (step_regions, single),
        "skip_dense": (step_dense, single),
        "packed_sdpa": (step_plain, packed),
        "packed_regions": (step_regions, packed),
    }
    if args.explicit:
        variants["explicit"] = (step_explicit, single)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(args.warmup + args.steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn, batch = variants[name]
            start = time.process_time()
            fn(model, *batch, i)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(time.process_time() - start)

    def paired(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)

    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"shape: hidden {args.hidden}, layers {args.layers}, seq {args.seq}, batch "
        f"{args.batch}, {'full' if args.full else 'LoRA r=16'}, fp32, threads "
        f"{args.threads}, torch {torch.__version__}, {args.steps} timed rounds"
    )
    print(f"{'variant':>15} | {'step ms':>9} | {'÷ causal':>8}")
    for name in variants:
        print(f"{name:>15} | {med[name] * 1000:9.1f} | {paired(name, 'causal'):8.3f}")
    result = {
        "skip_vs_causal": paired("skip", "causal"),
        "skip_dense_vs_causal": paired("skip_dense", "causal"),
        "packed_regions_vs_packed_sdpa": paired("packed_regions", "packed_sdpa"),
        "packed_sdpa_vs_causal": paired("packed_sdpa", "causal"),
        "step_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    if args.explicit:
        result["skip_vs_explicit"] = paired("skip", "explicit")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
