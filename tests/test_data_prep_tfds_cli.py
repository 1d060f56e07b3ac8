"""The README's claim: with the `tfds-cli` extra, TFDS's own `tfds build` runs our builders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_RECORDS = REPO / "diffusets_jax" / "demo_data" / "cinc2021"
COMMAND = "tfds build data_prep/physionet_challenge --config local"


def test_the_readme_documents_the_command_tested_here():
    readme = (REPO / "README.md").read_text()
    assert COMMAND in readme and "pip install -e '.[tfds-cli]'" in readme


@pytest.mark.slow
def test_tfds_build_prepares_a_builder(tmp_path):
    pytest.importorskip("apache_beam", reason="the tfds-cli extra is not installed: pip install -e '.[tfds-cli]'")
    pytest.importorskip("mlcroissant", reason="the tfds-cli extra is not installed: pip install -e '.[tfds-cli]'")
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("E07500", "E07501", "E07502", "E07504"):
        for suffix in (".hea", ".mat"):
            shutil.copy(DEMO_RECORDS / f"{name}{suffix}", manual)
    tfds_script = Path(sys.executable).parent / "tfds"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(tfds_script), *COMMAND.split()[1:], "--manual_dir", str(manual), "--data_dir",
                           str(tmp_path / "data")], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dataset = tmp_path / "data" / "physionet_challenge" / "local" / "1.0.0"
    report = json.loads((dataset / "prepare_report.json").read_text())
    assert report["records_listed"] == 4 and report["examples_written"] >= 3
    card = json.loads((dataset / "diffusets_dataset.json").read_text())
    assert card["derived_from"]["manual_dir"] == str(manual) and card["derived_from"]["records"] == 4
