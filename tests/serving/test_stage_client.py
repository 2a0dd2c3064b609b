"""The stage-switching client against a scripted server that honours stop ids.

The HTTP-vs-in-process test (tests/serving/test_serving.py) compares two clients with
each other, and with a few tokens per stage on a random model no end marker is ever
generated. Here each adapter "writes" a fixed script: its stage's text, its end marker,
then text it would go on with. The client must ask to stop at the stage's *end* marker:
a stop at any other token lets the text after the end marker into the chain.
"""

from __future__ import annotations

import pytest

from axolotl_mote.serving.client import StageClient

STAGE_TEXT = {
    "question_analysis": "The user wants to bake bread.",
    "answer_guidance": "Give simple steps.",
    "safe_answer": "Mix flour and water, then bake.",
}
AFTER_END = " and more text after the end marker"


class ScriptedBackend:
    """Like a completions server: emits its script until a stop id (not returned) or
    ``max_tokens``. Adaptive stage choice: the allowed start marker it was scripted to
    prefer."""

    def __init__(self, scripts: dict[str, list[int]], prefer: list[int]):
        self.scripts, self.prefer, self.calls = scripts, list(prefer), []

    def complete(self, adapter, prompt_ids, *, max_tokens, stop_token_ids,
                 logit_bias=None):  # fmt: skip
        self.calls.append((adapter, max_tokens, list(stop_token_ids)))
        if logit_bias:  # the stage choice: one token among the biased markers
            pick = next(t for t in self.prefer if t in logit_bias)
            return [pick], "length"
        out: list[int] = []
        for token in self.scripts[adapter]:
            if token in stop_token_ids:
                return out, "stop"
            if len(out) == max_tokens:
                return out, "length"
            out.append(token)
        return out, "length"


@pytest.fixture()
def client_parts(tiny_tokenizer, aligncot):
    from axolotl_mote.markers import marker_token_ids

    tok = tiny_tokenizer
    ids = marker_token_ids(aligncot, tok)
    stages = [
        {"name": s.name, "start_id": ids[s.start], "end_id": ids[s.end],
         "skippable": s.skippable, "adapter": s.name}
        for s in aligncot.trained_stages
    ]  # fmt: skip
    manifest = {
        "template_data": aligncot.model_dump(mode="json", exclude={"source"}),
        "answer_stage": aligncot.answer_stage,
        "prompt_adapter": "prompt",
        "stages": stages,
    }

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    content = {name: encode(text) for name, text in STAGE_TEXT.items()}
    tail = encode(AFTER_END)
    scripts = {
        # text, own end marker, then more text, the next stage's start marker, more
        s["name"]: content[s["name"]] + [s["end_id"]] + tail
        + [stages[(i + 1) % 3]["start_id"]] + tail
        for i, s in enumerate(stages)
    }  # fmt: skip
    return tok, manifest, stages, content, scripts


def test_each_stage_ends_at_its_end_marker(client_parts):
    tok, manifest, stages, content, scripts = client_parts
    backend = ScriptedBackend(scripts, prefer=[])
    client = StageClient(backend, manifest, tok)
    chain = client.generate("How do I bake bread?", plan=["analysis", "answer"],
                            max_new_tokens=200)  # fmt: skip
    analysis, answer = stages[0], stages[2]
    assert chain.plan == ["question_analysis", "safe_answer"]
    assert chain.token_ids == (
        [analysis["start_id"]] + content["question_analysis"] + [analysis["end_id"]]
        + [answer["start_id"]] + content["safe_answer"] + [answer["end_id"]]
    )  # fmt: skip
    assert chain.stages == {
        "question_analysis": STAGE_TEXT["question_analysis"],
        "safe_answer": STAGE_TEXT["safe_answer"],
    }
    assert chain.answer == STAGE_TEXT["safe_answer"]
    assert chain.finish_reason == "answer_end"
    stops = [stop for adapter, _, stop in backend.calls]
    assert stops == [[analysis["end_id"]], [answer["end_id"]]]


def test_adaptive_choice_then_stage_text_up_to_the_end_marker(client_parts):
    """The model picks guidance after the prompt, then the answer (which it must)."""
    tok, manifest, stages, content, scripts = client_parts
    prefer = [stages[1]["start_id"], stages[2]["start_id"]]
    client = StageClient(ScriptedBackend(scripts, prefer), manifest, tok)
    chain = client.generate("How do I bake bread?", max_new_tokens=200)
    assert chain.plan == ["answer_guidance", "safe_answer"]
    assert chain.stages == {k: STAGE_TEXT[k] for k in chain.plan}


def test_a_stage_token_limit_cuts_the_text_and_closes_the_stage(client_parts):
    tok, manifest, stages, content, scripts = client_parts
    client = StageClient(ScriptedBackend(scripts, []), manifest, tok)
    chain = client.generate("Hi", plan=["answer"], max_stage_tokens=2)
    answer = stages[2]
    assert chain.token_ids == (
        [answer["start_id"]] + content["safe_answer"][:2] + [answer["end_id"]]
    )


def test_per_stage_token_limits_by_name_or_key(client_parts):
    """``max_stage_tokens`` per stage, as generate and evaluate take it: analysis
    (by its record key) capped at 2, the answer (by name) at 3, guidance uncapped."""
    tok, manifest, stages, content, scripts = client_parts
    for stage, key in zip(manifest["stages"], ("analysis", "guidance", "answer")):
        stage["key"] = key  # what the bundle manifest records
    client = StageClient(ScriptedBackend(scripts, []), manifest, tok)
    chain = client.generate(
        "Hi", plan=["analysis", "guidance", "answer"], max_new_tokens=200,
        max_stage_tokens={"analysis": 2, "safe_answer": 3},
    )  # fmt: skip
    a, g, ans = stages
    assert chain.token_ids == (
        [a["start_id"]] + content["question_analysis"][:2] + [a["end_id"]]
        + [g["start_id"]] + content["answer_guidance"] + [g["end_id"]]
        + [ans["start_id"]] + content["safe_answer"][:3] + [ans["end_id"]]
    )  # fmt: skip
