"""The real ``axolotl train`` with the plugin, in-process, on the tiny model.

Asserts what a user relies on: the trainer receives the strategy's step ids row for row
(packed and unpacked), the experts train, the loss falls, per-stage metrics are logged,
and the saved adapter describes itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.train import base_config, run_train

pytestmark = pytest.mark.slow


def _expected_rows(cfg, tokenizer_dir) -> dict[tuple[int, ...], list[int]]:
    """input_ids -> step_ids as the strategy alone produces them."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from axolotl_mote.integration.strategy import ChainDatasetStrategy
    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.templates import load_template

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = load_template("aligncot")
    add_marker_tokens(tok, template)
    raw = load_dataset("json", data_files=cfg["datasets"][0]["path"], split="train")
    out = ChainDatasetStrategy(template, tok, cfg["sequence_len"]).wrap_dataset(raw)
    return {tuple(r["input_ids"]): r["step_ids"] for r in out}


def _record_batches(monkeypatch) -> list[dict[str, torch.Tensor]]:
    from axolotl_mote.integration.trainer import MoteTrainer

    seen: list[dict[str, torch.Tensor]] = []
    original = MoteTrainer.training_step

    def spy(self, model, inputs, num_items_in_batch=None):
        seen.append(
            {k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)}
        )
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(MoteTrainer, "training_step", spy)
    return seen


def _split_rows(batch: dict[str, torch.Tensor], packed: bool):
    """Yield (input_ids, step_ids) per sample, unpadding and unpacking."""
    for row in range(batch["input_ids"].shape[0]):
        ids, steps = batch["input_ids"][row], batch["step_ids"][row]
        keep = steps != -1
        ids, steps = ids[keep], steps[keep]
        if not packed:
            yield ids.tolist(), steps.tolist()
            continue
        pos = batch["position_ids"][row][keep]
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            yield ids[a:b].tolist(), steps[a:b].tolist()


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_trainer_receives_exact_step_ids(
    packed, tiny_model_dir, tmp_path, reset_plugins, monkeypatch
):
    cfg = base_config(tiny_model_dir, tmp_path, sample_packing=packed, max_steps=3)
    seen = _record_batches(monkeypatch)
    run_train(cfg, tmp_path)
    assert seen, "the trainer never ran a training step"
    expected = _expected_rows(cfg, tiny_model_dir)
    rows = [r for batch in seen for r in _split_rows(batch, packed)]
    assert rows
    for ids, steps in rows:
        assert tuple(ids) in expected, "a trained row is not a row of the strategy"
        assert steps == expected[tuple(ids)]
    # each batch held step ids of all three experts across the run
    assert {0, 1, 2} <= {s for _, steps in rows for s in steps}


def test_train_saves_experts_and_config(
    tiny_model_dir, tmp_path, reset_plugins, monkeypatch
):
    import axolotl_mote.settings as settings_module

    resolved = []
    real = settings_module.resolve_settings

    def counting(cfg):
        resolved.append(id(cfg))
        return real(cfg)

    monkeypatch.setattr(settings_module, "resolve_settings", counting)
    cfg = base_config(tiny_model_dir, tmp_path, max_steps=6, learning_rate=5e-3)
    run_train(cfg, tmp_path)
    # the run's settings were resolved once, by the plugin's first hook, and every
    # module (strategy, model hooks, trainer at each micro-step, saving) reused them
    assert len(resolved) == 1, resolved
    out = Path(cfg["output_dir"])
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    mote_cfg = json.loads((out / "mote_config.json").read_text())
    assert mote_cfg["stage_names"] == [
        "question_analysis",
        "answer_guidance",
        "safe_answer",
    ]
    assert mote_cfg["expert_rank"] == 4
    # the model card says what the adapter is, with PEFT's tags and the base model
    from axolotl_mote.integration.saving import CARD_HEADING

    card = (out / "README.md").read_text()
    assert CARD_HEADING in card and "- axolotl-mote" in card and "- mote" in card
    # rank blocks: 3 experts + shared, rank 4 each
    assert set(adapter_cfg["rank_pattern"].values()) == {16}
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    # compact: the experts and the new rows only, never the full embedding matrices
    assert not any("base_layer" in k for k in weights), sorted(weights)
    tensor_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    lora = [k for k in weights if "lora_" in k]
    rows = [k for k in weights if "trainable_tokens" in k]
    assert set(lora) | set(rows) == set(weights)
    size = (out / "adapter_model.safetensors").stat().st_size
    assert size <= 1.10 * tensor_bytes, (size, tensor_bytes)
    from transformers import AutoTokenizer

    assert mote_cfg["vocab_size"] == len(AutoTokenizer.from_pretrained(out))
    b_keys = [k for k in weights if "lora_B" in k]
    assert b_keys and all(weights[k].shape[1] == 16 for k in b_keys)
    # trained: B is no longer all zeros in every block
    for key in b_keys[:3]:
        blocks = weights[key].reshape(weights[key].shape[0], 4, 4)
        assert all(blocks[:, i].abs().sum() > 0 for i in range(4))


