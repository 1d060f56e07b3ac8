"""One policy for talking to OpenAI-compatible servers: client construction, retries and error messages.

The embedder (`embedders.OpenAIEmbedder`) and the chat client (`chat.ChatClient`) both go through
`OpenAIConnection`, so they find the key and the base URL the same way, retry the same failures with the same
backoff and fail with the same one-line messages:

- the key comes from `api_key` or $OPENAI_API_KEY, the base URL from `base_url`, $OPENAI_BASE_URL or OpenAI's;
- rate limits (429), server errors (5xx), timeouts and dropped connections are retried with exponential backoff,
  honouring the server's Retry-After, `max_retries` times; then RuntimeError (the caller says how to resume);
- rejections (400, 401, 403, 404, 422) are not retried, since retrying cannot help: ValueError naming the
  key, model and base URL to check.

The `openai` client's own retries are off: we retry ourselves so that the policy and the counts are ours.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from diffusets_jax.errors import RunFailed

log = logging.getLogger(__name__)

T = TypeVar("T")

# The environment variable the key is read from when none is given (the CLI's --api-key-env default), and the
# retries of a request after a 429, 5xx, timeout or dropped connection.
API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_MAX_RETRIES = 8


class OpenAIConnection:
    """An `openai.OpenAI` client plus the retry policy above, for one `service` ("embeddings", "chat") and model.

    Args:
        service: what the requests are, as error messages name it.
        model: the model name the caller sends (named in error messages).
        user: who needs the key, for the missing-key message (e.g. "the OpenAI embedder").
        key_hint: a sentence appended to the missing-key message (an alternative that needs no key).
        max_retries: retries per request after a 429, 5xx, timeout or connection error (then it raises).
        initial_backoff_s, max_backoff_s: the wait before retry k is min(max, initial * 2**k), or the server's
            Retry-After if longer (capped at max_backoff_s).
        timeout_s: per-request timeout.
        sleep: the waiting function (tests pass a fake to count waits without waiting).
    """

    def __init__(
        self,
        service: str,
        model: str,
        *,
        user: str,
        api_key: str | None = None,
        base_url: str | None = None,
        key_hint: str = "",
        max_retries: int = DEFAULT_MAX_RETRIES,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import openai

        api_key = api_key or os.environ.get(API_KEY_ENV)
        if not api_key:
            raise ValueError(
                f"{user} needs an API key: set {API_KEY_ENV}; for an OpenAI-compatible server "
                f"that ignores keys, any non-empty value works.{' ' + key_hint if key_hint else ''}"
            )
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not 0 < timeout_s < float("inf"):  # 0 would time every request out, then retry it for minutes
            raise ValueError(f"timeout must be a positive number of seconds per request, got {timeout_s}")
        self.service = service
        self.model = model
        self.max_retries = max_retries
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self.requests_sent = 0  # HTTP requests, retries included
        self.retries = 0
        self.client = openai.OpenAI(
            api_key=api_key, base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
            timeout=timeout_s, max_retries=0,
        )
        self._retryable = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)  # timeouts too
        self._rejected = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
                          openai.BadRequestError, openai.UnprocessableEntityError)

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    def request(self, send: Callable[[Any], Any], *, resume_hint: str, read: Callable[[Any], T]) -> T:
        """`read(send(client))` with the retry policy; `resume_hint` ends the give-up message (what the user can do).

        `read` takes what the caller needs out of the response. A server that answers 200 with something else
        than the API's JSON (a web page at a base URL without /v1, `null`, an object without `data` or `choices`)
        gives the `openai` client a string, None or a model lacking those fields: reading it then fails with an
        AttributeError or TypeError, which becomes one line naming the base URL (ValueError: retrying cannot help).
        """
        for attempt in range(self.max_retries + 1):
            self.requests_sent += 1
            try:
                response = send(self.client)
            except self._rejected as err:  # retrying cannot help: wrong key, model, URL or input
                raise ValueError(
                    f"the {self.service} server rejected the request ({err.status_code} {type(err).__name__}: "
                    f"{_error_message(err)}): check the API key, --model {self.model!r} and the base URL "
                    f"{self.base_url!r}"
                ) from err
            except self._retryable as err:
                if attempt == self.max_retries:
                    # RunFailed: the CLI prints the message as one line, exit 1, whichever command was asking
                    raise RunFailed(
                        f"OpenAI {self.service} request failed after {self.max_retries + 1} attempts "
                        f"({type(err).__name__}: {err}); {resume_hint}"
                    ) from err
                wait = min(self.max_backoff_s, self.initial_backoff_s * 2**attempt)
                wait = max(wait, min(self.max_backoff_s, _retry_after_s(err)))
                log.warning("%s request: %s; retry %d/%d in %.3g s", self.service, type(err).__name__, attempt + 1,
                            self.max_retries, wait)
                self.retries += 1
                self._sleep(wait)
            else:
                try:
                    return read(response)
                except (AttributeError, TypeError, KeyError, ValueError) as err:
                    shown = repr(response)
                    shown = shown if len(shown) <= 80 else f"{shown[:80]}..."
                    raise ValueError(
                        f"the {self.service} server at {self.base_url!r} answered {shown}, not an OpenAI {self.service} "
                        f"response ({type(err).__name__}: {err}): check the base URL (OpenAI-compatible servers "
                        "usually serve under /v1)"
                    ) from None
        raise AssertionError("unreachable: the last attempt returns or raises")


def _error_message(err: Exception) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(err)


def _retry_after_s(err: Exception) -> float:
    """The server's requested wait (Retry-After / retry-after-ms headers), 0 if none."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None) or {}
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(header)) * scale)
        except (TypeError, ValueError):
            continue
    return 0.0
