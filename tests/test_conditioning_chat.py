"""The chat client against a local OpenAI-compatible server (the real `openai` client): answers, the shared
retry policy and its errors."""

from __future__ import annotations

import pytest

from diffusets_jax.conditioning.chat import ChatClient
from tests.helpers.fake_openai_server import FakeOpenAIServer, fake_chat_reply

MESSAGES = [{"role": "system", "content": "You are a cardiologist."},
            {"role": "user", "content": "ECG findings of Brugada syndrome?"}]


def _client(server: FakeOpenAIServer, waits: list[float] | None = None, **options) -> ChatClient:
    defaults = dict(api_key="sk-test", base_url=server.base_url, max_retries=5, initial_backoff_s=0.001,
                    max_backoff_s=0.01, timeout_s=5.0)
    defaults.update(options)
    return ChatClient("test-chat-model", sleep=(waits.append if waits is not None else lambda s: None), **defaults)


def test_complete_sends_model_messages_and_temperature_and_returns_the_text():
    with FakeOpenAIServer() as server:
        client = _client(server, temperature=0.3)
        answer = client.complete(MESSAGES)
    assert answer == fake_chat_reply(MESSAGES)
    (request,) = server.chat_received
    assert request["model"] == "test-chat-model" and request["messages"] == MESSAGES
    assert request["temperature"] == 0.3
    assert server.authorization == ["Bearer sk-test"]
    assert server.received == []  # no embeddings request
    assert client.base_url == server.base_url + "/" and client.requests_sent == 1 and client.retries == 0


def test_retries_rate_limits_server_errors_and_timeouts_with_the_embedders_backoff():
    waits: list[float] = []
    with FakeOpenAIServer(faults=["429", "500", "timeout", "503"], timeout_delay_s=1.0) as server:
        client = _client(server, waits, timeout_s=0.25, initial_backoff_s=0.001, max_backoff_s=0.004)
        answer = client.complete(MESSAGES)
    assert answer == fake_chat_reply(MESSAGES)
    assert len(server.chat_received) == 5 and len(server.chat_answered) == 1
    assert client.retries == 4 and client.requests_sent == 5
    assert waits == pytest.approx([0.001, 0.002, 0.004, 0.004])  # doubling, capped at max_backoff_s


def test_gives_up_after_max_retries_with_a_clear_error():
    with FakeOpenAIServer(faults=["500"] * 3) as server:
        with pytest.raises(RuntimeError, match="OpenAI chat request failed after 3 attempts.*InternalServerError.*"
                                               "nothing was written"):
            _client(server, max_retries=2).complete(MESSAGES)
    assert len(server.chat_received) == 3


@pytest.mark.parametrize("fault, answered", [("html", "'<html><body>Sign in"), ("null", "None")])
def test_an_answer_that_is_not_the_apis_json_is_one_line_naming_the_server(fault, answered):
    """A 200 with a web page (a base URL that misses /v1) or `null` reached the client as a string or None, and
    reading its `choices` was an AttributeError's traceback; it is a ValueError naming the server, not retried."""
    with FakeOpenAIServer(faults=[fault]) as server:
        with pytest.raises(ValueError, match=rf"chat server at '{server.base_url}/' answered {answered}.*"
                                             "not an OpenAI chat response.*check the base URL"):
            _client(server).complete(MESSAGES)
    assert len(server.chat_received) == 1


@pytest.mark.parametrize("fault, message", [("401", "Incorrect API key"), ("404", "model does not exist")])
def test_rejections_are_not_retried_and_say_what_to_check(fault, message):
    with FakeOpenAIServer(faults=[fault]) as server:
        with pytest.raises(ValueError, match=rf"chat server rejected the request \({fault} .*{message}.*"
                                             r"--model 'test-chat-model'"):
            _client(server).complete(MESSAGES)
    assert len(server.chat_received) == 1


def test_truncated_or_empty_answers_are_errors():
    with FakeOpenAIServer(chat_reply='{"findings": ["Sinus rhythm", "Right bundle') as server:
        server.chat_finish_reason = "length"
        with pytest.raises(RuntimeError, match="length limit"):
            _client(server).complete(MESSAGES)
    with FakeOpenAIServer(chat_reply=lambda messages: None) as server:
        with pytest.raises(RuntimeError, match="without text"):
            _client(server).complete(MESSAGES)


def test_bad_messages_and_settings_fail_before_sending(monkeypatch):
    with FakeOpenAIServer() as server:
        with pytest.raises(ValueError, match="message #1 must have a role"):
            _client(server).complete([MESSAGES[0], {"role": "doctor", "content": "hi"}])
        with pytest.raises(ValueError, match="temperature must be within 0..2"):
            _client(server, temperature=3.0)
    assert server.chat_received == []
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="the chat client needs an API key: set OPENAI_API_KEY.*by hand"):
        ChatClient("m")


def test_key_and_base_url_from_environment(monkeypatch):
    with FakeOpenAIServer() as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        ChatClient("m").complete(MESSAGES)
    assert server.authorization == ["Bearer sk-from-env"]