def _flex_trainable() -> bool:
    """FlexAttention has no CPU backward (torch raises NotImplementedError): GPU
    only."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.parametrize(
    "attn, kernel",
    [
        ("sdpa", "regions"),
        ("sdpa", "dense"),
        ("eager", "dense"),
        pytest.param(
            "flex_attention",
            "dense",
            marks=pytest.mark.skipif(
                not _flex_trainable(),
                reason="flex attention trains on GPU only (no CPU backward)",
            ),
        ),
    ],
    ids=["sdpa-regions", "sdpa-dense", "eager", "flex"],
)
def test_train_with_step_skipping_packed(
    attn, kernel, tiny_model_dir, tmp_path, reset_plugins, monkeypatch
):
    """Packing on, step skipping on: every batch's attention hides only what it may.

    The dense mask (sdpa-dense, eager) or the regions (sdpa's default) of every trained
    batch are checked against an independent expectation: causal attention inside
    each packed sample, minus pairs whose key is an intermediate stage and whose query
    is another stage's token."""
    import axolotl_mote.masks as masks
    from axolotl_mote.attention import regions_to_mask

    calls: list[tuple[dict, torch.Tensor]] = []
    kinds: set[str] = set()
    real = masks.step_skipping

    def spy(inputs, **kwargs):
        out, plan = real(inputs, **kwargs)
        if plan is None:
            kinds.add("dense")
            calls.append(
                (dict(inputs, step_ids=kwargs["step_ids"]), out["attention_mask"])
            )
        else:
            kinds.add("regions")
            calls.append(
                (dict(inputs, step_ids=kwargs["step_ids"]), regions_to_mask(plan))
            )
        return out, plan

    monkeypatch.setattr(masks, "step_skipping", spy)
    cfg = base_config(
        tiny_model_dir,
        tmp_path,
        sample_packing=True,
        max_steps=3,
        attn_implementation=attn,
        mote={
            "template": "aligncot",
            "step_skip_prob": 0.9,
            "step_skip_attention": kernel,
        },
    )
    run_train(cfg, tmp_path)
    assert calls, "step skipping was never applied"
    if attn == "flex_attention":
        from torch.nn.attention.flex_attention import BlockMask

        assert isinstance(calls[0][1], BlockMask)
        return
    assert kinds == {kernel}  # the step mask took the path the config asks for
    hidden_pairs = 0
    for inputs, mask in calls:
        steps, pos = inputs["step_ids"], inputs["position_ids"]
        assert mask.dim() == 4
        visible = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
        # independent expectation: causal attention inside each packed sample
        seq = torch.cumsum((pos == 0).long(), dim=1)  # samples start at position 0
        real = steps != -1
        n = steps.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        same = (seq[:, :, None] == seq[:, None, :]) & real[:, :, None] & real[:, None]
        packed_causal = causal & same
        assert not (visible & ~packed_causal & real[:, :, None]).any()
        hidden = packed_causal & ~visible  # [B, q, k] pairs step skipping removed
        q_step = steps[:, :, None].expand_as(hidden)[hidden]
        k_step = steps[:, None, :].expand_as(hidden)[hidden]
        # only intermediate stages are hidden, and only from other (later) stages
        assert set(k_step.tolist()) <= {0, 1}
        assert (q_step != k_step).all()
        hidden_pairs += int(hidden.sum())
    assert hidden_pairs > 0  # p = 0.9 over several packed chains hides something
