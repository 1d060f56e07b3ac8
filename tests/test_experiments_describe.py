"""`describe`: a chat model's findings for a condition, parsed and written for expert review (library and CLI),
against a local fake chat server."""

from __future__ import annotations

import datetime
import json

import pytest

from diffusets_jax.cli import main
from diffusets_jax.conditioning.chat import ChatClient
from diffusets_jax.conditioning.findings import read_findings
from diffusets_jax.experiments.describe import describe_condition, findings_messages, parse_findings_answer
from tests.helpers.cli import exit_code
from tests.helpers.fake_openai_server import FakeOpenAIServer

BRUGADA_ANSWER = ('```json\n{"findings": ["Sinus rhythm", "Right bundle branch block pattern.", '
                  '"Coved ST elevation in V1-V2", "T wave inversion in V1-V2"]}\n```')
BRUGADA = ["Sinus rhythm", "Right bundle branch block pattern", "Coved ST elevation in V1-V2",
           "T wave inversion in V1-V2"]


@pytest.mark.parametrize("answer, expected", [
    ('{"findings": ["A", "B"]}', ["A", "B"]),
    ('{"statements": ["A", "B"]}', ["A", "B"]),
    ('["A", "B"]', ["A", "B"]),
    (BRUGADA_ANSWER, BRUGADA),
    ('Here are the findings:\n{"findings": ["A", "B"]}\nThese are typical.', ["A", "B"]),
    ("Findings:\n- Sinus rhythm\n- Coved ST elevation in V1-V2.\n\nNote: varies.", ["Sinus rhythm",
                                                                                 "Coved ST elevation in V1-V2"]),
    ("1. A\n2) B;\n3. 'C'", ["A", "B", "C"]),
    ("A\nB\n", []),  # unbulleted prose is not a list of findings
    ('{"findings": ["A", "a", 3, "", "B"]}', ["A", "B"]),  # repeats (any case), non-strings and blanks dropped
    ("", []),
    ('{"findings": []}', []),
    # Prose with braces or brackets of its own around the JSON: the first '{' to the last '}' was no JSON, and
    # nothing was found.
    ('Findings {as asked}:\n{"findings": ["A", "B"]}\nThey vary [see refs].', ["A", "B"]),
    # A reasoning model's thoughts left in the answer: their bullets were taken for the findings.
    ('<think>\nBrugada [type 1]. Draft {JSON}:\n- coved ST?\n- maybe RBBB\n</think>\n{"findings": ["A", "B"]}', ["A", "B"]),
    ('<think>Draft:\n- X\n</think>\n\n1. A\n2. B', ["A", "B"]),
    # Markdown emphasis, as chat models write lists: it stayed in the statement ("**Coved ST elevation** in V1").
    ("1. **Coved ST elevation** in V1-V2\n2. *Right bundle branch block*.\n3. __QT__ prolongation",
     ["Coved ST elevation in V1-V2", "Right bundle branch block", "QT prolongation"]),
    ('{"findings": ["**A**", "B in V1_V2"]}', ["A", "B in V1_V2"]),
])
def test_parse_findings_answer(answer, expected):
    assert parse_findings_answer(answer) == expected


def _client(server: FakeOpenAIServer, **options) -> ChatClient:
    return ChatClient("test-chat-model", api_key="sk-test", base_url=server.base_url, max_retries=2,
                      initial_backoff_s=0.001, max_backoff_s=0.001, sleep=lambda s: None, **options)


def test_describe_writes_an_unapproved_review_file_with_its_provenance(tmp_path):
    out = tmp_path / "brugada.json"
    with FakeOpenAIServer(chat_reply=BRUGADA_ANSWER) as server:
        record = describe_condition("Brugada syndrome", _client(server), out,
                                    patient={"sex": 1, "age": 40.0, "heart_rate": 72.0}, max_statements=3,
                                    clock=lambda: "2025-01-02T03:04:05+00:00")
    saved = json.loads(out.read_text())
    assert saved == record
    assert saved["condition"] == "Brugada syndrome"
    assert saved["statements"] == saved["llm_statements"] == BRUGADA[:3]  # at most max_statements, in order
    assert saved["patient"] == {"sex": "M", "age": 40.0, "heart_rate": 72.0}
    assert saved["approved"] is False and saved["reviewed_by"] == "" and saved["review_notes"] == ""
    assert saved["model"] == "test-chat-model" and saved["base_url"] == server.base_url + "/"
    assert saved["prompt"] == findings_messages("Brugada syndrome", 3) == server.chat_received[0]["messages"]
    assert "Brugada syndrome" in saved["prompt"][1]["content"] and "at most 3 statements" in saved["prompt"][1]["content"]
    assert saved["answer"] == BRUGADA_ANSWER and saved["created"] == "2025-01-02T03:04:05+00:00"
    # The file is a findings file: refused until approved; after the review, used as edited.
    with pytest.raises(ValueError, match="approved is false"):
        read_findings(out)
    assert read_findings(out, allow_unapproved=True).statements == tuple(BRUGADA[:3])
    saved.update(approved=True, statements=BRUGADA[1:3], reviewed_by="Dr B")
    out.write_text(json.dumps(saved))
    findings = read_findings(out)
    assert findings.statements == tuple(BRUGADA[1:3]) and findings.patient == {"sex": 1, "age": 40.0, "heart_rate": 72.0}
    assert findings.provenance["edited"] is True and findings.provenance["reviewer"] == "Dr B"
    assert findings.provenance["model"] == "test-chat-model"


