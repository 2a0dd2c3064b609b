"""Train-step time and peak memory of MoTE routing vs plain PEFT LoRA, in one run.

Variants, same random Llama (hidden 1024, 4 layers, seq 512, batch 2, fp32, sdpa), all 7
linear layers targeted, same batches:

* ``lora_r``   one PEFT LoRA of rank r
* ``lora_4r``  one PEFT LoRA of rank 4r (equal parameters to MoTE with 3 experts +
  shared)
* ``mote``     MoTE: 3 step experts + shared expert, rank r each (rank blocks + mask)
* ``naive``    the naive per-expert loop (separate experts, gather + index_add)

Each variant runs in its own process (peak RSS is per process), sequentially. A train
step is forward + backward + AdamW; the median of the timed steps after warm-up is
reported. The last printed line is one JSON object with the ratios.

    python benchmarks/routing_overhead.py            # full size (~3 min on 2 cores)
    python benchmarks/routing_overhead.py --quick    # small shapes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(variant: str, args: argparse.Namespace):
    import torch
    from peft import LoraConfig, get_peft_model
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
    r = args.rank
    steps = make_steps(args)
    if variant in ("lora_r", "lora_4r"):
        rank = r if variant == "lora_r" else 4 * r
        model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        )
        return model, None, steps
    if variant == "mote":
        from axolotl_mote.tuner.config import MoteConfig
        from axolotl_mote.tuner.model import attach_mote

        mote = MoteConfig(
            stage_names=["a", "g", "ans"], expert_rank=r, prompt_routing="random"
        )
        model = get_peft_model(
            model,
            LoraConfig(
                r=r,
                lora_alpha=2 * r,
                target_modules=TARGETS,
                **mote.peft_kwargs(lora_alpha=2 * r),
            ),
        )
        return model, attach_mote(model, mote), steps
    if variant == "naive":
        from axolotl_mote.tuner.reference import NaiveMoteLinear, expert_per_token

        for p in model.parameters():
            p.requires_grad_(False)
        naive_layers = []
        for _name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name in TARGETS and isinstance(child, torch.nn.Linear):
                    layer = NaiveMoteLinear(child, 3, r, scaling=2.0, alpha=0.5)
                    setattr(module, child_name, layer)
                    naive_layers.append(layer)
        experts = expert_per_token(steps, 2)
        for layer in naive_layers:
            layer.expert_ids = experts
        return model, None, steps
    raise ValueError(variant)


def make_steps(args):
    """A packed-looking batch: per row, question then three stages, repeated."""
    import torch

    b, t = args.batch, args.seq
    steps = torch.empty(b, t, dtype=torch.long)
    pattern = [-2] * 24 + [0] * 40 + [1] * 40 + [2] * 24
    for row in range(b):
        steps[row] = torch.tensor((pattern * (t // len(pattern) + 1))[:t])
    return steps


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, state, steps = build(variant, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8000, (args.batch, args.seq), generator=gen)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        if state is not None:
            state.set(steps, draw_key=i)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if state is not None:
            state.clear()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "step_s": statistics.median(times),
        "peak_rss_mb": peak_kb / 1024,
        "trainable_params": sum(p.numel() for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.seq, args.steps, args.warmup = 128, 2, 128, 2, 1
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    results = {}
    passthrough = [a for a in sys.argv[1:] if a != "--quick"]
    if args.quick:
        passthrough += [
            "--hidden",
            "128",
            "--layers",
            "2",
            "--seq",
            "128",
            "--steps",
            "2",
            "--warmup",
            "1",
        ]
    for variant in ("lora_r", "lora_4r", "mote", "naive"):
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, *passthrough],
            check=True,
            capture_output=True,
            text=True,
            env=dict(os.environ),
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(
            f"{variant:>8}: step {r['step_s'] * 1000:8.1f} ms   peak RSS "
            f"{r['peak_rss_mb']:8.0f} MB   trainable {r['trainable_params']:,}",
            flush=True,
        )
    base, wide = results["lora_r"], results["lora_4r"]
    ratios = {
        "mote_vs_lora_r": round(results["mote"]["step_s"] / base["step_s"], 3),
        "mote_vs_lora_4r": round(results["mote"]["step_s"] / wide["step_s"], 3),
        "naive_vs_lora_r": round(results["naive"]["step_s"] / base["step_s"], 3),
        "mem_mote_vs_lora_r": round(
            results["mote"]["peak_rss_mb"] / base["peak_rss_mb"], 3
        ),
    }
    print(
        f"shape: hidden {args.hidden}, layers {args.layers}, seq {args.seq}, "
        f"batch {args.batch}, rank {args.rank}, threads {args.threads}"
    )
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
