"""What a careless client sends: every malformed request is a 4xx JSON error naming the
field, and the server answers a normal request right after it. Plus the fields real
clients rely on: usage, max_tokens 0, max_completion_tokens, stop, echo + logprobs,
lists of prompts, streaming.

One server on 127.0.0.1 for the module; raw HTTP through ``httpx`` (what the ``openai``
client is built on) where the body must be malformed, the ``openai`` client elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("openai")

MAX_MODEL_LEN = 512
BODY_LIMIT = 64 * 1024
HELLO = [{"role": "user", "content": "How do I bake bread at home?"}]


@pytest.fixture(scope="module")
def server(saved):
    from axolotl_mote.serving.server import MoteWorker, ServerThread, build_app

    _, model, tokenizer = saved
    worker = MoteWorker(
        model, tokenizer, max_batch=4, batch_wait=0.05, max_model_len=MAX_MODEL_LEN
    )
    app = build_app(worker, max_body_bytes=BODY_LIMIT)
    with ServerThread(app) as thread:
        yield thread, worker
    worker.close()


@pytest.fixture(scope="module")
def http(server):
    import httpx

    thread, _ = server
    with httpx.Client(base_url=thread.root, timeout=60) as client:
        yield client


def _chat(**fields) -> dict:
    return {"model": "mote", "messages": HELLO, "max_tokens": 4, **fields}


def _json(body) -> bytes:
    return json.dumps(body).encode()


# (case id, path, raw body, expected status, expected `param`, text in the message)
BAD = [
    ("not-json", "/v1/chat/completions", b'{"model": "mote", "messages": [', 400,
     None, "not valid JSON"),
    ("not-utf8", "/v1/chat/completions",
     b'{"model": "mote", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
     400, None, "UTF-8"),
    ("json-list", "/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("json-string", "/v1/completions", b'"hello"', 400, None, "JSON object"),
    ("empty-body", "/v1/chat/completions", b"", 400, None, ""),
    ("no-model", "/v1/chat/completions", _json({"messages": HELLO}), 400, "model",
     "required"),
    ("unknown-role", "/v1/chat/completions",
     _json(_chat(messages=[{"role": "wizard", "content": "hi"}])), 400,
     "messages[0].role", "wizard"),
    ("content-not-string", "/v1/chat/completions",
     _json(_chat(messages=[{"role": "user", "content": 5}])), 400,
     "messages[0].content", ""),
    ("no-messages", "/v1/chat/completions", _json(_chat(messages=[])), 400,
     "messages", "at least 1"),
    ("ends-with-assistant", "/v1/chat/completions",
     _json(_chat(messages=[*HELLO, {"role": "assistant", "content": "ok"}])), 400,
     "messages", "user turn"),
    ("system-not-first", "/v1/chat/completions",
     _json(_chat(messages=[*HELLO, {"role": "system", "content": "x"}, *HELLO])),
     400, "messages", "only the first"),
    ("n-2", "/v1/chat/completions", _json(_chat(n=2)), 400, "n", "one choice"),
    ("max-tokens-string", "/v1/chat/completions", _json(_chat(max_tokens="5")), 400,
     "max_tokens", "integer"),
    ("max-tokens-float", "/v1/chat/completions", _json(_chat(max_tokens=2.5)), 400,
     "max_tokens", "integer"),
    ("max-tokens-negative", "/v1/chat/completions", _json(_chat(max_tokens=-1)),
     400, "max_tokens", "greater than or equal to 0"),
    ("temperature-high", "/v1/chat/completions", _json(_chat(temperature=3)), 400,
     "temperature", "less than or equal to 2"),
    ("seed-negative", "/v1/chat/completions", _json(_chat(seed=-1)), 400, "seed",
     ""),
    ("too-many-stops", "/v1/chat/completions",
     _json(_chat(stop=[str(i) for i in range(17)])), 400, "stop", "at most 16"),
    ("stream-options-alone", "/v1/chat/completions",
     _json(_chat(stream_options={"include_usage": True})), 400, None, "stream"),
    ("unknown-plan", "/v1/chat/completions", _json(_chat(plan="nonsense")), 400,
     "plan", "nonsense"),
    ("unknown-stage-limit", "/v1/chat/completions",
     _json(_chat(max_stage_tokens={"nope": 3})), 400, "max_stage_tokens", "nope"),
    ("chat-logprobs", "/v1/chat/completions", _json(_chat(logprobs=True)), 400,
     "logprobs", "not supported"),
    ("chat-tools", "/v1/chat/completions",
     _json(_chat(tools=[{"type": "function", "function": {"name": "f"}}])), 400,
     "tools", "not supported"),
    ("chat-json-mode", "/v1/chat/completions",
     _json(_chat(response_format={"type": "json_object"})), 400, "response_format",
     "text"),
    ("chat-wrong-model", "/v1/chat/completions", _json(_chat(model="gpt-4")), 404,
     "model", "gpt-4"),
    ("over-context", "/v1/chat/completions", _json(_chat(max_tokens=10**6)), 400,
     "max_tokens", f"maximum context length is {MAX_MODEL_LEN} tokens"),
    ("over-context-completion-tokens", "/v1/chat/completions",
     _json(_chat(max_completion_tokens=MAX_MODEL_LEN)), 400, "max_tokens",
     f"{MAX_MODEL_LEN} in the completion"),
    ("body-too-large", "/v1/chat/completions",
     _json(_chat(messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 1)}])),
     413, None, "limit"),
    ("prompt-not-text", "/v1/completions",
     _json({"model": "prompt", "prompt": 5, "max_tokens": 2}), 400, "prompt", ""),
    ("prompt-outside-vocab", "/v1/completions",
     _json({"model": "prompt", "prompt": [10**6], "max_tokens": 2}), 400, "prompt",
     "outside the vocabulary"),
    ("prompt-empty-list", "/v1/completions",
     _json({"model": "prompt", "prompt": [], "max_tokens": 2}), 400, "prompt", ""),
    ("prompt-over-context", "/v1/completions",
     _json({"model": "prompt", "prompt": [5] * (MAX_MODEL_LEN + 1)}), 400, "prompt",
     f"{MAX_MODEL_LEN + 1} tokens"),
    ("logprobs-too-many", "/v1/completions",
     _json({"model": "prompt", "prompt": "hi", "logprobs": 50}), 400, "logprobs",
     ""),
    ("logit-bias-key", "/v1/completions",
     _json({"model": "prompt", "prompt": "hi", "logit_bias": {"a": 1}}), 400,
     "logit_bias", "token ids"),
    ("unknown-adapter", "/v1/completions",
     _json({"model": "nope", "prompt": "hi"}), 404, "model", "unknown adapter"),
    ("stream-with-logprobs", "/v1/completions",
     _json({"model": "prompt", "prompt": "hi", "stream": True, "logprobs": 1}), 400,
     None, "not supported with stream"),
    ("lone-surrogate", "/v1/chat/completions",
     b'{"model": "mote", "messages": [{"role": "user", "content": "a\\ud800"}]}',
     400, None, ""),
    ("lone-surrogate-prompt", "/v1/completions",
     b'{"model": "prompt", "prompt": "a\\ud800"}', 400, None, ""),
    ("completion-n-3", "/v1/completions",
     _json({"model": "prompt", "prompt": "hi", "n": 3}), 400, "n", "one choice"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "text"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_a_bad_request_is_a_json_error_and_the_server_goes_on(
    http, path, body, status, param, text
):
    reply = http.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert text in error["message"], error
    assert isinstance(error["type"], str) and error["code"] == status
    ok = http.post("/v1/chat/completions", json=_chat(max_tokens=2))
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_over_context_names_both_numbers(http, saved):
    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.templates import load_template

    _, _, tokenizer = saved
    prompt = len(ChainFormatter(load_template("aligncot"), tokenizer).prompt_ids(HELLO))
    reply = http.post("/v1/chat/completions", json=_chat(max_tokens=1000))
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in message
    assert f"requested {prompt + 1000} tokens ({prompt} in the messages" in message


def test_usage_counts_prompt_and_generated_tokens(http, saved):
    """usage against the prompt rendered in-process and generate_chains' own tokens;
    max_completion_tokens wins over max_tokens; max_tokens 0 generates nothing."""
    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.generation import generate_chains
    from axolotl_mote.templates import load_template

    _, model, tokenizer = saved
    prompt = len(ChainFormatter(load_template("aligncot"), tokenizer).prompt_ids(HELLO))
    body = _chat(max_tokens=50, max_completion_tokens=6)
    reply = http.post("/v1/chat/completions", json=body).json()
    usage = reply["usage"]
    (exact,) = generate_chains(model, tokenizer, HELLO, max_new_tokens=6)
    assert usage["prompt_tokens"] == prompt
    assert usage["completion_tokens"] == len(exact.token_ids) <= 6
    assert usage["total_tokens"] == prompt + usage["completion_tokens"]
    # a forced plan pre-fills its first marker: an input token, not a generated one
    forced = http.post("/v1/chat/completions",
                       json=_chat(max_tokens=5, plan="answer")).json()  # fmt: skip
    assert forced["usage"]["prompt_tokens"] == prompt + 1
    assert forced["usage"]["completion_tokens"] <= 5
    zero = http.post("/v1/chat/completions", json=_chat(max_tokens=0)).json()
    assert zero["choices"][0]["message"]["content"] == ""
    assert zero["choices"][0]["finish_reason"] == "length"
    assert zero["usage"] == {"prompt_tokens": prompt, "completion_tokens": 0,
                             "total_tokens": prompt}  # fmt: skip
    none = http.post(
        "/v1/completions",
        json={"model": "prompt", "prompt": [5, 6, 7], "max_tokens": 0},
    )
    assert none.json()["choices"][0]["text"] == ""
    assert none.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 0,
                                    "total_tokens": 3}  # fmt: skip


def _reference_logprobs(model, step: int, ids: list[int]) -> torch.Tensor:
    """[L, V] log-probabilities with every token routed to ``step`` (the routing
    context itself, not the server's code)."""
    from axolotl_mote.routing import route
    from axolotl_mote.tuner.model import get_routing_state

    tensor = torch.tensor([ids])
    with (
        torch.no_grad(),
        route(get_routing_state(model), torch.full_like(tensor, step)),
    ):
        logits = model(input_ids=tensor).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_echo_and_logprobs_over_a_list_of_prompts(http, saved):
    """lm-eval's loglikelihood request: token-id prompts, one new token, echo,
    logprobs."""
    _, model, tokenizer = saved
    prompts = [
        tokenizer("The cat sat")["input_ids"],
        tokenizer("on a mat")["input_ids"],
    ]
    reply = http.post("/v1/completions", json={
        "model": "question_analysis", "prompt": prompts, "max_tokens": 1, "echo": True,
        "logprobs": 2, "temperature": 0,
    }).json()  # fmt: skip
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    for ids, choice in zip(prompts, reply["choices"]):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 1  # the prompt, then one token
        assert logprobs["token_logprobs"][0] is None
        assert logprobs["top_logprobs"][0] is None
        ref = _reference_logprobs(model, 0, ids)  # step 0: question_analysis
        next_token = int(ref[-1].argmax())  # greedy
        full = ids + [next_token]
        ref = _reference_logprobs(model, 0, full)
        for pos in range(1, len(full)):
            want = float(ref[pos - 1, full[pos]])
            assert logprobs["token_logprobs"][pos] == pytest.approx(want, abs=1e-4)
            top = logprobs["top_logprobs"][pos]
            assert max(top.values()) == pytest.approx(
                float(ref[pos - 1].max()), abs=1e-4
            )
        # the prompt's tokens decoded, then the new token (special tokens skipped)
        new = tokenizer.decode([next_token], skip_special_tokens=True)
        assert choice["text"] == tokenizer.decode(ids) + new
    assert reply["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert reply["usage"]["completion_tokens"] == 2


def test_string_prompts_echo_the_prompt_as_received(http):
    prompts = ["Hello there", "What is  two plus two?"]
    reply = http.post("/v1/completions", json={
        "model": "prompt", "prompt": prompts, "max_tokens": 3, "echo": True,
    }).json()  # fmt: skip
    singles = [
        http.post("/v1/completions",
                  json={"model": "prompt", "prompt": p, "max_tokens": 3}).json()
        for p in prompts
    ]  # fmt: skip
    for prompt, choice, single in zip(prompts, reply["choices"], singles):
        assert choice["text"] == prompt + single["choices"][0]["text"]


def _no_markers(tokenizer) -> dict[str, float]:
    """logit_bias that keeps the tiny model off its (trained, likely) markers and
    end of sequence, so it writes text."""
    from axolotl_mote.markers import marker_token_ids
    from axolotl_mote.templates import load_template

    ids = [*marker_token_ids(load_template("aligncot"), tokenizer).values()]
    return {str(i): -100 for i in [*ids, tokenizer.eos_token_id]}


def test_stop_strings_cut_the_text(http, saved):
    """The text without ``stop`` decides the expectation: cut before its first
    occurrence, finish_reason "stop" (completions, and chat on the answer)."""
    base = {"model": "question_analysis", "prompt": "Once upon a time",
            "max_tokens": 12, "logit_bias": _no_markers(saved[2])}  # fmt: skip
    full = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    assert len(full) > 4
    stop = full[3:5]
    cut = http.post("/v1/completions", json={**base, "stop": [stop]}).json()
    choice = cut["choices"][0]
    assert choice["text"] == full[: full.find(stop)]
    assert choice["finish_reason"] == "stop"
    chat = _chat(max_tokens=24, plan="answer", temperature=0)
    answer = http.post("/v1/chat/completions", json=chat).json()
    text = answer["choices"][0]["message"]["content"]
    assert len(text) > 4, answer
    stop = text[2:4]
    cut = http.post("/v1/chat/completions", json={**chat, "stop": stop}).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    # streamed, the stop string is held back and cut the same way
    streamed, finish = "", None
    with http.stream("POST", "/v1/chat/completions",
                     json={**chat, "stop": stop, "stream": True}) as reply:  # fmt: skip
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                streamed += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    assert (streamed, finish) == (text[: text.find(stop)], "stop")
    # the chain ended early: the stop string ended generation, not only the text
    assert cut["usage"]["completion_tokens"] <= answer["usage"]["completion_tokens"]


def test_streaming_gives_the_non_streamed_text(server):
    from openai import OpenAI

    thread, _ = server
    api = OpenAI(base_url=thread.url, api_key="EMPTY", max_retries=0)
    kwargs = {"model": "mote", "messages": HELLO, "max_tokens": 24, "temperature": 0,
              "extra_body": {"max_stage_tokens": 6}}  # fmt: skip
    whole = api.chat.completions.create(**kwargs)
    chunks = list(api.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
        whole.usage.total_tokens,
    )
    events = [c.model_extra.get("mote") for c in chunks if c.choices]
    starts = [e["stage"] for e in events if e and e.get("event") == "start"]
    assert starts == whole.model_extra["mote"]["plan"]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finals[:-1])
    base = {"model": "answer_guidance", "prompt": "Tell me a story", "max_tokens": 10}
    once = api.completions.create(**base)
    streamed = "".join(
        c.choices[0].text for c in api.completions.create(**base, stream=True)
    )
    assert streamed == once.choices[0].text


def test_a_body_sent_as_a_form_is_told_to_send_json(http):
    """curl -d without -H sends application/x-www-form-urlencoded."""
    reply = http.post(
        "/v1/chat/completions",
        content=_json(_chat()),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 400
    assert "Content-Type: application/json" in reply.json()["error"]["message"]


def test_tokenize_detokenize_and_tokenizer_info(http, saved):
    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.templates import load_template

    _, _, tokenizer = saved
    text = http.post("/tokenize", json={"prompt": "Hello there"}).json()
    assert text["tokens"] == tokenizer("Hello there")["input_ids"]
    assert text["count"] == len(text["tokens"])
    assert text["max_model_len"] == MAX_MODEL_LEN
    chat = http.post("/tokenize", json={"messages": HELLO}).json()
    formatter = ChainFormatter(load_template("aligncot"), tokenizer)
    assert chat["tokens"] == formatter.prompt_ids(HELLO)
    back = http.post("/detokenize", json={"tokens": text["tokens"]}).json()
    assert back["prompt"] == tokenizer.decode(text["tokens"])
    info = http.get("/tokenizer_info").json()
    assert info["vocab_size"] == len(tokenizer)
    assert info["eos_token"] == tokenizer.eos_token
    assert http.post("/tokenize", json={"prompt": 5}).status_code == 400
    surrogate = b'{"prompt": "a\\ud800"}'
    assert http.post("/tokenize", content=surrogate).status_code == 400
    assert http.post("/detokenize", json={"tokens": [10**7]}).status_code == 400


def test_text_parts_are_the_same_as_a_string(http):
    parts = [{"type": "text", "text": "How do I bake "},
             {"type": "text", "text": "bread at home?"}]  # fmt: skip
    as_parts = http.post(
        "/v1/chat/completions",
        json=_chat(messages=[{"role": "user", "content": parts}], max_tokens=8),
    ).json()
    as_text = http.post("/v1/chat/completions", json=_chat(max_tokens=8)).json()
    assert as_parts["mote"]["text"] == as_text["mote"]["text"]
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    refused = http.post(
        "/v1/chat/completions",
        json=_chat(messages=[{"role": "user", "content": image}]),
    )
    assert refused.status_code == 400
