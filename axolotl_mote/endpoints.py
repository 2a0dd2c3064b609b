"""One way to talk to OpenAI-compatible servers (``openai`` package), shared by the
data-generation backend and the stage-switching client.

:func:`openai_client` builds the client with timeouts and the package's own retries
(exponential backoff on connection errors, 408/409/429 and 5xx); :func:`request` runs
one call and turns the package's errors into the caller's error type, with the URL,
what was asked and the server's own message. Nothing is swallowed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def openai_client(
    base_url: str, *, api_key: str, timeout: float, max_retries: int, needed_by: str
) -> Any:
    try:
        from openai import OpenAI
    except ImportError as err:  # pragma: no cover - a declared extra
        raise ImportError(
            f"{needed_by} needs the openai package: pip install 'axolotl-mote[serve]'"
        ) from err
    return OpenAI(
        base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
    )


def request(
    call: Callable[[], T], *, error: type[Exception], where: str, what: str
) -> T:
    """``call()``; a timeout, a refused connection or an HTTP error raises ``error``
    naming ``where`` (the server), ``what`` (the request) and the server's message."""
    import openai

    try:
        return call()
    except openai.APITimeoutError as err:
        raise error(f"{where}: {what} timed out") from err
    except openai.APIConnectionError as err:
        raise error(f"{where}: cannot connect ({err})") from err
    except openai.APIStatusError as err:
        raise error(
            f"{where}: HTTP {err.status_code} from the server for {what}: "
            f"{server_message(err)}"
        ) from err


def server_message(err: Any) -> str:
    """The server's ``{"error": {"message": ...}}`` text, else the exception's."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(err)
