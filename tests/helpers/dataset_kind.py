"""A copy of a prepared test dataset whose card says it holds generated ECGs: what `sample --corpus` writes (the
same schema), for the commands that must tell recorded ECGs from generated ones by the card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from diffusets_jax.data.card import CARD_FILE


def as_corpus(dataset: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy the dataset folder `dataset` to `dest` with its card's kind set to "corpus"; returns `dest`."""
    dest = Path(dest)
    shutil.copytree(dataset, dest)
    card = json.loads((dest / CARD_FILE).read_text())
    (dest / CARD_FILE).write_text(json.dumps({**card, "kind": "corpus"}))
    return dest
