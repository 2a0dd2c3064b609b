"""The uniform (decode) fast path == the masked path == the naive per-expert loop.

``tuner/layer.py`` computes only the non-zero blocks when every token of a forward
has the same coefficients. Checked here, in fp32 to 1e-6, layer by layer for every step
id, prompt tokens under each prompt routing, padding, no shared expert and rsLoRA; that
it is taken (the zero blocks are filled with NaN, which the masked path would spread:
0·NaN) and not taken for mixed batches, autograd or train mode; and the life of its
packed blocks across a generate call.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from axolotl_mote.routing import RoutingState, route
from axolotl_mote.tuner.layer import MoteVariant
from axolotl_mote.tuner.reference import expert_per_token, naive_mote_delta
from tests.helpers.tiny import (
    TARGETS,
    P,
    X,
    expert_weights,
    input_ids_for,
    lora_layers,
    mote_config,
    mote_model,
    tiny_llama,
)

TOL = {"atol": 1e-6, "rtol": 1e-6}
F32 = torch.float32

# (case id, MoteConfig overrides, lora_alpha, use_rslora)
CASES = [
    ("paper-random", {}, 8.0, False),
    ("prompt-shared-alpha0.3", {"prompt_routing": "shared", "alpha": 0.3}, 8.0, False),
    ("prompt-answer-alpha0.8", {"prompt_routing": "answer", "alpha": 0.8}, 16.0, False),
    ("alpha1", {"prompt_routing": "analysis", "alpha": 1.0}, 8.0, False),
    ("no-shared", {"shared_expert": False, "prompt_routing": "guidance"}, 4.0, False),
    ("rslora-alpha0.25", {"alpha": 0.25, "prompt_routing": "shared"}, 8.0, True),
]
STEPS = [0, 1, 2, P, X]


def _layer_outputs(model, state, steps, x_by_layer, draw_key=0):
    """Each layer's output on its own input: fast, masked, and the coefficients."""
    layers = lora_layers(model)
    fast, masked = {}, {}
    with route(state, steps, draw_key=draw_key):
        with torch.no_grad():
            fast = {n: layers[n](x) for n, x in x_by_layer.items()}
        with torch.enable_grad():  # autograd on: the masked path, always
            masked = {n: layers[n](x).detach() for n, x in x_by_layer.items()}
        coef = state.coefficients(F32, torch.device("cpu"))  # [B, T, n_blocks]
    return fast, masked, coef


def _inputs(model, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(*shape, layer.in_features, generator=gen)
        for name, layer in lora_layers(model).items()
    }


def _naive(layer, config, x, experts):
    ea, eb, sa, sb = expert_weights(layer, config)
    delta = naive_mote_delta(
        x.reshape(-1, x.shape[-1]),
        ea,
        eb,
        sa,
        sb,
        layer.scaling["default"],
        config.alpha,
        experts.reshape(-1),
    )
    return layer.base_layer(x) + delta.view(*x.shape[:-1], -1)


def _prompt_expert(config, coef, state):
    routing = config.prompt_routing_index()
    if routing == "random":
        return coef[..., : state.num_experts].argmax(-1)  # [B, T] the drawn expert
    return routing


