"""The README's Python snippets ("From Python") run as written, on a tiny model directory: an API example that no
longer runs is caught here, not by a reader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets(section: str) -> list[str]:
    """The ```python blocks of the README section headed `## {section}`."""
    text = README.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.slow
def test_the_from_python_snippets_run_on_a_model_directory(model_dir, openai_env, capsys):
    snippets = python_snippets("From Python")
    assert len(snippets) == 3
    namespace: dict = {}
    for snippet in snippets:  # one session, as a reader would paste them one after another
        exec(compile(snippet.replace('"models/"', repr(str(model_dir))), "README.md", "exec"), namespace)
    assert namespace["ecgs"].shape == (6, 1024, 12) and np.isfinite(namespace["ecgs"]).all()
    assert namespace["ecg"].shape == (6, 1024, 12)
    assert not np.array_equal(namespace["ecg"], namespace["ecgs"])  # another sampler, another key
    printed = capsys.readouterr().out
    assert "Heart-rate MAE" in printed and namespace["rate"]["n"] == 6
