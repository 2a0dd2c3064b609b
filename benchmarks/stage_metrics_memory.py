"""Peak memory of a MoTE train step with per-stage metrics, against the same step
without.

A tiny random Llama (hidden 64, 2 layers) with a 128,256-token vocabulary (Llama-3's),
so the logits dominate memory as they do at scale; MoTE (3 experts + shared) on every
linear layer; micro-batch 2 × 1,024 tokens; forward, loss, per-stage metrics, backward,
AdamW.

* ``none``     no per-stage metrics;
* ``metrics``  ``axolotl_mote.metrics.StageMetrics`` (what ``MoteTrainer`` logs);
* ``naive``    the former implementation: a full fp32 copy of the logits and a second
               full-vocabulary cross-entropy (``metrics.reference_stage_losses``).

Each variant runs in its own process (peak RSS is per process); the variants alternate
over ``--rounds`` rounds and the median peak per variant is used. The last line is one
JSON object with ``mem_metrics_vs_none`` (target <= 1.02), ``mem_naive_vs_none``, and
``metrics_call_extra_mib``: how far the RSS rose during the metrics call above what was
live before it (Linux peak-RSS reset), which shows the naive version's transient even
where the step's peak lies in the backward pass.

    python benchmarks/stage_metrics_memory.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

VARIANTS = ("none", "metrics", "naive")


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, int]:
    """Train ``args.steps`` steps; the process's peak RSS and the largest rise of the
    RSS during the metrics call above what was live before it, in bytes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from axolotl_mote.metrics import StageMetrics, reference_stage_losses
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.config import MoteConfig
    from axolotl_mote.tuner.model import attach_mote

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    mote = MoteConfig(stage_names=["analysis", "guidance", "answer"], expert_rank=8)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        + ["gate_proj", "up_proj", "down_proj"],
        **mote.peft_kwargs(16),
    )
    model = get_peft_model(model, lora)
    state = attach_mote(model, mote)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    b, t = 2, args.seq
    ids = torch.randint(0, args.vocab, (b, t))
    steps = torch.full((b, t), -2)
    quarter = t // 4
    for stage in range(3):
        steps[:, quarter * (stage + 1) :] = stage
    labels = ids.masked_fill(steps < 0, -100)
    metrics = StageMetrics(mote.stage_names)
    transient = 0
    for _ in range(args.steps):
        with route(state, steps):
            out = model(input_ids=ids, labels=labels)
            before = _rss()
            _reset_peak()
            if variant == "metrics":
                metrics.add(out.logits, labels, steps)
            elif variant == "naive":
                reference_stage_losses(out.logits, labels, steps, 3)
            transient = max(transient, _peak() - before)
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out
    metrics.flush()
    return {
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "transient": transient,
    }


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return _status("VmRSS:")


def _peak() -> int:
    return _status("VmHWM:")


def _reset_peak() -> None:
    """Reset the peak-RSS mark (Linux: writing 5 to clear_refs), so the peak of one
    call can be read. The process's lifetime peak (getrusage) is not affected."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    peaks: dict[str, list[int]] = {v: [] for v in VARIANTS}
    transient: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[variant].append(result["peak_rss"])
            transient[variant].append(result["transient"])
    median = {v: statistics.median(p) for v, p in peaks.items()}
    extra = {v: round(statistics.median(p) / 2**20) for v, p in transient.items()}
    for variant in VARIANTS:
        mb = [round(p / 2**20) for p in peaks[variant]]
        print(f"{variant:8s} peak RSS MiB per round {mb}")
    print(
        json.dumps(
            {
                "mem_metrics_vs_none": round(median["metrics"] / median["none"], 4),
                "mem_naive_vs_none": round(median["naive"] / median["none"], 4),
                "peak_mib": {v: round(m / 2**20) for v, m in median.items()},
                "metrics_call_extra_mib": extra,
                "vocab": args.vocab,
                "tokens": 2 * args.seq,
            }
        )
    )


if __name__ == "__main__":
    main()
