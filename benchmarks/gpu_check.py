"""One prepared check for a CUDA machine: exactness first, then timings as ratios.

Run by ``make gpu-check`` on a bare CUDA machine (PyTorch, Python 3.12, no network;
the other packages travel as wheels, see docs/benchmarks.md), within 8 minutes on one
H100. Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``. Exit status 1 if
any exactness check fails.

Exactness (fp32 with TF32 off unless stated):

* ``layer_fp32`` / ``layer_bf16``: a routed LoRA layer (alpha 0.3, prompt tokens to a
  stage expert, padding) against the paper's formula computed by the naive per-expert
  loop from the same weight slices (``tuner/reference.py``). fp32: max abs error
  <= 1e-4; bf16: the bf16 layer against the fp32 formula on the same bf16 weights,
  max error <= 3e-2 of the output's scale.
* ``regions_ckpt_*`` / ``flex_ckpt_*``: a Llama's loss and every gradient with step
  skipping as regions (and as a flex BlockMask, CUDA only) under transformers'
  gradient checkpointing, reentrant and not, against the dense step mask without
  checkpointing; on CUDA the recomputation runs on autograd's device thread. loss
  rel. error <= 1e-5, gradients <= 1e-3 of each gradient's scale.
* ``flash_varlen``: the varlen region attention against the dense mask, through
  flash-attn's kernel where it is installed (bf16, <= 2e-2), else the pure-torch
  stand-in (fp32, <= 1e-5).
* ``decode_cache``: greedy stage-routed generation with the KV cache (the decode packs
  fast path) gives the same tokens as without it.

Timings (CUDA events, medians of paired rounds, each ratio against a baseline run in
the same round), with peak memory (``max_memory_allocated``) of each variant:

* ``train``: one train step (forward, backward, AdamW) at hidden 4,096 in bf16,
  MoTE ÷ LoRA r ÷ LoRA 4r;
* ``skip_<T>``: a random-init Llama of about 1B parameters (hidden 2,048, 16 layers),
  one packed row of 4 chains, T = 2,048 and 4,096 tokens: step skipping as regions,
  flex and dense ÷ plain causal;
* ``decode``: greedy decode tokens/s of MoTE (routed, decode packs) ÷ LoRA r.

``--cpu --tiny`` runs every section at toy shapes on the CPU (flex and flash-attn
skipped), in under a minute, so CI keeps the script working.

    python benchmarks/gpu_check.py --out outputs/gpu_check
    python benchmarks/gpu_check.py --cpu --tiny --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FRACTIONS = {PROMPT_STEP: 2, 0: 5, 1: 4, 2: 5}  # sixteenths of a chain


# --- shapes -------------------------------------------------------------------------
def shapes(tiny: bool) -> dict[str, Any]:
    if tiny:
        return dict(
            layer=(64, 96), llama=(64, 2, 128), train=(64, 1, 64),
            skip=(64, 2, [128]), decode=(64, 2, 16), rounds=2, warmup=1,
        )  # fmt: skip
    return dict(layer=(4096, 4096), llama=(256, 4, 512), train=(4096, 2, 2048),
                skip=(2048, 16, [2048, 4096]), decode=(2048, 16, 128), rounds=8,
                warmup=2)  # fmt: skip


def llama(hidden: int, layers: int, vocab: int = 8000, seq: int = 4096, kv: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(hidden // 64, 2)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv or max(heads // 2, 1),
        max_position_embeddings=max(4096, seq), attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def mote_config(alpha: float = 0.5, prompt_routing: str = "random", rank: int = 16):
    from axolotl_mote.tuner.config import MoteConfig

    return MoteConfig(
        stage_names=["analysis", "guidance", "answer"], expert_rank=rank,
        alpha=alpha, prompt_routing=prompt_routing,
    )  # fmt: skip


def with_mote(model, config, randomize_b: float = 0.0):
    from peft import LoraConfig, get_peft_model

    from axolotl_mote.tuner.model import attach_mote

    r = config.expert_rank
    model = get_peft_model(
        model,
        LoraConfig(target_modules=TARGETS, **config.peft_kwargs(lora_alpha=2 * r)),
    )
    state = attach_mote(model, config)
    if randomize_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * randomize_b)
    return model, state


def with_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    return get_peft_model(model, cfg)


def chain_steps(length: int) -> torch.Tensor:
    lengths = {s: length * f // 16 for s, f in FRACTIONS.items()}
    lengths[2] += length - sum(lengths.values())
    return torch.cat([torch.full((lengths[s],), s) for s in FRACTIONS])  # [T]


def packed_batch(seq: int, vocab: int, pad: int = 0, rows: int = 1):
    """(ids, steps, positions) [rows, seq]: 4 chains per row, then ``pad`` padding."""
    n = (seq - pad) // 4
    steps = torch.cat([chain_steps(n)] * 4)
    pos = torch.arange(n).repeat(4)
    fill = seq - steps.numel()
    steps = torch.cat([steps, torch.full((fill,), PAD_STEP)])
    pos = torch.cat([pos, torch.zeros(fill, dtype=torch.long)])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (rows, seq), generator=gen)
    return ids, steps.expand(rows, -1).clone(), pos.expand(rows, -1).clone()


# --- exactness ----------------------------------------------------------------------
def check_layer(device: str, dtype: torch.dtype, sizes) -> dict:
    """One routed q_proj against the naive per-expert formula on its weight slices."""
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.reference import (
        expert_per_token,
        naive_mote_delta,
        split_blocks,
    )

    hidden, seq = sizes
    torch.manual_seed(0)
    config = mote_config(alpha=0.3, prompt_routing="answer")
    model, state = with_mote(llama(hidden, 1, vocab=512), config, randomize_b=0.05)
    model = model.to(device=device, dtype=dtype).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(
        lambda m, inp, out: seen.update(x=inp[0].detach(), y=out.detach())
    )
    ids, steps, pos = packed_batch(seq, 512, pad=seq // 8, rows=2)
    with torch.no_grad(), route(state, steps.to(device)):
        model(input_ids=ids.to(device), position_ids=pos.to(device))
    handle.remove()
    x, y = seen["x"].float(), seen["y"].float()
    a = layer.lora_A["default"].weight.float()
    b = layer.lora_B["default"].weight.float()
    ea, eb, sa, sb = split_blocks(a, b, config.n_blocks, config.shared_expert)
    experts = expert_per_token(steps, 2).reshape(-1).to(device)  # prompt -> answer
    flat = x.reshape(-1, x.shape[-1])
    ref = layer.base_layer.weight.float() @ flat.T
    delta = naive_mote_delta(flat, ea, eb, sa, sb, layer.scaling["default"],
                             config.alpha, experts)  # fmt: skip
    ref = (ref.T + delta).view_as(y)
    err = (y - ref).abs().max().item()
    scale = ref.abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * scale
    return {"max_abs_err": err, "scale": scale, "tol": tol, "ok": err <= tol}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.grad is not None}  # fmt: skip


def check_masks_ckpt(device: str, sizes, backend: str, reentrant: bool) -> dict:
    """Loss and gradients: step skipping (regions or flex) with gradient checkpointing
    against the dense step mask without it."""
    from axolotl_mote.attention import regions_active, register
    from axolotl_mote.masks import step_skipping

    hidden, layers, seq = sizes
    torch.manual_seed(0)
    model = llama(hidden, layers, vocab=512).to(device).train()
    ids, steps, pos = packed_batch(seq, 512, pad=seq // 8, rows=2)
    ids, steps, pos = ids.to(device), steps.to(device), pos.to(device)
    labels = ids.masked_fill(steps == PAD_STEP, -100)
    skip = dict(step_ids=steps, hideable=[0, 1], p=0.6, marker_ids=None,
                markers_visible=False, shift_positions=True)  # fmt: skip
    inputs = {"input_ids": ids, "position_ids": pos, "labels": labels}

    def gen():
        return torch.Generator().manual_seed(7)

    dense, _ = step_skipping(dict(inputs), generator=gen(),
                                attn_implementation="sdpa", **skip)  # fmt: skip
    ref_loss = model(**dense).loss
    ref_loss.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    if backend == "regions":
        batch, plan = step_skipping(dict(inputs), generator=gen(), regions=True, **skip)
        model.set_attn_implementation(register())
        with regions_active(plan, expected=True):
            loss = model(**batch).loss
            loss.backward()
    else:
        batch, _ = step_skipping(
            dict(inputs), generator=gen(), device=device,
            attn_implementation="flex_attention", **skip,
        )  # fmt: skip
        model.set_attn_implementation("flex_attention")
        loss = model(**batch).loss
        loss.backward()
    got = _grads(model)
    worst = max(
        ((got[n] - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        for n, r in ref.items()
    )
    loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    return {"loss_rel_err": loss_err, "grad_rel_err": worst,
            "ok": loss_err <= 1e-5 and worst <= 1e-3}  # fmt: skip


def check_flash_varlen(device: str) -> dict:
    """Varlen region attention against the dense mask (flash-attn's kernel where
    installed)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from axolotl_mote.attention import (
        reference_varlen_attention,
        regions_to_mask,
        varlen_region_attention,
    )
    from axolotl_mote.masks import step_skipping

    kernel, dtype, tol, name = (
        reference_varlen_attention,
        torch.float32,
        1e-5,
        "stand-in",
    )
    if device == "cuda":
        try:
            from flash_attn import flash_attn_varlen_func

            kernel, dtype, tol, name = (
                flash_attn_varlen_func,
                torch.bfloat16,
                2e-2,
                ("flash-attn"),
            )
        except ImportError:
            pass
    ids, steps, pos = packed_batch(256, 512, pad=16, rows=2)
    _, plan = step_skipping(
        {"input_ids": ids, "position_ids": pos}, step_ids=steps, hideable=[0, 1],
        p=0.6, generator=torch.Generator().manual_seed(3), marker_ids=None,
        markers_visible=False, shift_positions=False, regions=True,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 256, 64, generator=gen).to(device, dtype)
               for h in (8, 4, 4))  # fmt: skip
    out = varlen_region_attention(q, k, v, plan, kernel, 0.125).float()
    mask = regions_to_mask(plan, device)
    ref = sdpa(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.125,
               enable_gqa=True).transpose(1, 2)  # fmt: skip
    err = (out - ref).abs().max().item()
    return {"kernel": name, "max_abs_err": err, "tol": tol, "ok": err <= tol}


