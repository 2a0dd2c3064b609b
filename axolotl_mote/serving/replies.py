"""What the server and its streams both send: errors, usage and the ``mote`` field.

Shared by ``server.py`` (whole replies) and ``streaming.py`` (server-sent events), so
neither imports the other.
"""

from __future__ import annotations

from axolotl_mote.serving.protocol import error_body
from axolotl_mote.serving.worker import Cancelled, Overloaded, RequestError

EXACT_MODEL = "mote"
#: How often a waiting handler checks that its client is still connected (seconds).
POLL = 0.1


def _error(status: int, message: str, param: str | None = None, headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=status,
        content=error_body(message, status=status, param=param),
        headers=headers,
    )


def _refusal(err: BaseException):
    """The JSON error for what the worker raised; None for an unexpected error."""
    if isinstance(err, RequestError):
        return _error(err.status, str(err), err.param)
    if isinstance(err, Overloaded):
        return _error(503, str(err), headers={"Retry-After": str(err.retry_after)})
    if isinstance(err, Cancelled):
        return _error(499, f"cancelled: {err}")
    return None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _mote_field(out: dict) -> dict:
    chain = out["chain"]
    if chain is None:
        return {"plan": [], "stages": {}, "text": "", "stopped": out["stopped"]}
    return {
        "plan": chain.plan,
        "stages": chain.stages,
        "text": chain.text,
        "forced_plan": chain.forced_plan,
        "dropped_stages": chain.dropped_stages,
        "fallback_used": chain.fallback_used,
        "forced_ends": chain.forced_ends,
        "stopped": out["stopped"],
    }
