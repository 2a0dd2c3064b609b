"""Train-step time of MoTE routing vs plain PEFT LoRA: paired, interleaved, one process.

Variants, on the same random Llama (fp32, sdpa, all 7 linear layers targeted), same
batches:

* ``lora_r``   one PEFT LoRA of rank r
* ``lora_4r``  one PEFT LoRA of rank 4r (equal parameters to MoTE with 3 experts +
  shared)
* ``mote``     MoTE: 3 step experts + shared expert, rank r each (MoteVariant, masked
  path, fused: scaling in the rank mask, ``result + delta`` as one ``addmm``)
* ``mote_module`` the same in PEFT's module form, ``result + lora_B(h * mask) *
  scaling`` (``RoutingState.fast_path`` off; what MoteVariant did before the fusion)
* ``naive``    the naive per-expert loop (separate experts, gather + index_add); only
  with ``--naive`` (it is the slowest step and not part of any headline ratio)

All variants live in one process and take turns: each round runs one train step
(forward + backward + AdamW) of every variant, timed in process CPU time (what other
tenants of a shared machine do stretches wall time, not the work). The order is
``VARIANTS`` in even rounds and reversed in odd ones, so the pairs that matter most
(``lora_r`` / ``mote``, ``mote`` / ``mote_module``) always run back to back, each going
first half the time. The ratio of a round is MoTE's step over ``lora_r``'s step of the
*same* round, so the machine's drift cancels; the reported ratio is the median over
rounds (15 by default: on a shared machine the rounds' ratios scatter by ±0.1, and
the median of 9 still moved by ±0.03 between runs), with the spread (interquartile
range). Two widths by default: hidden 1,024
(4 layers) and hidden 4,096 (an 8B layer; 1 layer, shorter sequence to fit the time).
The last line is one JSON object: ``mote_vs_lora_r`` (hidden 1,024),
``mote_vs_lora_r_4096``, their spreads, and the other ratios.

Memory: after the timed rounds, each variant runs two train steps alone in a fresh
process (``--memory-probe``), which reports its peak resident set (``ru_maxrss``) and
its resident set once the model is built. ``mem_mote_vs_lora_r`` is the ratio of the
peaks; ``step_mem_mote_vs_lora_r`` the ratio of what the train steps add on top of the
built model (activations, gradients, optimizer state), where routing's extra memory
shows.

    python benchmarks/routing_overhead.py          # both widths, ~10 min on 2 cores
    python benchmarks/routing_overhead.py --hidden 1024   # the headline shape, ~4 min
    python benchmarks/routing_overhead.py --quick    # small shapes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    if variant in ("mote", "mote_module"):
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
        state = attach_mote(model, mote)
        state.fast_path = variant == "mote"  # off: PEFT's module form, unfused
        return model, state, steps
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


def one_step(model, state, steps, ids, opt, key: int) -> None:
    if state is not None:
        state.set(steps, draw_key=key)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if state is not None:
        state.clear()


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: build one variant, run two steps, print its RSS figures (KiB)."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    model, state, steps = build(args.memory_probe, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 8000, (args.batch, args.seq))
    built = _rss_kib()
    for key in range(2):
        one_step(model, state, steps, ids, opt, key=key)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"built_kib": built, "peak_kib": peak}))


def _rss_kib() -> int:
    """Current resident set in KiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def measure_memory(args: argparse.Namespace, variants: list[str]) -> dict:
    """Peak RSS of each variant in its own process; ratios against ``lora_r``."""
    import subprocess
    import sys

    figures = {}
    for variant in variants:
        cmd = [
            sys.executable, __file__, "--memory-probe", variant,
            "--hidden", str(args.hidden), "--layers-seq", str(args.layers),
            str(args.seq), "--batch", str(args.batch), "--rank", str(args.rank),
            "--threads", str(args.threads),
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        figures[variant] = json.loads(out.strip().splitlines()[-1])
    base = figures["lora_r"]
    result = {"peak_mib": {v: f["peak_kib"] // 1024 for v, f in figures.items()}}
    for variant in variants:
        if variant == "lora_r":
            continue
        f = figures[variant]
        result[f"mem_{variant}_vs_lora_r"] = round(f["peak_kib"] / base["peak_kib"], 3)
        step = f["peak_kib"] - f["built_kib"]
        base_step = base["peak_kib"] - base["built_kib"]
        result[f"step_mem_{variant}_vs_lora_r"] = round(step / base_step, 3)
    return result


def measure(args: argparse.Namespace) -> dict:
    """Interleaved rounds of every variant at one shape; paired per-round ratios."""
    import torch

    torch.set_num_threads(args.threads)
    variants = VARIANTS + (["naive"] if args.naive else [])
    runs = {}
    for variant in variants:
        model, state, steps = build(variant, args)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[variant] = (model, state, steps, torch.optim.AdamW(params, lr=1e-4))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8000, (args.batch, args.seq), generator=gen)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.warmup + args.rounds):
        order = variants if i % 2 == 0 else variants[::-1]
        for variant in order:
            model, state, steps, opt = runs[variant]
            start = time.process_time()
            one_step(model, state, steps, ids, opt, key=i)
            if i >= args.warmup:
                times[variant].append(time.process_time() - start)

    def paired(a: str, b: str) -> tuple[float, float]:
        ratios = [x / y for x, y in zip(times[a], times[b])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        return round(statistics.median(ratios), 3), round(q[2] - q[0], 3)

    out = {"ms": {v: round(1000 * statistics.median(t), 1) for v, t in times.items()}}
    pairs = (
        ("mote", "lora_r"),
        ("mote", "lora_4r"),
        ("lora_4r", "lora_r"),
        ("mote_module", "lora_r"),
        ("mote", "mote_module"),
    )
    for a, b in pairs:
        out[f"{a}_vs_{b}"], out[f"{a}_vs_{b}_iqr"] = paired(a, b)
    if args.naive:
        out["naive_vs_lora_r"], _ = paired("naive", "lora_r")
    if not args.no_memory:
        out.update(measure_memory(args, variants))
    return out


# neighbours are compared: lora_r | mote | mote_module, then lora_4r (and naive)
VARIANTS = ["lora_r", "mote", "mote_module", "lora_4r"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--naive", action="store_true", help="also time the naive per-expert loop"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-variant memory probes"
    )
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--layers-seq", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        args.layers, args.seq = args.layers_seq
        args.hidden = args.hidden[0]
        memory_probe(args)
        return
    result: dict = {}
    for hidden in args.hidden:
        shape = argparse.Namespace(**vars(args))
        shape.hidden = hidden
        # an 8B-wide layer costs ~16x a 1024-wide one: fewer layers, shorter batches
        shape.layers, shape.seq = (4, 512) if hidden <= 1024 else (1, 256)
        if args.quick:
            shape.hidden, shape.layers, shape.seq = 128, 2, 128
            shape.rounds, shape.warmup = 3, 1
        r = measure(shape)
        suffix = "" if hidden <= 1024 else f"_{hidden}"
        print(
            f"hidden {shape.hidden}, layers {shape.layers}, seq {shape.seq}, batch "
            f"{shape.batch}, rank {shape.rank}, threads {shape.threads}: step ms "
            f"{r['ms']}; mote/lora_r {r['mote_vs_lora_r']} (IQR "
            f"{r['mote_vs_lora_r_iqr']}), mote/lora_4r {r['mote_vs_lora_4r']}, "
            f"lora_4r/lora_r {r['lora_4r_vs_lora_r']}, module/lora_r "
            f"{r['mote_module_vs_lora_r']}, mote/module {r['mote_vs_mote_module']}"
            + (f", naive/lora_r {r['naive_vs_lora_r']}" if args.naive else "")
            + (
                ""
                if args.no_memory
                else f"; peak MiB {r['peak_mib']}, peak mote/lora_r "
                f"{r['mem_mote_vs_lora_r']}, step memory mote/lora_r "
                f"{r['step_mem_mote_vs_lora_r']}"
            ),
            flush=True,
        )
        for key, value in r.items():
            if key not in ("ms", "peak_mib"):
                result[key + suffix] = value
    print(json.dumps(result))


if __name__ == "__main__":
    main()