def test_describe_time_is_utc_iso(tmp_path):
    with FakeOpenAIServer() as server:
        record = describe_condition("Brugada syndrome", _client(server), tmp_path / "f.json")
    created = datetime.datetime.fromisoformat(record["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 60


def test_describe_refuses_bad_arguments_before_asking(tmp_path):
    existing = tmp_path / "f.json"
    existing.write_text("{}")
    with FakeOpenAIServer() as server:
        with pytest.raises(ValueError, match="already exists"):
            describe_condition("Brugada syndrome", _client(server), existing)
        with pytest.raises(ValueError, match="condition must be a name"):
            describe_condition("  ", _client(server), tmp_path / "g.json")
        with pytest.raises(ValueError, match="max_statements must be within 1..18"):
            describe_condition("X", _client(server), tmp_path / "g.json", max_statements=19)
    assert server.chat_received == [] and existing.read_text() == "{}"


@pytest.mark.parametrize("answer, message", [
    ("I cannot help with that.", "gave no finding statements.*began 'I cannot help with that.'"),
    ('{"findings": []}', "gave no finding statements"),
    ('{"findings": ["RBBB | coved ST"]}', r"contains '\|'.*by hand"),
])
def test_unusable_answers_write_nothing(tmp_path, answer, message):
    out = tmp_path / "f.json"
    with FakeOpenAIServer(chat_reply=answer) as server:
        with pytest.raises(RuntimeError, match=message):
            describe_condition("X", _client(server), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_describe_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEST_CHAT_KEY", "sk-cli")
    out = tmp_path / "brugada.json"
    with FakeOpenAIServer(chat_reply=BRUGADA_ANSWER, faults=["429"]) as server:
        code = main(["describe", "Brugada syndrome", "--out", str(out), "--sex", "M", "--age", "40", "--hr", "72",
                     "--model", "test-chat-model", "--base-url", server.base_url, "--api-key-env", "TEST_CHAT_KEY",
                     "--temperature", "0"])
    assert code == 0
    assert server.authorization == ["Bearer sk-cli"] * 2  # one rate limit, one retry
    saved = json.loads(out.read_text())
    assert saved["statements"] == BRUGADA and saved["approved"] is False
    assert saved["patient"] == {"sex": "M", "age": 40.0, "heart_rate": 72.0}
    assert json.loads(capsys.readouterr().out)["statements"] == BRUGADA


@pytest.mark.parametrize("extra, message", [
    (["--age", "old"], "--age: cannot parse 'old'"),
    (["--sex", "X"], "--sex: cannot parse 'X'"),
    (["--max-statements", "0"], "argument --max-statements: must be a whole number >= 1"),
    (["--max-statements", "19"], "argument --max-statements: must be within 1..18"),
    (["--api-key-env", "UNSET_KEY_FOR_TEST"], "$UNSET_KEY_FOR_TEST is not set"),
    # --base-url was documented as the alternative to a key; a server that ignores keys still needs one set.
    (["--api-key-env", "UNSET_KEY_FOR_TEST"], "a --base-url server that ignores keys (vLLM, llama.cpp, Ollama) takes "
                                              "any non-empty value"),
])
def test_cli_bad_inputs_are_one_line_exit_2(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setenv("TEST_CHAT_KEY", "sk-cli")
    monkeypatch.delenv("UNSET_KEY_FOR_TEST", raising=False)
    with FakeOpenAIServer() as server:
        code = exit_code(["describe", "Brugada syndrome", "--out", str(tmp_path / "f.json"), "--base-url",
                          server.base_url, "--api-key-env", "TEST_CHAT_KEY", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert server.chat_received == [] and not (tmp_path / "f.json").exists()


def test_cli_existing_out_and_server_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEST_CHAT_KEY", "sk-cli")
    existing = tmp_path / "f.json"
    existing.write_text("keep me")
    with FakeOpenAIServer(faults=["500", "500"]) as server:
        argv = ["describe", "Brugada syndrome", "--base-url", server.base_url, "--api-key-env", "TEST_CHAT_KEY",
                "--max-retries", "1"]
        assert main([*argv, "--out", str(existing)]) == 2
        assert "already exists" in capsys.readouterr().err and existing.read_text() == "keep me"
        assert main([*argv, "--out", str(tmp_path / "g.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffusets-jax describe: error: ") and "failed after 2 attempts" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "g.json").exists()
