"""Where a dataset argument points: a folder (a path) or a TFDS name found under a data dir.

`--dataset`, `--latents`, `--config.data.dataset` take either. `data.pipeline.load_builder` opens them; the output
checks (`io.run_dir.check_reads_apart`) need the folder without opening anything, so without TensorFlow.
"""

from __future__ import annotations

import os


def is_path(source: str | os.PathLike) -> bool:
    """Whether a dataset argument is a path rather than a TFDS name: it exists, is absolute, or starts with '.' or
    '~' (a mistyped relative path must be reported as a path, not parsed by TFDS as a name)."""
    text = os.fspath(source)
    return os.path.exists(text) or os.path.isabs(text) or text.startswith((".", "~"))


def dataset_folder(source: str | os.PathLike | None) -> str | None:
    """The folder a dataset argument is read from; None for a TFDS name (or no dataset)."""
    return None if source is None or not is_path(source) else os.fspath(source)
