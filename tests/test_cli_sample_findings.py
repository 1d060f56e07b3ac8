"""`sample --findings`: describe -> expert review -> sample, approved/unapproved/malformed findings files, flags
overriding the file's patient, and the findings' provenance in the manifest and the corpus card."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from diffusets_jax.cli import main
from diffusets_jax.conditioning.requests import make_condition
from tests.helpers.fake_openai_server import fake_openai_env
from tests.helpers.tiny_models import TEXT_DIM, tiny_model_dir

BRUGADA = ["Sinus rhythm", "Right bundle branch block pattern", "Coved ST elevation in V1-V2"]
# The chain other tests of the tiny model compile too (tests/test_io_outputs.py's generator, tests/test_pipeline.py):
# the session's compilation cache then serves it instead of compiling one of its own.
FAST = ["--sampler", "ddim", "--steps", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def openai_env():
    """One fake OpenAI server: the chat model `describe` asks and the embedder the tiny model was conditioned on."""
    reply = json.dumps({"findings": [*BRUGADA, "Made-up finding"]})
    with fake_openai_env(TEXT_DIM, chat_reply=reply) as server:
        yield server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_describe_review_then_sample_records_the_findings_provenance(model_dir, openai_env, tmp_path, capsys):
    findings = tmp_path / "brugada.json"
    assert main(["describe", "Brugada syndrome", "--out", str(findings), "--sex", "M", "--age", "40", "--hr", "72",
                 "--model", "test-chat-model", "--base-url", openai_env.base_url]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    sample = ["sample", "--model-dir", str(model_dir), "--out", str(out), "--findings", str(findings), *FAST,
              "--formats", "npz"]
    # Not reviewed yet: refused in one line before anything is loaded or written.
    assert "approved is false" in _one_line_error(capsys, main(sample))
    assert not out.exists()
    # The expert drops the hallucinated statement, approves and signs; the flags change the age and the count.
    record = json.loads(findings.read_text())
    assert record["statements"][-1] == "Made-up finding"
    record.update(statements=BRUGADA, approved=True, reviewed_by="Dr B")
    findings.write_text(json.dumps(record, indent=2))
    embedded_before = len(openai_env.received)
    assert main([*sample, "--age", "55", "-n", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["provenance"] == {
        "file": str(findings.resolve()), "sha256": hashlib.sha256(findings.read_bytes()).hexdigest(),
        "condition": "Brugada syndrome", "source": "llm", "model": "test-chat-model",
        "base_url": openai_env.base_url + "/", "created": record["created"], "approved": True, "reviewer": "Dr B",
        "edited": True, "patient_from": {"sex": "file", "age": "flag", "heart_rate": "file"},
    }
    run = json.loads((out / ".diffusets-run.json").read_text())
    assert run["settings"]["provenance"] == manifest["settings"]["provenance"]  # part of the run's fingerprint
    with np.load(out / "samples.npz") as data:
        assert data["ecg"].shape == (2, 1024, 12) and np.isfinite(data["ecg"]).all()
        assert data["report"].tolist() == ["|".join(BRUGADA)] * 2  # the reviewed statements, not the model's
        assert data["sex"].tolist() == [1, 1] and data["age"].tolist() == [55.0, 55.0]
        assert data["heart_rate"].tolist() == [72.0, 72.0]
    prompt = manifest["samples"][0]["prompt"]
    assert prompt == make_condition(BRUGADA, "M", 55, 72).prompt("ordered")  # the tiny model's prompt style
    assert any(prompt in inputs for inputs in openai_env.received[embedded_before:])  # what was embedded


@pytest.mark.slow  # a second tiny-model generation, through the corpus writer
def test_unapproved_findings_with_the_flag_are_recorded_as_unapproved(model_dir, openai_env, tmp_path, capsys):
    findings = tmp_path / "hand.json"
    findings.write_text(json.dumps({"condition": "Brugada syndrome", "statements": BRUGADA, "approved": False,
                                    "patient": {"sex": "F", "age": 30, "heart_rate": 80}}))
    out = tmp_path / "corpus"
    assert main(["sample", "--model-dir", str(model_dir), "--out", str(out), "--findings", str(findings),
                 "--allow-unapproved-findings", "--corpus", *FAST]) == 0
    assert "is not approved; the manifest records that" in capsys.readouterr().err
    provenance = json.loads((out / ".diffusets-run.json").read_text())["settings"]["provenance"]
    assert provenance["approved"] is False and provenance["source"] == "hand" and provenance["model"] is None
    assert provenance["edited"] is None and provenance["patient_from"] == dict.fromkeys(
        ("sex", "age", "heart_rate"), "file")
    card = json.loads((out / "diffusets_dataset.json").read_text())
    assert card["derived_from"]["provenance"] == provenance


@pytest.mark.parametrize("content, extra, message", [
    ('{"condition": "X", "statements": ["A"],\n "approved": true', [], "f.json line 2: not valid JSON"),
    ('{"condition": "X", "statements": ["A"], "aproved": true}', [], r"unknown field(s) 'aproved'"),
    ('{"condition": "X", "statements": ["A|B"], "approved": true}', [], "contains '|'"),
    ('{"condition": "X", "statements": ["A"], "approved": true, "patient": {"sex": "M", "age": 40}}', [],
     "gives no heart_rate in its patient and no flag does: pass --hr"),
    ('{"condition": "X", "statements": ["A"], "approved": true}', ["--sex", "M", "--age", "40", "--hr", "400"],
     "--hr: '400' is out of range"),
    ('{"condition": "X", "statements": ["A"], "approved": true}', ["--text", "Sinus rhythm"],
     "give one of --conditions FILE, --findings FILE or --text, not --findings and --text"),
    (None, [], "does not exist: write one with `diffusets-jax describe"),
])
def test_bad_findings_inputs_are_one_line_before_the_model_loads(tmp_path, capsys, content, extra, message):
    findings = tmp_path / "f.json"
    if content is not None:
        findings.write_text(content)
    out = tmp_path / "out"
    # A model directory that does not exist: these errors must come before it is looked at.
    code = main(["sample", "--model-dir", str(tmp_path / "no-model"), "--out", str(out), "--findings",
                 str(findings), *extra])
    assert message in _one_line_error(capsys, code)
    assert not out.exists()


def test_allow_unapproved_needs_findings(tmp_path, capsys):
    code = main(["sample", "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--text", "Sinus rhythm",
                 "--sex", "M", "--age", "40", "--hr", "60", "--allow-unapproved-findings"])
    assert "--allow-unapproved-findings goes with --findings FILE" in _one_line_error(capsys, code)
