"""data.card: a build's card, and its fingerprint as the identity of that build of the dataset."""

from __future__ import annotations

import json

from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
from diffusets_jax.data.card import CARD_FILE, card_fingerprint, write_card

CONDITIONING = ConditioningSpec(EmbedderSpec("openai", "fake", 8), "ordered")


def _write(directory, records: str) -> dict:
    return write_card(directory, kind="prepared", name="tiny", config=None, version="1.0.0", splits={"train": 4},
                      conditioning=CONDITIONING, derived_from={"records_fingerprint": records})


def test_a_resumed_build_keeps_its_card_and_another_build_gets_a_new_one(tmp_path):
    """A resumed encode rewrote its identical card with a new time, so a training on it was refused as "another
    build" on its next resume (the quick demo run twice)."""
    first = _write(tmp_path, "a")
    stored = json.loads((tmp_path / CARD_FILE).read_text())
    stored["created"] = "2000-01-01T00:00:00+00:00"  # as if written long ago
    (tmp_path / CARD_FILE).write_text(json.dumps(stored))
    identity = card_fingerprint(tmp_path)
    again = _write(tmp_path, "a")  # the same build, finished again
    assert again["created"] == "2000-01-01T00:00:00+00:00" and card_fingerprint(tmp_path) == identity
    other = _write(tmp_path, "b")  # other records at the same path
    assert other["created"] != stored["created"] and card_fingerprint(tmp_path) != identity
    assert first["derived_from"] == {"records_fingerprint": "a"}


def test_a_dataset_without_a_card_is_identified_by_its_tfds_record(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{"name": "x"}')
    identity = card_fingerprint(tmp_path)
    (tmp_path / "dataset_info.json").write_text('{"name": "x", "splits": []}')
    assert card_fingerprint(tmp_path) != identity