def check_decode_cache(device: str) -> dict:
    """Greedy stage-routed generation: the same tokens with and without the KV cache."""
    import tempfile

    from transformers import AutoTokenizer

    from axolotl_mote.generation import generate_chains
    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.templates import load_template
    from axolotl_mote.tiny import build_tiny_model
    from tests.helpers.tiny import build_mote

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model")
        template = load_template("aligncot")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        add_marker_tokens(tokenizer, template)
        model, _ = build_mote(model_dir, tokenizer, template, prompt_routing="random")
    model = model.to(device)
    prompts = ["How do I bake bread?", "Tell me about locks.", "What is 2+2?"]
    kw = dict(max_new_tokens=32, max_stage_tokens=6, plan=[None, "full", ["answer"]])
    cached = generate_chains(model, tokenizer, prompts, **kw)
    uncached = generate_chains(model, tokenizer, prompts, use_cache=False, **kw)
    same = [a.token_ids == b.token_ids for a, b in zip(cached, uncached)]
    return {"rows_equal": sum(same), "rows": len(same), "ok": all(same)}


# --- timings ------------------------------------------------------------------------
class Clock:
    """Wall time of a closure: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def peak_of(device: str, fn) -> float | None:
    """Peak memory (MiB) allocated while ``fn`` runs (CUDA only)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def interleaved(steps: dict[str, Any], rounds: int, warmup: int, clock: Clock):
    """Median seconds per variant; rounds alternate order so pairs run back to back."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            t = clock(steps[name])
            if i >= warmup:
                times[name].append(t)
    return times


def paired(times, a: str, b: str) -> float:
    return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)


def time_train(device: str, dtype, sizes, rounds, warmup) -> dict:
    """MoTE ÷ LoRA r ÷ LoRA 4r: one train step at hidden 4,096 in bf16."""
    hidden, layers, seq = sizes
    ids, steps, _ = packed_batch(seq, 8000)
    ids, steps = ids.to(device), steps.to(device)
    runs = {}
    for name in ("lora_r", "mote", "lora_4r"):
        torch.manual_seed(0)
        base = llama(hidden, layers, seq=seq)
        if name == "mote":
            model, state = with_mote(base, mote_config())
        else:
            model, state = with_lora(base, 16 if name == "lora_r" else 64), None
        model = model.to(device=device, dtype=dtype).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step(model=model, state=state, opt=opt, key=[0]):  # noqa: B006
            key[0] += 1
            if state is not None:
                state.set(steps, draw_key=key[0])
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if state is not None:
                state.clear()

        runs[name] = step
    peaks = {name: peak_of(device, fn) for name, fn in runs.items()}
    times = interleaved(runs, rounds, warmup, Clock(device))
    return {
        "ms": {n: round(1000 * statistics.median(t), 2) for n, t in times.items()},
        "peak_mib": peaks,
        "mote_vs_lora_r": paired(times, "mote", "lora_r"),
        "mote_vs_lora_4r": paired(times, "mote", "lora_4r"),
        "lora_4r_vs_lora_r": paired(times, "lora_4r", "lora_r"),
    }


def time_skip(device: str, dtype, hidden, layers, seq, rounds, warmup) -> dict:
    """Step skipping (regions, flex, dense) ÷ plain causal on one packed row."""
    from axolotl_mote.attention import regions_active, register
    from axolotl_mote.masks import step_skipping

    torch.manual_seed(0)
    vocab = 32000 if hidden >= 1024 else 512  # ~1B at hidden 2,048 and 16 layers
    model = with_lora(llama(hidden, layers, vocab=vocab, seq=seq), 16)
    model = model.to(device=device, dtype=dtype).train()
    base = model.get_base_model()
    ids, steps, pos = packed_batch(seq, vocab)
    ids, steps, pos = ids.to(device), steps.to(device), pos.to(device)
    inputs = {"input_ids": ids, "position_ids": pos, "labels": ids}
    skip = dict(step_ids=steps, hideable=[0, 1], p=0.5, marker_ids=None,
                markers_visible=False, shift_positions=False)  # fmt: skip
    draw = [0]

    def gen():
        draw[0] += 1
        return torch.Generator().manual_seed(draw[0])

    def causal():
        base.set_attn_implementation("sdpa")
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)

    def regions():
        base.set_attn_implementation(register())
        batch, plan = step_skipping(dict(inputs), generator=gen(), regions=True, **skip)
        with regions_active(plan, expected=True):
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def dense():
        base.set_attn_implementation("sdpa")
        batch, _ = step_skipping(dict(inputs), generator=gen(), device=device,
                                    attn_implementation="sdpa", **skip)  # fmt: skip
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def flex():
        base.set_attn_implementation("flex_attention")
        batch, _ = step_skipping(
            dict(inputs), generator=gen(), device=device,
            attn_implementation="flex_attention", **skip,
        )  # fmt: skip
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    runs = {"causal": causal, "regions": regions, "dense": dense}
    if device == "cuda":
        runs["flex"] = flex
        flex()  # compile outside the timed rounds
    peaks = {name: peak_of(device, fn) for name, fn in runs.items()}
    times = interleaved(runs, rounds, warmup, Clock(device))
    params = sum(p.numel() for p in model.parameters())
    out = {
        "params_b": round(params / 1e9, 3),
        "ms": {n: round(1000 * statistics.median(t), 2) for n, t in times.items()},
        "peak_mib": peaks,
    }
    for name in runs:
        if name != "causal":
            out[f"{name}_vs_causal"] = paired(times, name, "causal")
    return out


def time_decode(device: str, dtype, sizes) -> dict:
    """Greedy decode tokens/s: MoTE (one stage, decode packs) ÷ LoRA r."""
    hidden, layers, new = sizes
    prompt = torch.randint(5, 8000, (1, 64), generator=torch.Generator().manual_seed(2))
    prompt = prompt.to(device)
    result = {}
    for name in ("lora_r", "mote"):
        torch.manual_seed(0)
        base = llama(hidden, layers)
        if name == "mote":
            model, state = with_mote(base, mote_config(), randomize_b=0.01)
        else:
            model, state = with_lora(base, 16), None
        model = model.to(device=device, dtype=dtype).eval()

        def decode(model=model, state=state):
            from transformers import DynamicCache

            cache = DynamicCache()
            token = prompt
            with torch.no_grad():
                for i in range(new + 1):
                    if state is not None:
                        fill = PROMPT_STEP if i == 0 else 2
                        state.set(torch.full_like(token, fill), same_sequence=i > 0)
                    logits = model(input_ids=token, past_key_values=cache).logits
                    token = logits[:, -1:].argmax(-1)
            if state is not None:
                state.clear()

        decode()  # warm up
        clock = Clock(device)
        seconds = statistics.median(clock(decode) for _ in range(3))
        result[name] = {"tokens_per_s": round(new / seconds, 1),
                        "peak_mib": peak_of(device, decode)}  # fmt: skip
    result["mote_vs_lora_r"] = round(
        result["mote"]["tokens_per_s"] / result["lora_r"]["tokens_per_s"], 3
    )
    return result


# --- driver -------------------------------------------------------------------------
def run_section(report: dict, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        report[name] = fn(*args)
    except Exception as err:  # noqa: BLE001 - one section's failure is reported
        report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                        "trace": traceback.format_exc(limit=4)}  # fmt: skip
    report[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {json.dumps(report[name])[:400]}", flush=True)


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        f"# GPU check: {env['device_name']}",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, peft "
        f"{env['peft']}, flash-attn {env['flash_attn']}; {env['total_s']} s.",
        "",
        "| exactness | result | figures |",
        "|---|---|---|",
    ]
    for name, value in report.items():
        if isinstance(value, dict) and "ok" in value and name != "env":
            figures = {k: v for k, v in value.items() if k not in ("ok", "trace")}
            mark = "ok" if value["ok"] else "**FAIL**"
            lines.append(f"| {name} | {mark} | `{json.dumps(figures)}` |")
    lines += ["", "| timing | figures |", "|---|---|"]
    for name, value in report.items():
        if isinstance(value, dict) and "ok" not in value and name != "env":
            lines.append(f"| {name} | `{json.dumps(value)}` |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    parser.add_argument("--tiny", action="store_true", help="toy shapes (CI smoke)")
    parser.add_argument("--out", default="outputs/gpu_check", help="output folder")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="fail if the whole check takes longer (0: no limit)",
    )
    args = parser.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    s = shapes(args.tiny)
    t_start = time.perf_counter()
    import peft
    import transformers

    try:
        import flash_attn

        flash = flash_attn.__version__
    except ImportError:
        flash = "absent"
    report: dict[str, Any] = {"env": {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else
        platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "flash_attn": flash, "tiny": args.tiny,
    }}  # fmt: skip
    run_section(report, "layer_fp32", check_layer, device, torch.float32, s["layer"])
    run_section(report, "layer_bf16", check_layer, device, torch.bfloat16, s["layer"])
    for reentrant in (True, False):
        tag = "reentrant" if reentrant else "non_reentrant"
        run_section(report, f"regions_ckpt_{tag}", check_masks_ckpt, device,
                    s["llama"], "regions", reentrant)  # fmt: skip
        if device == "cuda":  # torch has no flex-attention backward on the CPU
            run_section(report, f"flex_ckpt_{tag}", check_masks_ckpt, device,
                        s["llama"], "flex", reentrant)  # fmt: skip
    run_section(report, "flash_varlen", check_flash_varlen, device)
    run_section(report, "decode_cache", check_decode_cache, device)
    if not args.skip_timings:
        torch.backends.cuda.matmul.allow_tf32 = True
        dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPU bf16 crawls
        r, w = s["rounds"], s["warmup"]
        run_section(report, "train", time_train, device, dtype, s["train"], r, w)
        hidden, layers, lengths = s["skip"]
        for seq in lengths:
            run_section(report, f"skip_{seq}", time_skip, device, dtype, hidden,
                        layers, seq, r, w)  # fmt: skip
        run_section(report, "decode", time_decode, device, dtype, s["decode"])
    report["env"]["total_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    failed = [
        n for n, v in report.items() if isinstance(v, dict) and v.get("ok") is False
    ]
    if args.max_seconds and report["env"]["total_s"] > args.max_seconds:
        failed.append(f"total time {report['env']['total_s']} s > {args.max_seconds}")
    print(json.dumps({"failed": failed, "total_s": report["env"]["total_s"],
                      "out": str(out)}))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
