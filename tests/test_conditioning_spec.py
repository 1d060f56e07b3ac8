"""`conditioning.spec`: the recorded embedder, built with run-time settings that do not change its vectors."""

import pytest

from diffusets_jax.conditioning import embedders
from diffusets_jax.conditioning.spec import EmbedderSpec


def test_the_local_encoder_ignores_an_api_key_and_refuses_an_endpoint(monkeypatch):
    """`sample` passes the API key from the environment whatever the embedder: with OPENAI_API_KEY set, sampling a
    model conditioned on the local encoder (the demo's MiniLM) ended in LocalEmbedder's TypeError traceback."""
    made = []
    monkeypatch.setattr(embedders, "make_embedder", lambda kind, **options: made.append((kind, options)))
    local = EmbedderSpec("local", "all-MiniLM-L6-v2", 384, options={"max_length": 128})
    local.make(api_key="sk-test", base_url=None, batch_size=8)
    assert made == [("local", {"max_length": 128, "batch_size": 8})]
    with pytest.raises(ValueError, match="--embedder-base-url http://host/v1: this model's embedder is the local"):
        local.make(base_url="http://host/v1", api_key=None)
    # An OpenAI-compatible embedder takes both, as before.
    EmbedderSpec("openai", "E-72B", 8, options={"base_url": "http://a/v1"}).make(api_key="sk", base_url="http://b/v1")
    assert made[-1] == ("openai", {"model": "E-72B", "dim": 8, "base_url": "http://b/v1", "api_key": "sk"})
