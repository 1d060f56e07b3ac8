"""Chat completions from OpenAI's API or any OpenAI-compatible server (vLLM, llama.cpp, Ollama, proxies, ...).

Used to ask a language model for the ECG findings of a condition (`experiments.describe`). Keys, base URLs,
retries and error messages follow the same policy as the embedder (`openai_client.OpenAIConnection`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from diffusets_jax.conditioning.openai_client import DEFAULT_MAX_RETRIES

CHAT_DEFAULT_MODEL = "gpt-4o"
CHAT_DEFAULT_TIMEOUT_S = 120.0  # a findings answer is generated token by token: longer than an embedding
# The OpenAI chat API's sampling temperature range.
MAX_TEMPERATURE = 2.0


class ChatClient:
    """One-shot chat completions: `complete(messages)` -> the assistant's text.

    Args:
        model: chat model name sent to the server.
        api_key: defaults to $OPENAI_API_KEY. A local server that ignores keys still needs some value.
        base_url: defaults to $OPENAI_BASE_URL, else https://api.openai.com/v1.
        temperature: sampling temperature sent with every request (0: the most repeatable answers; some
            reasoning models accept only their default and reject the request, saying so).
        max_retries, initial_backoff_s, max_backoff_s, timeout_s, sleep: the retry policy of `OpenAIConnection`.
    """

    def __init__(
        self,
        model: str = CHAT_DEFAULT_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        temperature: float = 0.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = CHAT_DEFAULT_TIMEOUT_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from diffusets_jax.conditioning.openai_client import OpenAIConnection

        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a non-empty model name, got {model!r}")
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be within 0..{MAX_TEMPERATURE:g} (the OpenAI API's range), got "
                             f"{temperature}")
        self._connection = OpenAIConnection(
            "chat", model, user="the chat client", api_key=api_key, base_url=base_url,
            key_hint="Or write the findings file by hand (see `diffusets-jax describe --help`).",
            max_retries=max_retries, initial_backoff_s=initial_backoff_s, max_backoff_s=max_backoff_s,
            timeout_s=timeout_s, sleep=sleep,
        )
        self.model = model
        self.temperature = float(temperature)

    @property
    def base_url(self) -> str:
        return self._connection.base_url

    @property
    def requests_sent(self) -> int:
        """HTTP requests, retries included."""
        return self._connection.requests_sent

    @property
    def retries(self) -> int:
        return self._connection.retries

    def complete(self, messages: Sequence[dict[str, str]]) -> str:
        """The assistant's answer to `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]).

        Raises RuntimeError when the server answers without text or cuts the answer off at its length limit:
        a partial list of findings must not pass for a complete one.
        """
        messages = [dict(m) for m in messages]
        for i, message in enumerate(messages):
            if message.get("role") not in ("system", "user", "assistant") or not isinstance(message.get("content"), str):
                raise ValueError(f"message #{i} must have a role (system, user, assistant) and text content, got {message!r}")
        answer = self._connection.request(
            lambda client: client.chat.completions.create(
                model=self.model, messages=messages, temperature=self.temperature),
            resume_hint="rerun later; nothing was written", read=_first_choice,
        )
        if answer is None:
            raise RuntimeError(f"the chat server returned no answer for model {self.model!r}")
        finish_reason, text = answer
        if finish_reason == "length":
            raise RuntimeError(f"model {self.model!r} stopped at its length limit: the answer is incomplete")
        if not isinstance(text, str) or not text.strip():
            raise RuntimeError(
                f"model {self.model!r} answered without text (finish_reason {finish_reason!r}): "
                "it may have refused; try another model"
            )
        return text


def _first_choice(response: Any) -> tuple[Any, Any] | None:  # noqa: ANN401 (an `openai` response, or what a server sent)
    """The first choice's finish reason and text, or None when the response has no choice."""
    if not response.choices:
        return None
    choice = response.choices[0]
    return choice.finish_reason, (choice.message.content if choice.message is not None else None)
