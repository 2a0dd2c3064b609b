"""The request bodies ``axolotl-mote serve`` accepts, as Pydantic models.

FastAPI validates every body against these before a handler runs; a body that does
not fit is answered by :func:`validation_error` with a 400 in OpenAI's error format,
``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the first field
at fault (``messages[1].role``). Only the fields the server reads are declared; other
fields are ignored, as vLLM ignores them. Types are strict (``"5"`` is not a number,
``1.0`` is not a token count) so a wrong type is never silently coerced.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

#: Largest seed torch accepts (``torch.manual_seed`` takes a signed 64-bit integer).
MAX_SEED = 2**63 - 1
#: Top log-probabilities returned per token at most (vLLM's default cap is 20).
MAX_LOGPROBS = 20
#: Stop strings per request at most.
MAX_STOP = 16

Count = Annotated[StrictInt, Field(ge=0)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
TokenId = Annotated[StrictInt, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class TextPart(BaseModel):
    """A ``{"type": "text", "text": ...}`` content part (other kinds: 400)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(BaseModel):
    """Fields both endpoints read."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: Count | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: StrictInt = 1
    seed: Seed | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(
                f"n={n}: this server returns one choice per request; send n=1 (or "
                "leave it out) and repeat the request for more samples"
            )
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None:
            if len(stops) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
            if any(not s for s in stops):
                raise ValueError("stop strings must not be empty")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: OpenAI's fields plus ``plan`` and
    ``max_stage_tokens`` (MoTE's)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    plan: StrictStr | list[StrictStr] | None = None
    max_stage_tokens: (
        Annotated[StrictInt, Field(ge=1)]
        | dict[str, Annotated[StrictInt, Field(ge=1)]]
        | None
    ) = None

    # fields of OpenAI's schema this server cannot honour: refused, not ignored
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None
    logit_bias: Any = None

    @field_validator("tools", "tool_choice", "functions", "logit_bias")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported on this server")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value and not (isinstance(value, dict) and value.get("type") == "text"):
            raise ValueError("only response_format {'type': 'text'} is supported")
        return value

    @field_validator("messages")
    @classmethod
    def _conversation(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The rules the data format enforces (``data/schema.py``)."""
        for i, msg in enumerate(messages):
            if msg.role == "system" and i != 0:
                raise ValueError(
                    f"messages[{i}] is a system message; only the first may be"
                )
        last = messages[-1]
        if last.role != "user":
            raise ValueError(
                "the conversation must end with a user turn (the chain answers the "
                f"last user message); messages[{len(messages) - 1}] is {last.role!r}"
            )
        if not last.text().strip():
            raise ValueError(f"messages[{len(messages) - 1}].content is empty")
        return messages

    @field_validator("logprobs")
    @classmethod
    def _no_chat_logprobs(cls, value):
        if value:
            raise ValueError(
                "chat logprobs are not supported (a chain's tokens come from several "
                "experts); use /v1/completions with logprobs, or leave it out"
            )
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value):
        if value:
            raise ValueError("top_logprobs is not supported on chat completions")
        return value

    def requested_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) wins over
        ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


Prompt = (
    StrictStr
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[StrictStr], Field(min_length=1)]
    | Annotated[
        list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)
    ]
)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: OpenAI's legacy fields plus vLLM's
    ``stop_token_ids``, ``return_token_ids`` and ``skip_special_tokens``."""

    prompt: Prompt
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stop_token_ids: list[TokenId] | None = None
    return_token_ids: StrictBool = False
    skip_special_tokens: StrictBool = True
    suffix: StrictStr | None = None

    @field_validator("logit_bias")
    @classmethod
    def _integer_keys(cls, bias):
        for key in bias or {}:
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
        return bias

    @model_validator(mode="after")
    def _streams_text_only(self):
        if self.stream and (self.echo or self.logprobs is not None):
            raise ValueError(
                "echo and logprobs are not supported with stream: true; send the "
                "request without stream"
            )
        return self

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported")
        return value

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


def error_body(
    message: str, *, status: int, param: str | None = None, code: Any = None
) -> dict:
    kind = (
        "invalid_request_error"
        if status < 500 and status not in (401, 404, 413, 429)
        else {
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
        }.get(status, "server_error")
    )
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code if code is not None else status,
        }
    }


def field_path(loc: tuple) -> str | None:
    """``("body", "messages", 1, "role")`` -> ``messages[1].role``."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]"):
            continue  # union branch names
        elif str(part).startswith(("constrained-", "list[", "function-")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def describe_errors(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for FastAPI's validation errors of one body."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None
    if first.get("type") in ("model_attributes_type", "dict_type") and (
        tuple(first.get("loc", ())) == ("body",)
    ):
        return "the request body must be a JSON object", None
    seen: list[str] = []
    for err in errors:
        path = field_path(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        got = err.get("input")
        if isinstance(got, (str, int, float)) and len(repr(got)) <= 60:
            if err.get("type") != "missing":
                msg += f" (got {got!r})"
        line = f"{path}: {msg}" if path else msg
        if line not in seen:
            seen.append(line)
    return "; ".join(seen[:6]), field_path(tuple(first.get("loc", ())))
