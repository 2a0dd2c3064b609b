"""MoTE through the real ``axolotl train`` in 2 processes on CPU: DDP, ZeRO-1/2/3,
offload, FSDP2.

Every run trains the tiny Llama with the plugin for ``MAX_STEPS`` steps at 1 sample per
rank (global batch 2), saves, and is checked against what a user relies on:

* the run really was distributed (both ranks, the right ZeRO stage, ZeRO-3 partitioned);
* the saved adapter holds exactly the trained parameters (experts and marker rows),
  gathered from the partitions under ZeRO-3;
* the saved adapter, reloaded by ``load_mote_model``, gives the trained model's logits;
* the per-step loss equals a 1-process run with the same global batch (micro batch 2;
  the chains have equal trainable-token counts, see ``_write_equal_length_chains``).

The launch recipe (torchrun + tests/distributed/launcher.py) is in
tests/helpers/distributed.py. The runs are module-scoped fixtures, so the ZeRO-3 run is
also the uninterrupted half of the resume test. Prompt routing is fixed to a stage
(``safe_answer``) and step skipping is off: random prompt draws and skip draws depend
on the rank, and a 1-process run could not match a 2-process one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from axolotl_mote.deepspeed import deepspeed_config_path
from tests.helpers.distributed import DistributedRun, run_distributed, tiny_model
from tests.helpers.train import base_config, log_history, run_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MAX_STEPS = 4
LOSS_RTOL = 1e-4  # 1 vs 2 processes: same samples, different reduction order
MOTE = {"template": "aligncot", "prompt_routing": "safe_answer", "step_skip_prob": 0}
# the tiny Llama (hidden 64, MLP 128, 2 of 4 heads for k/v): projection -> (in, out)
PROJ_IN_OUT = {
    "q_proj": (64, 64),
    "k_proj": (64, 32),
    "v_proj": (64, 32),
    "o_proj": (64, 64),
    "gate_proj": (64, 128),
    "up_proj": (64, 128),
    "down_proj": (128, 64),
}
RANK = 4 * 4  # (3 aligncot step experts + shared) x lora_r 4
# Axolotl's FSDP2 recipe: each decoder layer, each lora_A / lora_B and the root are
# fully_shard-ed; sharded checkpoints are the ones that resume (see
# integration/config.check_fsdp2_resume)
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "state_dict_type": "SHARDED_STATE_DICT",
        "reshard_after_forward": True,
        # as in example_configs/llama3.1-8b-8gpu-fsdp2.yml: recomputed decoder layers
        # re-read the routing state, and parameter names gain the wrapper's part
        "activation_checkpointing": True,
    },
}


# --------------------------------------------------------------------------------------
# shared set-up: one model, one data file, one prepared dataset for every run


WORDS_PER_STAGE = 6
N_CHAINS = 16


def _single_token_words(tokenizer) -> list[str]:
    """Words that the tiny BPE encodes as one token after a space."""
    vocab = sorted(tokenizer.get_vocab())
    words = [t[1:] for t in vocab if t.startswith("\u0120") and t[1:].isalpha()]
    encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return [w for w, ids in zip(words, encoded) if len(ids) == 1]


def _write_equal_length_chains(path: Path, tokenizer) -> None:
    """Chains with different text and different stages but equal trainable tokens.

    Every chain has two trained stages (analysis + answer, or guidance + answer) of
    "The" + WORDS_PER_STAGE one-token words each. With equal trainable-token counts the
    loss conventions agree (mean over each rank's tokens, over all ranks' tokens, or
    over each accumulation step's): 2 ranks x 1 chain then trains exactly like 1
    process x 2 chains, in every Axolotl version. Prompts (not trained) vary in length.
    """
    import random

    words = _single_token_words(tokenizer)
    assert len(words) > 50, "the tiny tokenizer changed: pick other words"
    rng = random.Random(0)

    def text() -> str:
        return " ".join(["The", *rng.sample(words, WORDS_PER_STAGE)])

    with open(path, "w", encoding="utf-8") as handle:
        for i in range(N_CHAINS):
            first = "analysis" if i % 2 == 0 else "guidance"
            prompt = " ".join(rng.sample(words, 3 + i % 5))
            record = {
                "id": f"c{i}",
                "prompt": f"{prompt} ({i})?",
                first: text(),
                "answer": text(),
            }
            handle.write(json.dumps(record) + "\n")


def _check_equal_trainable_tokens(path: Path, model_dir: Path) -> None:
    """The premise of the loss comparison, checked on the strategy's own output."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from axolotl_mote.integration.strategy import ChainDatasetStrategy
    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.templates import load_template

    template = load_template("aligncot")
    tok = AutoTokenizer.from_pretrained(model_dir)
    add_marker_tokens(tok, template)
    raw = load_dataset("json", data_files=str(path), split="train")
    rows = ChainDatasetStrategy(template, tok, 256).wrap_dataset(raw)
    trained = {sum(label != -100 for label in row["labels"]) for row in rows}
    assert len(rows) == N_CHAINS and len(trained) == 1, trained
    stage_sets = {tuple(sorted(set(row["step_ids"]) - {-2, -1})) for row in rows}
    assert len(stage_sets) == 2, stage_sets


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("distributed")
    model_dir = tiny_model(root / "model")
    data = root / "chains.jsonl"
    _write_equal_length_chains(data, AutoTokenizer.from_pretrained(model_dir))
    _check_equal_trainable_tokens(data, model_dir)
    return root


def _config(work: Path, name: str, **overrides) -> dict:
    tmp = work / name
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = base_config(
        work / "model",
        tmp,
        mote=MOTE,
        micro_batch_size=1,
        max_steps=MAX_STEPS,
        dataset_prepared_path=str(work / "prepared"),
    )
    cfg["datasets"][0]["path"] = str(work / "chains.jsonl")
    cfg.update(overrides)
    return cfg


def _run(work: Path, name: str, mode: str, **overrides) -> DistributedRun:
    run = run_distributed(_config(work, name, **overrides), work / name, mode=mode)
    print(f"[distributed] {name}: {run.seconds:.1f}s, rc={run.returncode}")
    return run.check()


@pytest.fixture(scope="module")
def reference_losses(work) -> list[float]:
    """1 process, micro batch 2: the global batch of 2 ranks x 1 chain.

    The sampler is the same seeded permutation in both, so step k trains chains 2k and
    2k+1 either way. The chains have equal trainable-token counts
    (``_write_equal_length_chains``), so the per-rank token mean (Axolotl 0.19 and 0.21
    with DDP) and the token mean over the whole batch (1 process) coincide.
    """
    from axolotl.integrations.base import PluginManager

    manager = PluginManager.get_instance()
    manager.plugins.clear()
    cfg = _config(
        work,
        "single",
        micro_batch_size=2,
        save_strategy="steps",
        save_steps=MAX_STEPS,
    )
    try:
        run_train(cfg, work / "single")
    finally:
        manager.plugins.clear()
    losses = [e["loss"] for e in log_history(Path(cfg["output_dir"])) if "loss" in e]
    assert len(losses) == MAX_STEPS
    return losses


@pytest.fixture(scope="module")
def ddp_run(work) -> DistributedRun:
    return _run(work, "ddp", "ddp")


@pytest.fixture(scope="module")
def zero1_run(work) -> DistributedRun:
    return _run(work, "zero1", "zero1")


@pytest.fixture(scope="module")
def zero2_run(work) -> DistributedRun:
    return _run(work, "zero2", "zero2")


@pytest.fixture(scope="module")
def zero3_run(work) -> DistributedRun:
    # checkpoints at steps 2 and 4: the uninterrupted half of the resume test
    return _run(work, "zero3", "zero3", save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def zero3_offload_run(work) -> DistributedRun:
    """The shipped ZeRO-3 CPU-offload config, with bf16 off (the HF Trainer refuses bf16
    without a GPU): parameters and optimizer states offloaded, as for the 70B
    example."""
    ds = json.loads(deepspeed_config_path("zero3_bf16_cpuoffload").read_text())
    ds["bf16"]["enabled"] = False
    path = work / "zero3_cpuoffload_fp32.json"
    path.write_text(json.dumps(ds, indent=1))
    return _run(work, "zero3_offload", "zero3", deepspeed=str(path))


@pytest.fixture(scope="module")
def fsdp2_run(work) -> DistributedRun:
    # checkpoints at steps 2 and 4: the uninterrupted half of the resume test
    return _run(work, "fsdp2", "fsdp2", save_strategy="steps", save_steps=2, **FSDP2)


# --------------------------------------------------------------------------------------
# checks


def _losses(run: DistributedRun, after_step: int = 0) -> list[float]:
    """Rank 0's logged training losses, by step (a resumed run also lists old ones)."""
    history = run.reports()[0]["log_history"]
    return [e["loss"] for e in history if "loss" in e and e["step"] > after_step]


def _check_ranks(
    run: DistributedRun,
    distributed_type: str,
    zero_stage: int | None,
    steps_run: int = MAX_STEPS,
    recomputed: bool = False,
):
    """Both ranks ran the same modules the same number of times, on other stages.

    ``recomputed``: activation checkpointing (the FSDP2 runs) recomputes each decoder
    layer in the backward, so every LoRA module runs twice per step; Axolotl 0.19's
    FSDP2 checkpointing also wraps the attention block inside the checkpointed layer,
    so there the attention projections run a third time (nested checkpoints; not in
    0.21).
    """
    reports = run.reports()
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["dist_world_size"] == 2
        assert report["trainer_world_size"] == 2, "both ranks must read different data"
        assert report["distributed_type"] == f"DistributedType.{distributed_type}"
        assert report["zero_stage"] == zero_stage
        assert report["global_step"] == MAX_STEPS
        assert not report["cuda_available"]
    # rank symmetry: every LoRA module (all expert blocks inside it) ran once per step
    # (per forward) on both ranks, although the stages routed on the two ranks differ
    calls = [r["lora_calls"] for r in reports]
    assert len(calls[0]) == 28 and calls[0] == calls[1]
    attention = {2, 3} if recomputed else {1}
    for name, n in calls[0].items():
        runs = attention if ".self_attn." in name else {2 if recomputed else 1}
        assert n in {r * steps_run for r in runs}, (name, n)
    stages = [r["stages_per_forward"] for r in reports]  # seen by layer 0's q_proj
    assert len(stages[0]) == len(stages[1])
    assert len(stages[0]) in {r * steps_run for r in attention}
    if steps_run == MAX_STEPS:
        assert stages[0] != stages[1], stages
    return reports


def _check_saved_equals_trained(run: DistributedRun, out: Path | None = None) -> None:
    """Every trained tensor is in the adapter, bit for bit, and training moved them."""
    saved = load_file(str((out or run.output_dir) / "adapter_model.safetensors"))
    trained = load_file(str(run.report_dir / "trained.safetensors"))
    experts = [n for n in trained if ".lora_A." in n or ".lora_B." in n]
    markers = [n for n in trained if "trainable_tokens_delta" in n]
    assert len(experts) == 28, sorted(trained)  # 2 layers x 7 projections x (A, B)
    assert len(markers) == 2  # embed_tokens and the untied lm_head
    # full sizes, from the layers' in/out features (never a ZeRO-3 shard's shape)
    for name in experts:
        fan_in, fan_out = PROJ_IN_OUT[name.split(".")[-4]]
        expected = (RANK, fan_in) if ".lora_A." in name else (fan_out, RANK)
        assert tuple(trained[name].shape) == expected, name
    for name, tensor in trained.items():
        key = name.replace(".default", "")
        assert key in saved, f"{key} missing from the saved adapter"
        assert saved[key].shape == tensor.shape, key
        assert torch.equal(saved[key].float(), tensor), f"{key}: saved != trained"
    # lora_B starts at zero: non-zero means the experts were trained (and saved)
    assert all(trained[n].abs().sum() > 0 for n in experts if ".lora_B." in n)


def _check_reload_logits(run: DistributedRun, model_dir: Path, out: Path | None = None):
    from axolotl_mote.loading import load_mote_model
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    probe = torch.load(run.report_dir / "probe.pt")
    model, _ = load_mote_model(model_dir, out or run.output_dir)
    with torch.no_grad(), route(get_routing_state(model), probe["step_ids"]):
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)


def _check_loss_matches(run: DistributedRun, reference: list[float]) -> None:
    losses = _losses(run)
    assert len(losses) == MAX_STEPS
    assert losses == pytest.approx(reference, rel=LOSS_RTOL), (losses, reference)


# --------------------------------------------------------------------------------------
# tests


def test_ddp(ddp_run, reference_losses, work):
    _check_ranks(ddp_run, "MULTI_CPU", None)
    assert {r["wrapped_model_class"] for r in ddp_run.reports()} == {
        "DistributedDataParallel"
    }
    _check_saved_equals_trained(ddp_run)
    _check_reload_logits(ddp_run, work / "model")
    _check_loss_matches(ddp_run, reference_losses)
    assert (ddp_run.output_dir / "mote_config.json").is_file()


def test_zero1(zero1_run, reference_losses, work):
    _check_ranks(zero1_run, "DEEPSPEED", 1)
    _check_saved_equals_trained(zero1_run)
    _check_reload_logits(zero1_run, work / "model")
    _check_loss_matches(zero1_run, reference_losses)


def test_zero2(zero2_run, reference_losses, work):
    _check_ranks(zero2_run, "DEEPSPEED", 2)
    _check_saved_equals_trained(zero2_run)
    _check_reload_logits(zero2_run, work / "model")
    _check_loss_matches(zero2_run, reference_losses)
    assert (zero2_run.output_dir / "mote_config.json").is_file()


def test_zero3(zero3_run, reference_losses, work):
    reports = _check_ranks(zero3_run, "DEEPSPEED", 3)
    for report in reports:
        # parameters really are partitioned: each rank holds a shard of the experts
        assert report["n_zero3_params"] > 0
        assert report["zero3_local_numel"] < report["zero3_numel"]
        assert report["trainable_local_numel"] < report["trainable_numel"]
    # the experts have the full-size shapes (sized from in/out features, not shards)
    _check_saved_equals_trained(zero3_run)
    _check_reload_logits(zero3_run, work / "model")
    _check_loss_matches(zero3_run, reference_losses)
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        assert (zero3_run.output_dir / ckpt / "adapter_model.safetensors").is_file()
        assert (zero3_run.output_dir / ckpt / "mote_config.json").is_file()
    assert (zero3_run.output_dir / "mote_config.json").is_file()


def test_zero3_cpu_offload(zero3_offload_run, reference_losses, work):
    reports = _check_ranks(zero3_offload_run, "DEEPSPEED", 3)
    for report in reports:
        assert report["zero_offload"] == {"param": "cpu", "optimizer": "cpu"}
        assert report["zero3_local_numel"] < report["zero3_numel"]
    _check_saved_equals_trained(zero3_offload_run)
    _check_reload_logits(zero3_offload_run, work / "model")
    _check_loss_matches(zero3_offload_run, reference_losses)


def _resume_from_step_2(
    work: Path,
    run: DistributedRun,
    mode: str,
    distributed_type: str,
    stage,
    recomputed: bool = False,
    **extra,
) -> DistributedRun:
    """Copy ``run``'s step-2 checkpoint, resume from it, and check that the resumed run
    ends with the uninterrupted run's experts and trains steps 3 and 4 with its
    losses; its saved adapter is the trained one and reloads to its logits."""
    name = f"{run.mode}_resume"
    out = work / name / "out"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint-2"
    shutil.copytree(run.output_dir / "checkpoint-2", ckpt)
    resumed = _run(
        work,
        name,
        mode,
        save_strategy="steps",
        save_steps=2,
        resume_from_checkpoint=str(ckpt),
        **extra,
    )
    _check_ranks(
        resumed, distributed_type, stage, steps_run=MAX_STEPS - 2, recomputed=recomputed
    )
    full = load_file(str(run.report_dir / "trained.safetensors"))
    after = load_file(str(resumed.report_dir / "trained.safetensors"))
    assert full.keys() == after.keys()
    for key in full:
        torch.testing.assert_close(after[key], full[key], rtol=0, atol=1e-6, msg=key)
    # the resumed run trained steps 3 and 4 only, with the uninterrupted run's losses
    assert _losses(resumed, after_step=2) == pytest.approx(
        _losses(run, after_step=2), rel=LOSS_RTOL
    )
    _check_saved_equals_trained(resumed)
    _check_reload_logits(resumed, work / "model")
    return resumed


def test_zero3_resume_restores_experts(zero3_run, work):
    """Resuming from the ZeRO checkpoint at step 2 ends where the 4-step run ended."""
    ckpt = zero3_run.output_dir / "checkpoint-2"
    assert any(ckpt.glob("global_step2/*optim_states.pt")), "not a ZeRO checkpoint"
    _resume_from_step_2(work, zero3_run, "zero3", "DEEPSPEED", 3)


def test_fsdp2(fsdp2_run, reference_losses, work):
    """FSDP2 shards every expert and the marker rows; the final adapter (written by the
    plugin, since Axolotl's FSDP2 save drops trainable tokens) is the trained one."""
    reports = _check_ranks(fsdp2_run, "FSDP", None, recomputed=True)
    for report in reports:
        assert report["n_dtensor_params"] > 0
        # each rank stores half of every trainable tensor (all dims are even here)
        assert 2 * report["trainable_local_numel"] == report["trainable_numel"]
    assert "MoTE: FSDP2 final save" in fsdp2_run.log
    _check_saved_equals_trained(fsdp2_run)
    _check_reload_logits(fsdp2_run, work / "model")
    _check_loss_matches(fsdp2_run, reference_losses)
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        assert (fsdp2_run.output_dir / ckpt / "pytorch_model_fsdp_0").is_dir()
        assert (fsdp2_run.output_dir / ckpt / "mote_config.json").is_file()
    assert (fsdp2_run.output_dir / "mote_config.json").is_file()


def test_fsdp2_resume_restores_experts(fsdp2_run, work):
    """Resuming from the sharded checkpoint of step 2 ends where the 4-step run did."""
    _resume_from_step_2(
        work, fsdp2_run, "fsdp2", "FSDP", None, recomputed=True, **FSDP2
    )
