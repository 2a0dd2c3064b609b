"""lm-evaluation-harness against ``axolotl-mote serve`` on loopback, offline.

Two small tasks written here: a generation task whose targets end where a stop string
cuts the model's greedy text (a server that ignores ``stop`` scores 0 on the docs the
stop cuts), and a multiple-choice task (loglikelihood: token-id prompts, ``echo``,
``logprobs``). ``local-completions`` runs both, ``local-chat-completions`` the
generation task; the scores and the per-choice loglikelihoods must equal the same
computation done in-process (``complete_with_adapter`` / ``generate_chains`` and a
routed forward).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need it (`lm_eval[api]`)

ADAPTER = "safe_answer"
QUESTIONS = ["Name a color.", "What is two plus two?", "Say hello.", "Pick a number."]
MC = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "label": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "label": 0},
    {"question": "Water is", "choices": [" dry", " wet", " red"], "label": 1},
]
GEN_TOKENS = 16
LM_EVAL_SEED = 1234  # simple_evaluate's default, sent in every request


@pytest.fixture(scope="module")
def server(saved):
    from axolotl_mote.serving.server import MoteWorker, ServerThread, build_app

    _, model, tokenizer = saved
    worker = MoteWorker(model, tokenizer, max_batch=4, batch_wait=0.01)
    with ServerThread(build_app(worker)) as thread:
        yield thread
    worker.close()


def _stop_and_targets(texts: list[str]) -> tuple[str, list[str]]:
    """A stop string that cuts most of ``texts`` inside (the most common character
    past their first), and each text cut at it."""
    counts = Counter(ch for t in texts for ch in set(t[1:]) if not ch.isspace())
    stop = counts.most_common(1)[0][0]
    return stop, [t.split(stop)[0] for t in texts]


def _write_task(folder, name: str, rows: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\n{body}"
    )


def _gen_body(stop: str) -> str:
    return (
        'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{target}}"\ngeneration_kwargs:\n'
        f"  until: [{json.dumps(stop)}]\n  max_gen_toks: {GEN_TOKENS}\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )


MC_BODY = (
    'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
    'doc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
    "metric_list:\n  - metric: acc\n"
)


def _loglikelihood(model, tokenizer, step: int, context: str, continuation: str):
    """lm-eval's split of context and continuation (``_encode_pair``), scored by one
    forward with every token routed to the adapter's stage."""
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctxlen = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad(), route(get_routing_state(model), torch.full_like(ids, step)):
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(ctxlen, len(whole)))


def test_lm_eval_scores_equal_the_in_process_computation(saved, server, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from axolotl_mote.generation import generate_chains
    from axolotl_mote.serving.engine import complete_with_adapter
    from axolotl_mote.tuner.config import MoteConfig

    adapter, model, tokenizer = saved
    step = MoteConfig.load(adapter).stage_names.index(ADAPTER)
    # --- in process: the completions' greedy text, the chat answers, the scores
    texts = []
    for q in QUESTIONS:
        ids = tokenizer(q, add_special_tokens=False)["input_ids"]
        out = complete_with_adapter(model, ADAPTER, ids, max_tokens=GEN_TOKENS)
        texts.append(tokenizer.decode(out.token_ids, skip_special_tokens=True))
    stop, targets = _stop_and_targets(texts)
    assert any(t != full for t, full in zip(targets, texts))  # the stop matters
    # lm-eval sends seed 1234, which the server uses for the random prompt expert
    chats = generate_chains(
        model, tokenizer, QUESTIONS, max_new_tokens=GEN_TOKENS, seed=LM_EVAL_SEED
    )
    answers = [c.answer or "" for c in chats]
    chat_stop, chat_targets = _stop_and_targets(answers)
    assert any(t != full for t, full in zip(chat_targets, answers))
    scores = [
        [_loglikelihood(model, tokenizer, step, d["question"], c) for c in d["choices"]]
        for d in MC
    ]
    acc = sum(max(range(len(s)), key=s.__getitem__) == d["label"]
              for s, d in zip(scores, MC)) / len(MC)  # fmt: skip
    # --- the tasks
    _write_task(tmp_path, "mote_gen",
                [{"question": q, "target": t} for q, t in zip(QUESTIONS, targets)],
                _gen_body(stop))  # fmt: skip
    _write_task(tmp_path, "mote_chat_gen",
                [{"question": q, "target": t} for q, t in zip(QUESTIONS, chat_targets)],
                _gen_body(chat_stop))  # fmt: skip
    _write_task(tmp_path, "mote_mc", MC, MC_BODY)
    tasks = TaskManager(include_path=str(tmp_path))
    common = {"num_concurrent": 1, "max_retries": 1, "timeout": 60}
    completions = simple_evaluate(
        model="local-completions",
        model_args={
            "model": ADAPTER,
            "base_url": f"{server.url}/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(adapter),
            **common,
        },  # fmt: skip
        tasks=["mote_gen", "mote_mc"],
        task_manager=tasks,
        log_samples=True,
    )
    chat = simple_evaluate(
        model="local-chat-completions",
        model_args={
            "model": "mote",
            "base_url": f"{server.url}/chat/completions",
            **common,
        },  # fmt: skip
        tasks=["mote_chat_gen"],
        task_manager=tasks,
        apply_chat_template=True,
        log_samples=True,
    )
    # --- scores and what produced them
    results = completions["results"]
    assert results["mote_gen"]["exact_match,none"] == 1.0
    assert results["mote_mc"]["acc,none"] == pytest.approx(acc)
    for sample in completions["samples"]["mote_mc"]:
        want = scores[sample["doc_id"]]
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-4)
    gen = {s["doc_id"]: s["resps"][0][0] for s in completions["samples"]["mote_gen"]}
    assert [gen[i] for i in range(len(QUESTIONS))] == targets
    assert chat["results"]["mote_chat_gen"]["exact_match,none"] == 1.0
