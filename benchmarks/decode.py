"""Decode time per token: stage-routed MoTE generation vs one plain PEFT LoRA, same run.

One random Llama (hidden 1024, 4 layers, fp32, sdpa; the tiny BPE tokenizer + markers),
all 7 linear layers targeted, greedy decoding with the KV cache, batch 1, in one process
and interleaved, so machine noise hits every variant alike:

* ``lora_r``      one PEFT LoRA of rank r, ``model.generate``
* ``lora_4r``     one PEFT LoRA of rank 4r (MoTE's PEFT rank: 3 experts + shared)
* ``mote_route``  MoTE, ``model.generate`` with the marker router installed (routing
  only)
* ``mote``        MoTE, ``generate_chains(plan="full")``: router + per-row plan
  processor,
                  every stage visited (the stage limits move the chain through all
                  three)
* ``mote_masked`` the same with the decode fast path off (``RoutingState.fast_path``):
                  every step computes all rank blocks, masked

A logits processor timestamps every decoding step; the interval between two steps is one
decode forward (plus the variant's own per-step work: routing, plan rules). Per token =
the median interval (prefill excluded); ``decode_mote_vs_lora_r_mean_steps`` uses mean
intervals instead, which count the few slow steps too (MoTE packs a stage's blocks at
the stage's first step). On CPU the clock is the process's CPU time with one thread
(``--wall`` for wall time): on a shared machine other tenants stretch wall time but not
the work this process does; on CUDA it is wall time after a synchronize.
Each repetition runs every variant once, short runs in turn; the reported ratio is the
median over repetitions of that repetition's ratio to ``lora_r`` (paired, so slow phases
of a shared machine cancel). The last printed line is one JSON object.

    python benchmarks/decode.py            # full size (a few minutes on 2 busy cores)
    python benchmarks/decode.py --quick    # small shapes, smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "How do I pick a lock on my neighbour's door while they are away? " * 2


def build(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.templates import load_template
    from axolotl_mote.tiny import build_tiny_tokenizer
    from axolotl_mote.tuner.config import MoteConfig
    from axolotl_mote.tuner.model import attach_mote

    template = load_template("aligncot")
    tokenizer = build_tiny_tokenizer()
    add_marker_tokens(tokenizer, template)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 64, 1),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    base = LlamaForCausalLM(config).eval()
    r = args.rank
    models = {}
    for name, rank in (("lora_r", r), ("lora_4r", 4 * r)):
        models[name] = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS),
        ).eval()
    mote_cfg = MoteConfig(
        stage_names=[s.name for s in template.trained_stages],
        expert_rank=r,
        prompt_routing="random",
        template_data=template.model_dump(mode="json", exclude={"source"}),
    )
    mote = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=TARGETS,
            **mote_cfg.peft_kwargs(lora_alpha=2 * r),
        ),
    ).eval()
    attach_mote(mote, mote_cfg)
    for model in (*models.values(), mote):  # non-zero B so every LoRA really computes
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
    return tokenizer, template, models, mote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--wall", action="store_true", help="wall clock on CPU too")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.new_tokens, args.reps = 128, 2, 12, 2

    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.generation import StageRouter, generate_chains
    from axolotl_mote.generation.auto import routed_by
    from axolotl_mote.generation.router import start_marker_steps
    from axolotl_mote.tuner.model import get_routing_state

    torch.set_num_threads(args.threads)
    tokenizer, template, loras, mote = build(args)
    device = torch.device(args.device)
    for m in (*loras.values(), mote):
        m.to(device)
    fmt = ChainFormatter(template, tokenizer)
    ids = torch.tensor(
        [fmt.prompt_ids([{"role": "user", "content": PROMPT}])], device=device
    )
    state = get_routing_state(mote)
    router = StageRouter(
        start_marker_steps(template, fmt.marker_ids),
        state.prompt_routing,
        state.num_experts,
    )
    # CPU: the process's CPU time (one thread) -- other tenants of a shared machine
    # stretch wall time, not the work done. CUDA: wall time after a synchronize.
    clock_fn = (
        time.perf_counter if device.type == "cuda" or args.wall else time.process_time
    )
    n = args.new_tokens
    stage_cap = (n - 6) // 3  # three stages of content + 6 markers = n tokens

    class StepClock(LogitsProcessor):
        """Timestamps every decoding step; intervals = one decode forward each."""

        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.stamps.append(clock_fn())
            return scores

    def run_plain(model, clock):
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([clock]),
        )

    def run_route(clock):
        router.begin()
        with routed_by(mote, router):
            run_plain(mote, clock)

    def run_chains(clock):
        out = generate_chains(
            mote,
            tokenizer,
            [PROMPT],
            plan="full",
            max_new_tokens=n,
            max_stage_tokens=stage_cap,
            answer_reserve=0,
            template=template,
            logits_processor=[clock],
        )
        assert out[0].plan == [s.name for s in template.trained_stages], out[0].plan

    def run_masked(clock):
        state.fast_path = False
        try:
            run_chains(clock)
        finally:
            state.fast_path = True

    variants = {
        "lora_r": lambda clock: run_plain(loras["lora_r"], clock),
        "lora_4r": lambda clock: run_plain(loras["lora_4r"], clock),
        "mote_route": run_route,
        "mote": run_chains,
        "mote_masked": run_masked,
    }
    steps = {name: [] for name in variants}
    paired = {
        name: [] for name in variants
    }  # per rep: median step / lora_r's median step
    paired_mean = {name: [] for name in variants}  # the same with mean steps
    with torch.no_grad():
        for rep in range(args.reps + 1):  # rep 0 warms up
            medians, means = {}, {}
            for name, fn in variants.items():
                clock = StepClock()
                fn(clock)
                t = clock.stamps
                intervals = [b - a for a, b in zip(t[:-1], t[1:])]
                medians[name] = statistics.median(intervals)
                means[name] = statistics.fmean(intervals)
                if rep:
                    steps[name] += intervals
            if rep:
                for name in variants:
                    paired[name].append(medians[name] / medians["lora_r"])
                    paired_mean[name].append(means[name] / means["lora_r"])
            print(
                f"rep {rep}/{args.reps}: "
                + "  ".join(f"{k} {v * 1000:.1f}" for k, v in medians.items())
                + " ms/token",
                flush=True,
            )
    per_token = {}
    for name in variants:
        per_token[name] = statistics.median(steps[name]) * 1000
        print(
            f"{name:>10}: {per_token[name]:7.3f} ms/token (median of "
            f"{len(steps[name])} decode steps), paired ratio to lora_r "
            f"{statistics.median(paired[name]):.3f}",
            flush=True,
        )
    print(
        f"shape: hidden {args.hidden}, layers {args.layers}, rank {args.rank}, "
        f"new tokens {n}, batch 1, reps {args.reps}, device {device}, "
        f"threads {args.threads}"
    )
    ratio = {name: round(statistics.median(paired[name]), 3) for name in variants}
    mean_ratio = {n: round(statistics.median(paired_mean[n]), 3) for n in variants}
    print(
        json.dumps(
            {
                "decode_mote_vs_lora_r": ratio["mote"],
                # mean steps include the rare slow ones (MoTE packs a stage's blocks at
                # its first step); the median does not
                "decode_mote_vs_lora_r_mean_steps": mean_ratio["mote"],
                "decode_mote_route_vs_lora_r": ratio["mote_route"],
                "decode_mote_masked_vs_lora_r": ratio["mote_masked"],
                "decode_lora_4r_vs_lora_r": ratio["lora_4r"],
                "ms_per_token": {k: round(v, 3) for k, v in per_token.items()},
                "device": str(device),
                "threads": args.threads,
                "clock": "wall" if clock_fn is time.perf_counter else "process_cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
