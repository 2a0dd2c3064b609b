"""Stage-aware generation: routing by emitted markers, plans, limits, fallback, output.

All on a tiny random MoTE model (``tests.helpers.tiny.build_mote``): experts and marker
rows are random, so the model "chooses" stages arbitrarily but deterministically; the
plan rules and the per-stage limits keep every chain well formed.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import aligncot_mote, build_mote

PROMPTS = [
    "How do I bake bread at home?",
    "What is the capital of France?",
    [{"role": "user", "content": "Can you explain recursion in Python?"}],
]


@pytest.fixture(scope="module")
def mote(tiny_model_dir):
    model, tokenizer, template, _ = aligncot_mote(
        tiny_model_dir, prompt_routing="random"
    )
    return model, tokenizer, template


def _gen(mote, prompts=PROMPTS, **kwargs):
    from axolotl_mote.generation import generate_chains

    model, tokenizer, _ = mote
    kwargs.setdefault("max_new_tokens", 24)
    kwargs.setdefault("max_stage_tokens", 4)
    return generate_chains(model, tokenizer, prompts, **kwargs)


def test_router_gives_the_training_step_ids(mote):
    """Markers route exactly as data/format.py labels a training chain, chunk by
    chunk."""
    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.generation.router import StageRouter, start_marker_steps

    _, tokenizer, template = mote
    fmt = ChainFormatter(template, tokenizer)
    prefix = fmt.prompt_ids([{"role": "user", "content": "hi there"}])
    pieces = {p.key: p for p in fmt.pieces}
    stages = [(pieces["analysis"], [11, 12, 13]), (pieces["answer"], [14, 15])]
    ids, _, steps = fmt.assemble(prefix, stages, [5, 6])
    router = StageRouter(start_marker_steps(template, fmt.marker_ids), "shared", 3)
    # the prompt's PROMPT_STEP resolves to its concrete routing (shared: shared only)
    assert router.prompt_step(prefix) == -3
    steps = [-3 if s == -2 else s for s in steps]
    full = torch.tensor([ids])
    assert router.step_ids(full).tolist() == [steps]

    class Cache:  # what generate passes: the KV cache, whose length is the position
        def __init__(self, n):
            self.n = n

        def get_seq_length(self):
            return self.n

    router.begin()
    got = router(full[:, :5], {})  # prefill
    for pos in range(5, len(ids)):  # then one token per forward
        got = torch.cat(
            [got, router(full[:, pos : pos + 1], {"past_key_values": Cache(pos)})], 1
        )
    assert got.tolist() == [steps]


def test_cached_generation_equals_full_reforward(mote):
    """Greedy: same tokens with and without cache; logits == one uncached re-forward."""
    from axolotl_mote.generation import StageRouter, start_marker_steps
    from axolotl_mote.markers import marker_token_ids
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    plans = [None, "full", ["answer"]]
    cached = _gen(mote, plan=plans, output_logits=True)
    uncached = _gen(mote, plan=plans, use_cache=False)
    assert [o.token_ids for o in cached] == [o.token_ids for o in uncached]
    assert [o.step_ids for o in cached] == [o.step_ids for o in uncached]

    model, tokenizer, template = mote
    from axolotl_mote.data.format import ChainFormatter

    fmt = ChainFormatter(template, tokenizer)
    state = get_routing_state(model)
    router = StageRouter(
        start_marker_steps(template, marker_token_ids(template, tokenizer)),
        state.prompt_routing,
        state.num_experts,
        seed=state.seed,
    )
    for _row, out in enumerate(cached):
        prompt = fmt.prompt_ids(out.messages)
        seq = torch.tensor([prompt + out.token_ids])
        steps = router.step_ids(seq)  # the prompt's expert is keyed by its tokens
        assert steps[0, len(prompt) :].tolist() == out.step_ids
        with torch.no_grad(), route(state, steps):
            logits = model(input_ids=seq).logits[0]  # [L, V]
        n = out.logits.shape[0]  # generated tokens (a prefilled marker has none)
        first = seq.shape[1] - n - 1  # logits at position p predict token p + 1
        torch.testing.assert_close(
            out.logits, logits[first : first + n], atol=1e-4, rtol=1e-4
        )


def test_batched_rows_follow_their_own_plans(mote):
    plans = [["answer"], "analysis>answer", "full"]
    batch = _gen(mote, plan=plans)
    expected = [
        ["safe_answer"],
        ["question_analysis", "safe_answer"],
        ["question_analysis", "answer_guidance", "safe_answer"],
    ]
    assert [o.plan for o in batch] == expected
    assert [o.forced_plan for o in batch] == expected
    for i, (prompt, plan) in enumerate(zip(PROMPTS, plans)):
        alone = _gen(mote, prompts=[prompt], plan=plan)[0]
        # rows keep their own routing (and prompt expert) whatever the batch
        assert alone.token_ids == batch[i].token_ids, i


def test_forced_plan_routes_every_stage_to_its_expert(mote):
    from axolotl_mote.markers import marker_token_ids

    _, tokenizer, template = mote
    out = _gen(
        mote, plan="full", max_stage_tokens={"analysis": 2, "guidance": 3, "answer": 4}
    )[0]
    ids = marker_token_ids(template, tokenizer)
    assert out.token_ids[0] == ids["<|analysis|>"]  # pre-filled
    for token, step in zip(out.token_ids, out.step_ids):
        if token == ids["<|guidance|>"]:
            assert step == 1  # the marker that opens a stage is routed to it
    assert out.tokens_per_stage == {
        "question_analysis": 2,
        "answer_guidance": 3,
        "safe_answer": 4,
    }
    assert out.forced_ends == ["question_analysis", "answer_guidance", "safe_answer"]


def test_structured_output_and_stop_after_answer(mote):
    _, tokenizer, _ = mote
    for out in _gen(mote):  # adaptive
        assert out.plan[-1] == "safe_answer" and out.finish_reason == "answer_end"
        assert out.token_ids[-1] == tokenizer.eos_token_id
        assert out.token_ids[-2] == tokenizer.convert_tokens_to_ids("<|/response|>")
        assert all(n <= 4 for n in out.tokens_per_stage.values())
        assert out.answer == out.stages["safe_answer"]
        assert set(out.to_dict()) >= {"plan", "stages", "tokens_per_stage", "answer"}
    free = _gen(mote, plan=["answer"], stop_after_answer=False, max_new_tokens=14)
    assert free[0].finish_reason in ("eos", "length")
    assert (
        len(free[0].token_ids)
        > free[0].token_ids.index(tokenizer.convert_tokens_to_ids("<|/response|>")) + 1
        or free[0].finish_reason == "eos"
    )


def test_fallback_opens_the_answer_when_the_model_wants_to_stop(mote):
    model, tokenizer, _ = mote
    head = model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[tokenizer.eos_token_id] = 1e4  # the model always prefers to end right away
    handle = head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        forced = _gen(mote, prompts=PROMPTS[:1])[0]
        none = _gen(mote, prompts=PROMPTS[:1], fallback="none")[0]
    finally:
        handle.remove()
    assert forced.fallback_used and forced.plan == ["safe_answer"]
    assert forced.answer is not None and forced.finish_reason == "answer_end"
    assert none.answer is None and none.plan == [] and none.finish_reason == "eos"
    assert not none.fallback_used


def test_budget_fallback_keeps_room_for_the_answer(mote):
    out = _gen(
        mote,
        plan="analysis>answer",
        max_stage_tokens=None,
        max_new_tokens=12,
        answer_reserve=4,
    )[0]
    assert out.plan == ["question_analysis", "safe_answer"]
    assert "question_analysis" in out.forced_ends
    assert out.finish_reason == "answer_end"
    assert len(out.token_ids) - 1 <= 12  # the pre-filled marker is not generated


@pytest.mark.parametrize(
    "plan, message",
    [
        (["analysis"], "lacks the answer stage"),
        (["answer", "analysis"], "template order"),
        (["check", "answer"], "only trained stages"),
        ([None, "full"], "2 plans for 3 prompts"),
    ],
)
def test_bad_plans_are_rejected(mote, plan, message):
    with pytest.raises(ValueError, match=message):
        _gen(mote, plan=plan)


def test_cli_generate_and_export(mote, tiny_model_dir, tmp_path):
    """`axolotl-mote generate` (prompts, JSONL in/out) and `export` on a saved
    adapter."""
    import json

    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from axolotl_mote.cli.main import main
    from axolotl_mote.tuner.config import MoteConfig

    model, tokenizer, template = mote
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    MoteConfig(
        stage_names=[s.name for s in template.trained_stages],
        expert_rank=4,
        prompt_routing="random",
        template_data=template.model_dump(mode="json", exclude={"source"}),
    ).save(adapter)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(
        json.dumps({"id": "a", "prompt": "What is the capital of France?"})
        + "\n"
        + json.dumps(
            {
                "id": "b",
                "messages": [{"role": "user", "content": "Hi"}],
                "plan": "analysis>answer",
            }
        )
        + "\n"
    )
    results = tmp_path / "out.jsonl"
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "generate",
            "--adapter",
            str(adapter),
            "--base-model",
            str(tiny_model_dir),
            "--prompt",
            "How do I bake bread?",
            "--input",
            str(inputs),
            "--output",
            str(results),
            "--max-new-tokens",
            "20",
            "--max-stage-tokens",
            "3",
            "--plan",
            "answer",
            "--compare-base",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["id"] for r in rows] == [None, "a", "b"]
    assert [r["plan"] for r in rows] == [
        ["safe_answer"],
        ["safe_answer"],
        ["question_analysis", "safe_answer"],
    ]
    assert "[safe_answer] (" in res.output and "[base model]" in res.output

    res = runner.invoke(
        main,
        [
            "export",
            "--adapter",
            str(adapter),
            "--output",
            str(tmp_path / "export"),
            "--stage",
            "answer",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(tokenizer))
    PeftModel.from_pretrained(base, tmp_path / "export" / "safe_answer")  # plain PEFT


def test_axolotl_inference_routes_by_markers(mote, tiny_model_dir):
    """post_lora_load with cfg.inference installs the marker router: plain generate
    works.

    Builds its own model: attaching again must not change the module-scoped one."""
    from axolotl.utils.dict import DictDefault

    from axolotl_mote.generation import StageRouter
    from axolotl_mote.generation.auto import auto_routing
    from axolotl_mote.integration.model import attach_to_axolotl_model
    from axolotl_mote.routing import RoutingError

    _, tokenizer, template = mote
    model, _ = build_mote(tiny_model_dir, tokenizer, template)
    cfg = DictDefault(
        base_model=str(tiny_model_dir),
        tokenizer_config=str(tiny_model_dir),
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        mote={"template": "aligncot", "prompt_routing": "random"},
        special_tokens={"additional_special_tokens": template.markers},
        inference=True,
    )
    attach_to_axolotl_model(DictDefault({**cfg, "inference": False}), model)
    ids = tokenizer("<|response|> hello", return_tensors="pt")
    with pytest.raises(RoutingError):  # training-style attach: no routing, no forward
        model.generate(**ids, max_new_tokens=2)
    attach_to_axolotl_model(cfg, model)
    routing = auto_routing(model)
    assert isinstance(routing.resolver, StageRouter)
    seen = []
    inner = routing.resolver
    routing.resolver = lambda i, k: seen.append(i.shape) or inner(i, k)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    assert seen[0] == ids["input_ids"].shape and seen[1:] == [(1, 1), (1, 1)]
    assert inner.step_ids(out)[0, 0].item() == 2  # routed by the <|response|> marker


def test_prompt_routing_override_changes_the_prompt_expert(mote):
    """prompt_routing='shared' / a stage really reroutes the prompt (and is
    restored)."""
    from axolotl_mote.tuner.model import get_routing_state

    state = get_routing_state(mote[0])
    outs = {
        routing: _gen(
            mote,
            prompts=PROMPTS[:1],
            plan=["answer"],
            output_logits=True,
            prompt_routing=routing,
        )[0]
        for routing in ("shared", "analysis", "answer")
    }
    firsts = [
        o.logits[0] for o in outs.values()
    ]  # depends only on the prompt's routing
    assert not torch.allclose(firsts[0], firsts[1])
    assert not torch.allclose(firsts[1], firsts[2])
    from axolotl_mote.generation.auto import auto_routing

    assert state.prompt_routing == "random" and auto_routing(mote[0]) is None


@pytest.mark.parametrize("flag", [True, False])
def test_inference_is_read_from_the_calling_model_loader(flag):
    """The hooks get no `inference` flag; the ModelLoader calling them has it."""
    from axolotl.loaders.model import ModelLoader
    from axolotl.utils.dict import DictDefault

    from axolotl_mote.integration.model import loading_for_inference

    def post_lora_load_called_by_loader():
        self = ModelLoader.__new__(ModelLoader)  # noqa: F841 - the frame local it reads
        self.inference = flag
        return loading_for_inference(DictDefault())

    assert post_lora_load_called_by_loader() is flag
    assert loading_for_inference(DictDefault()) is False


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_router_routes_a_plain_peft_forward(mote, tiny_model_dir, task_type):
    """install_router also covers model(...) on the PEFT wrapper. PeftModelForCausalLM
    (what Axolotl builds) reaches the transformers model through .forward, skipping its
    hooks; plain PeftModel calls it, so both entry points fire and must resolve once."""
    from axolotl_mote.generation import install_router
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    _, tokenizer, template = mote
    model, _ = build_mote(tiny_model_dir, tokenizer, template, task_type=task_type)
    assert (type(model).__name__ == "PeftModelForCausalLM") == (
        task_type == "CAUSAL_LM"
    )
    ids = tokenizer(
        "hi <|analysis|> a b <|/analysis|><|response|> c", return_tensors="pt"
    )
    from axolotl_mote.generation.auto import auto_routing, uninstall

    state = get_routing_state(model)
    router = install_router(model, tokenizer)
    calls = []
    auto_routing(model).resolver = lambda i, k: calls.append(1) or router(i, k)
    steps = router.step_ids(ids["input_ids"])
    with torch.no_grad():
        routed = model(**ids).logits
        uninstall(model)
        with route(state, steps, draw_key=0):
            explicit = model(**ids).logits
    assert calls == [1]  # resolved once per call, whichever entry points fired
    assert not state.is_set  # the auto routing was cleared after the call
    torch.testing.assert_close(routed, explicit, rtol=0, atol=1e-6)
    assert set(steps[0].tolist()) >= {0, 2}


def _prompt_experts(mote, prompts):
    """The expert each prompt's tokens were routed to in the prefill of
    generate_chains."""
    from axolotl_mote.tuner.model import get_routing_state

    model, _, _ = mote
    state = get_routing_state(model)
    seen = []

    def spy(module, args):
        if not seen:
            seen.append(state.step_ids.clone())

    handle = model.get_output_embeddings().register_forward_pre_hook(spy)
    try:
        _gen(mote, prompts=prompts, plan=["answer"], max_new_tokens=3)
    finally:
        handle.remove()
    steps = seen[0]  # [B, L] of the prefill: left padding, prompt, prefilled marker
    out = []
    for row in steps.tolist():
        prompt = [s for s in row[:-1] if s != -1]  # drop padding and the marker
        assert len(set(prompt)) == 1, row  # one expert per prompt
        out.append(prompt[0])
    return out


def test_random_prompt_routing_varies_and_follows_the_prompt_not_the_row(mote):
    """Inference draws one expert per prompt, keyed by the prompt: different prompts
    draw different experts, and a prompt draws the same one in any batch position."""
    prompts = [f"Question number {i}: how do I bake bread?" for i in range(12)]
    drawn = _prompt_experts(mote, prompts)
    assert len(set(drawn)) >= 2, drawn
    moved = _prompt_experts(mote, [prompts[5], prompts[0], prompts[3]])
    assert moved == [drawn[5], drawn[0], drawn[3]]


def test_a_multi_token_forward_continuing_the_cache_on_a_left_padded_batch(mote):
    """Prefill, then a chunk of several tokens on the KV cache, left padding: the chunk
    is routed (markers, prompt, padding) and computed exactly as one full forward."""
    from axolotl_mote.generation import install_router
    from axolotl_mote.generation.auto import uninstall

    model, tokenizer, template = mote
    from axolotl_mote.data.format import ChainFormatter

    fmt = ChainFormatter(template, tokenizer)
    ids = fmt.marker_ids
    rows = [
        fmt.prompt_ids([{"role": "user", "content": "hi"}])
        + [ids["<|analysis|>"], 40, 41, ids["<|/analysis|>"], ids["<|response|>"], 42],
        fmt.prompt_ids([{"role": "user", "content": "How do I bake bread at home?"}])
        + [ids["<|response|>"], 43, 44, 45, 46, 47],
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    router = install_router(model, tokenizer)
    try:
        with torch.no_grad():
            full = model(input_ids=input_ids, attention_mask=mask).logits
            cut = width - 5  # the chunk holds markers of both rows
            first = model(
                input_ids=input_ids[:, :cut],
                attention_mask=mask[:, :cut],
                use_cache=True,
            )
            chunk = model(
                input_ids=input_ids[:, cut:],
                attention_mask=mask,
                past_key_values=first.past_key_values,
            ).logits
    finally:
        uninstall(model)
    torch.testing.assert_close(chunk, full[:, cut:], atol=1e-5, rtol=1e-5)
    # and the routing of the chunk is the full sequence's
    steps = router.step_ids(input_ids, mask)
    assert steps[0, -1].item() == 2 and steps[1, -1].item() == 2
    assert (steps[mask == 0] == -1).all()