def _poison_zero_blocks(model, config, row) -> None:
    """NaN in the rank rows of A and columns of B of every block with coefficient 0."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            r = layer.r["default"] // config.n_blocks
            for k, c in enumerate(row):
                if c == 0.0:
                    rows = slice(k * r, (k + 1) * r)
                    layer.lora_A["default"].weight[rows] = float("nan")
                    layer.lora_B["default"].weight[:, rows] = float("nan")


@pytest.mark.parametrize("step", STEPS, ids=["s0", "s1", "s2", "prompt", "pad"])
@pytest.mark.parametrize(
    "overrides, lora_alpha, rslora", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_uniform_batch_fast_path_equals_masked_and_naive(
    overrides, lora_alpha, rslora, step
):
    """Two rows, three tokens, all one step id: every layer, fast == masked == naive."""
    config = mote_config(**overrides)
    model, state, _ = mote_model(config, lora_alpha=lora_alpha, use_rslora=rslora)
    model.eval()
    # random prompt routing draws per prompt run: one row is one run (and one draw)
    rows = 1 if step == P and config.prompt_routing == "random" else 2
    steps = torch.full((rows, 3), step)
    xs = _inputs(model, (rows, 3))
    fast, masked, coef = _layer_outputs(model, state, steps, xs)
    state.set(steps)
    assert state.uniform_row(F32, torch.device("cpu")) is not None
    state.clear()
    experts = expert_per_token(steps, _prompt_expert(config, coef, state))
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(fast[name], masked[name], **TOL)
        expected = _naive(layer, config, xs[name], experts)
        torch.testing.assert_close(fast[name], expected, **TOL)


@pytest.mark.parametrize("step", [0, 1, 2, P], ids=["s0", "s1", "s2", "prompt"])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"shared_expert": False, "prompt_routing": "answer"},
        {"prompt_routing": "shared", "alpha": 0.3},
    ],
    ids=["paper-random", "no-shared", "prompt-shared"],
)
def test_zero_blocks_are_never_read(overrides, step):
    """NaN in every zero block: the fast path never reads them; the masked path does."""
    config = mote_config(**overrides)
    model, state, _ = mote_model(config)
    model.eval()
    steps = torch.full((1, 4), step)
    xs = _inputs(model, (1, 4))
    with route(state, steps):
        row = state.uniform_row(F32, torch.device("cpu"))
    clean, _, _ = _layer_outputs(model, state, steps, xs)
    _poison_zero_blocks(model, config, row)
    fast, masked, _ = _layer_outputs(model, state, steps, xs)
    for name in xs:
        torch.testing.assert_close(fast[name], clean[name], atol=0, rtol=0)
        assert masked[name].isnan().any(), name  # the masked path reads every block


def test_mixed_batches_take_the_masked_path():
    """Prompt + stage, padding + stage, rows in different stages: the masked path.

    The tokens here use block 0 and the shared block only, so NaN in the other blocks
    reaches the logits only through the masked path's 0 · NaN.
    """
    config = mote_config(prompt_routing="shared")
    model, state, _ = mote_model(config)
    model.eval()
    with route(state, torch.zeros(1, 1, dtype=torch.long)):
        row = state.uniform_row(F32, torch.device("cpu"))  # step 0: blocks 1, 2 zero
    _poison_zero_blocks(model, config, row)
    for steps in ([[P, 0]], [[0, 0, X]], [[0], [X]], [[X, 0, P]]):
        steps = torch.tensor(steps)
        with torch.no_grad(), route(state, steps):
            assert state.uniform_row(F32, torch.device("cpu")) is None
            logits = model(input_ids=input_ids_for(steps)).logits
        assert logits.isnan().any(), steps.tolist()
    for steps in ([[0], [1]], [[0, 2]], [[1, 1, 2]]):  # rows or tokens in other stages
        with route(state, torch.tensor(steps)):
            assert state.uniform_row(F32, torch.device("cpu")) is None, steps


def test_equivalent_mixed_ids_and_one_random_prompt_run_are_uniform():
    """Uniform means equal coefficients, not equal ids; random prompts: one run only."""
    cpu = torch.device("cpu")
    state = RoutingState(num_experts=3, alpha=0.5, shared_expert=True, prompt_routing=1)
    state.set(torch.tensor([[P, P, 1, 1]]))  # prompt routed to stage 1 == step 1
    assert state.uniform_row(F32, cpu) == (0.0, 0.5, 0.0, 0.5)
    state = RoutingState(
        num_experts=3, alpha=0.5, shared_expert=True, prompt_routing="random"
    )
    state.set(torch.full((1, 5), P))  # one prompt run: one draw
    row = state.uniform_row(F32, cpu)
    assert row is not None and sorted(row) == [0.0, 0.0, 0.5, 0.5]
    draws = []
    for key in range(20):  # two runs (two rows): uniform exactly when the draws agree
        state.set(torch.full((2, 3), P), draw_key=key)
        coef = state.coefficients(F32, cpu)
        same = bool((coef[0, 0] == coef[1, 0]).all())
        assert (state.uniform_row(F32, cpu) is not None) == same
        draws.append(same)
    assert not all(draws)
    state.set(torch.full((2, 100), X))  # > 64 tokens: the tensor comparison
    assert state.uniform_row(F32, cpu) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("mode", ["grad", "train", "switched-off"])
def test_autograd_train_mode_and_the_switch_take_the_masked_path(mode):
    """Training (and gradient-checkpoint recomputation) runs the masked path only."""
    config = mote_config()
    model, state, _ = mote_model(config)
    model.eval()
    steps = torch.zeros(1, 3, dtype=torch.long)
    with route(state, steps):
        _poison_zero_blocks(model, config, state.uniform_row(F32, torch.device("cpu")))
    if mode == "train":
        model.train()
    state.fast_path = mode != "switched-off"
    with torch.set_grad_enabled(mode == "grad"), route(state, steps):
        logits = model(input_ids=input_ids_for(steps)).logits
    assert logits.isnan().any()


@pytest.mark.parametrize("step", [0, 2])
def test_generate_with_cache_uses_the_fast_path_and_matches_a_masked_forward(step):
    """KV-cached decoding == one masked full forward; one pack per layer and call."""
    from axolotl_mote.generation.auto import install, uninstall

    config = mote_config(prompt_routing="shared")
    model, state, _ = mote_model(config)
    model.eval()
    n_layers = len(lora_layers(model))
    install(model, lambda ids, kwargs: torch.full_like(ids, step))
    prompt = input_ids_for(torch.zeros(1, 5))
    calls = mock.patch.object(
        MoteVariant, "_pack", autospec=True, side_effect=MoteVariant._pack
    )
    with calls as spy:
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        assert spy.call_count == n_layers  # packed at the prefill, reused by 5 steps
        assert len(state.packs) == n_layers  # kept between the steps of one sequence
        model.generate(
            input_ids=prompt, max_new_tokens=2, do_sample=False, pad_token_id=0
        )
        assert spy.call_count == 2 * n_layers  # a new sequence packs again
    uninstall(model)
    seq = out.sequences  # [1, 5 + 6]
    with torch.enable_grad(), route(state, torch.full_like(seq, step)):
        full = model(input_ids=seq).logits.detach()  # [1, 11, V], the masked path
    generated = torch.stack(out.logits, dim=1)  # [1, 6, V]
    torch.testing.assert_close(generated, full[:, 4:-1], atol=1e-5, rtol=1e-5)


def test_packs_follow_weight_changes_and_end_with_the_sequence():
    config = mote_config(prompt_routing="shared")
    model, state, _ = mote_model(config)
    model.eval()
    steps = torch.zeros(1, 1, dtype=torch.long)
    ids = input_ids_for(steps)
    layer = next(m for n, m in lora_layers(model).items() if n.endswith("down_proj"))
    with torch.no_grad():
        state.set(steps)
        before = model(input_ids=ids).logits
        state.set(steps, same_sequence=True)  # a decode step: packs kept
        assert len(state.packs) == len(lora_layers(model))
        layer.lora_B["default"].weight.mul_(2.0)  # in place: the version changes
        after = model(input_ids=ids).logits
        state.set(steps, same_sequence=True)
        with torch.enable_grad():
            masked = model(input_ids=ids).logits.detach()
        torch.testing.assert_close(after, masked, **TOL)
        assert not torch.allclose(after, before)
        layer.scaling["default"] *= 0.5  # PEFT's set_scale: the packs follow
        state.set(steps, same_sequence=True)
        scaled = model(input_ids=ids).logits
        with torch.enable_grad():
            masked = model(input_ids=ids).logits.detach()
        torch.testing.assert_close(scaled, masked, **TOL)
        state.clear()  # route() / generate_chains ending: the sequence is over
        assert not state.packs


def test_variant_is_installed_removed_and_exclusive():
    from peft.tuners.lora.layer import LoraVariant

    from axolotl_mote.tuner.model import attach_mote, detach_mote

    config = mote_config()
    model, _, _ = mote_model(config)
    layers = lora_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    variants = [m.lora_variant["default"] for m in layers.values()]
    assert all(isinstance(v, MoteVariant) for v in variants)
    state = attach_mote(model, config)  # again: one variant per layer, on the new state
    assert all(m.lora_variant["default"].state is state for m in layers.values())
    assert not MoteVariant(None, 4, "x").supports_lora_conversion()
    detach_mote(model)
    assert not any(m.lora_variant for m in layers.values())
    next(iter(layers.values())).lora_variant["default"] = LoraVariant()
    with pytest.raises(TypeError, match="already uses the PEFT variant LoraVariant"):
        attach_mote(model, config)


def test_save_and_reload_with_the_variant_installed(tmp_path):
    """PEFT's save and load ignore the variant; the reloaded model routes the same."""
    from peft import PeftModel

    from axolotl_mote.tuner.model import attach_mote

    config = mote_config(prompt_routing="shared")
    model, state, _ = mote_model(config)
    model.eval()
    model.save_pretrained(tmp_path)
    steps = torch.tensor([[P, 0, 1, 2]])
    ids = input_ids_for(steps)
    with torch.no_grad(), route(state, steps):
        expected = model(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    state = attach_mote(reloaded, config)
    with torch.no_grad(), route(state, steps):
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, **TOL)
    with torch.no_grad(), route(state, torch.ones(1, 1, dtype=torch.long)):
        reloaded(input_ids=ids[:, :1])  # the fast path on reloaded weights
