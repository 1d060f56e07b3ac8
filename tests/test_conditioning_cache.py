"""The embedding cache: dedup, order, resume after a crash (a real SIGKILLed subprocess), reports files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusets_jax.conditioning.cache import (
    _LOOKUP_CHUNK,
    EmbeddingCache,
    EmbeddingRunStats,
    embed_with_cache,
)
from diffusets_jax.conditioning.prompts import ordered_prompt
from diffusets_jax.conditioning.report_files import embed_report_file, read_report_prompts
from tests.helpers.fake_openai_server import FakeOpenAIServer, fake_vector

REPO = Path(__file__).resolve().parents[1]


class RecordingEmbedder:
    """A deterministic embedder that records what it was asked, and can fail on a chosen call."""

    def __init__(self, dim: int = 8, fail_on_call: int | None = None, model: str = "recording") -> None:
        self.dim, self.embedder_id = dim, f"test/{model}/{dim}"
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("embedding service went away")
        return np.stack([fake_vector(t, self.dim) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def test_duplicates_embedded_once_and_rows_in_input_order(tmp_path):
    texts = ["b", "a", "b", "c", "a", "d", "b"]
    embedder = RecordingEmbedder()
    stats = EmbeddingRunStats()
    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        out = embed_with_cache(texts, embedder, cache, batch_size=2, stats=stats)
        assert cache.count(embedder.embedder_id) == 4
    assert embedder.calls == [["b", "a"], ["c", "d"]]
    np.testing.assert_array_equal(out, np.stack([fake_vector(t, 8) for t in texts]))
    assert (stats.texts, stats.unique, stats.cached, stats.embedded) == (7, 4, 0, 4)


def test_persists_across_processes_and_only_missing_are_requested(tmp_path):
    path = tmp_path / "cache.sqlite"
    with EmbeddingCache(path) as cache:
        embed_with_cache(["a", "b"], RecordingEmbedder(), cache)
    embedder = RecordingEmbedder()
    with EmbeddingCache(path) as cache:
        out = embed_with_cache(["c", "a", "b", "c"], embedder, cache)
    assert embedder.calls == [["c"]]
    np.testing.assert_array_equal(out[1], fake_vector("a", 8))



def test_a_rerun_finds_every_prompt_of_every_lookup_chunk():
    """The cache is read in chunks of `_LOOKUP_CHUNK` prompts (SQLite's parameter limit): a rerun over more than
    one chunk requests nothing (a chunk one prompt short re-requested, and paid for, one prompt in 500)."""
    texts = [f"report {i}" for i in range(2 * _LOOKUP_CHUNK + 1)]
    with EmbeddingCache(":memory:") as cache:
        embed_with_cache(texts, RecordingEmbedder(), cache)
        embedder = RecordingEmbedder()
        out = embed_with_cache(texts, embedder, cache)
    assert embedder.calls == []
    np.testing.assert_array_equal(out[[0, -1]], np.stack([fake_vector(t, 8) for t in texts[::len(texts) - 1]]))

def test_embedders_do_not_share_vectors(tmp_path):
    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        embed_with_cache(["a"], RecordingEmbedder(model="one"), cache)
        other = RecordingEmbedder(model="two")
        embed_with_cache(["a"], other, cache)
        assert other.calls == [["a"]]
        assert cache.embedder_ids() == ["test/one/8", "test/two/8"]


def test_a_failing_batch_keeps_the_committed_ones(tmp_path):
    texts = [f"prompt {i}" for i in range(10)]
    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        with pytest.raises(RuntimeError, match="went away"):
            embed_with_cache(texts, RecordingEmbedder(fail_on_call=3), cache, batch_size=3)
        assert cache.count() == 6
        retry = RecordingEmbedder()
        out = embed_with_cache(texts, retry, cache, batch_size=3)
    assert retry.calls == [texts[6:9], texts[9:]]
    np.testing.assert_array_equal(out, np.stack([fake_vector(t, 8) for t in texts]))


def test_cached_dimension_mismatch_is_an_error(tmp_path):
    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        cache.put_many("test/recording/8", ["a"], np.ones((1, 4), np.float32))
        with pytest.raises(ValueError, match="holds 4-d vectors.*returns 8-d"):
            embed_with_cache(["a"], RecordingEmbedder(), cache)


def test_wrong_shape_from_embedder_is_not_cached(tmp_path):
    class Short(RecordingEmbedder):
        def embed(self, texts):
            return super().embed(texts)[:-1]

    with EmbeddingCache(tmp_path / "cache.sqlite") as cache:
        with pytest.raises(ValueError, match=r"returned shape \(1, 8\) for 2 texts"):
            embed_with_cache(["a", "b"], Short(), cache)
        assert cache.count() == 0


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        EmbeddingCache(path)


def test_an_existing_empty_file_is_refused_and_left_as_it_is(tmp_path):
    """SQLite takes an empty file for an empty database: a user's empty file became our cache."""
    path = tmp_path / "notes.sqlite"
    path.write_bytes(b"")
    before = path.stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"^--embedding-cache .*notes.sqlite is an empty file, not an embedding "
                                         r"cache; it was left as it is: point --embedding-cache at a new file"):
        EmbeddingCache(path, flag="--embedding-cache")
    assert path.read_bytes() == b"" and path.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.sqlite"]
    with EmbeddingCache(tmp_path / "new.sqlite") as cache:  # a missing path is created, as before
        assert cache.count() == 0


@pytest.mark.parametrize("wal", [True, False])
def test_a_new_cache_is_never_seen_empty_by_a_run_starting_on_it_at_once(tmp_path, monkeypatch, wal):
    """Two runs of a job array on one new --embedding-cache: SQLite created the file empty and wrote it at the first
    commit, and the second run, looking in between, refused the other's cache as a user's empty file."""
    import sqlite3

    from diffusets_jax.conditioning.cache import check_embedding_cache

    path = tmp_path / "shared.sqlite"
    connect, seen = sqlite3.connect, []

    def connect_then_another_run_looks(*args, **kwargs):
        db = connect(*args, **kwargs)
        if not seen or seen[-1] != "looking":
            seen.append("looking")  # the other run's own look opens the file too
            try:
                check_embedding_cache(path, "--embedding-cache")
                with EmbeddingCache(path, flag="--embedding-cache", wal=wal):
                    pass
                seen[-1] = "fine"
            except ValueError as err:
                seen[-1] = str(err)
        return db

    monkeypatch.setattr(sqlite3, "connect", connect_then_another_run_looks)
    with EmbeddingCache(path, flag="--embedding-cache", wal=wal) as cache:
        cache.put_many("e", ["a"], np.ones((1, 2), np.float32))
    assert seen and set(seen) == {"fine"}, seen
    monkeypatch.setattr(sqlite3, "connect", connect)
    with EmbeddingCache(path, wal=wal) as cache:
        assert cache.count() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.sqlite"]  # no temporary left beside it


def test_refusals_name_the_flag_the_user_gave(tmp_path):
    """Every refusal said "point --cache at a new file", also to `prepare --embedding-cache` users."""
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n" * 100)
    with pytest.raises(ValueError, match=r"^--embedding-cache .*notes.txt is not a usable SQLite database .*point "
                                         r"--embedding-cache at a new file") as raised:
        EmbeddingCache(path, flag="--embedding-cache")
    assert "--cache" not in str(raised.value).replace("--embedding-cache", "")


def test_reads_mimic_machine_measurements_layout(tmp_path):
    csv_path = tmp_path / "machine_measurements.csv"
    header = ["subject_id", "study_id"] + [f"report_{i}" for i in range(18)] + ["rr_interval"]
    rows = [
        ["1", "10", "Sinus rhythm", "Normal ECG"] + [""] * 16 + ["1000"],
        ["2", "11"] + [""] * 18 + ["0"],  # no statements: skipped
        ["3", "12", "Sinus rhythm", "Normal ECG"] + [""] * 16 + ["990"],
    ]
    csv_path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    reports = read_report_prompts(csv_path)
    assert reports.prompts == [ordered_prompt(["Sinus rhythm", "Normal ECG"])] * 2
    assert reports.skipped == 1 and reports.skipped_examples[0].startswith("line 3:")


def test_reads_jsonl_and_free_text(tmp_path):
    path = tmp_path / "reports.jsonl"
    lines = [json.dumps({"report_lines": ["Atrial fibrillation", "Low QRS voltages"]}),
             json.dumps({"report": "Atrial fibrillation|Low QRS voltages"}), "{not json", json.dumps({"age": 3}),
             json.dumps("Sinus bradycardia")]
    path.write_text("\n".join(lines) + "\n")
    reports = read_report_prompts(path)
    assert reports.prompts == [ordered_prompt("Atrial fibrillation|Low QRS voltages")] * 2 + [
        "Most importantly, the 1st diagnosis is {Sinus bradycardia}."]
    assert reports.skipped == 2
    free = read_report_prompts(path, template="free_text")
    assert free.prompts[0] == "The report of the ECG is that Atrial fibrillation, Low QRS voltages."


def test_reports_csv_is_read_as_prepare_reads_its_tables(tmp_path):
    """embed read CSV with csv.DictReader: a BOM hid the `report` column, one row that was not UTF-8 stopped the
    run, and skipped rows were named by record count, not by the line they are on."""
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfreport,id\r\nSinus rhythm,1\r\n")
    assert read_report_prompts(bom).prompts == [ordered_prompt("Sinus rhythm")]
    path = tmp_path / "reports.csv"
    path.write_bytes(b'id,report\n\n1,Sinus rhythm\n\n2,\n3,"Atrial fibrillation|\nLow QRS voltages"\n'
                     b"4,Rythme sinusal \xe9\n\n5,\n6,NA\n")
    reports = read_report_prompts(path)
    assert reports.prompts == [ordered_prompt("Sinus rhythm"), ordered_prompt("Atrial fibrillation|\nLow QRS voltages"),
                               ordered_prompt("NA")]
    assert reports.skipped == 3
    assert [e.split(":")[0] for e in reports.skipped_examples] == ["line 8", "line 5", "line 10"]
    assert reports.skipped_examples[0] == "line 8: not UTF-8 text"


@pytest.mark.parametrize("content", ['id,report\n1,"Sinus rhythm\n2,Atrial fibrillation\n3,Normal ECG\n',
                                     'id,report\n1,"Sinus rhythm\n' + "".join(f"{i},Normal ECG\n" for i in range(8000))])
def test_reports_csv_with_an_unclosed_quote_is_refused_naming_its_line(tmp_path, content):
    """It was read as one record (later rows merged into the open field), or a `field larger than field limit`
    traceback once the merged field passed 131,072 characters."""
    path = tmp_path / "unclosed.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match="unclosed.csv line 2: a quoted field opened on this line is never closed"):
        read_report_prompts(path)


def test_reports_csv_fields_of_any_length_are_read(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("report\n" + "Sinus rhythm " * 16_000 + "\nAtrial fibrillation\n")
    assert len(read_report_prompts(path, template="none").prompts) == 2


def test_reports_jsonl_with_a_bom_or_a_line_that_is_not_utf8(tmp_path):
    """A BOM made record 1 "Unexpected UTF-8 BOM"; one line that was not UTF-8 stopped the whole run."""
    path = tmp_path / "reports.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"report": "Sinus rhythm"}\n{"report": "Rythme \xe9"}\n"Normal ECG"\n')
    reports = read_report_prompts(path)
    assert reports.prompts == [ordered_prompt("Sinus rhythm"), ordered_prompt("Normal ECG")]
    assert reports.skipped_examples == ["line 2: not UTF-8 text"]


def test_embed_report_file_writes_summary_and_npz(tmp_path):
    path = tmp_path / "reports.jsonl"
    path.write_text("\n".join(json.dumps({"report": r}) for r in ["A|B", "C", "A|B"]) + "\n")
    summary = embed_report_file(path, RecordingEmbedder(), tmp_path / "c.sqlite", output=tmp_path / "e.npz",
                                progress=False, log=lambda s: None)
    assert summary["records"] == 3 and summary["unique_prompts"] == 2 and summary["embedded"] == 2
    with np.load(tmp_path / "e.npz") as saved:
        assert list(saved["prompts"]) == [ordered_prompt("A|B"), ordered_prompt("C")]
        np.testing.assert_array_equal(saved["embeddings"][1], fake_vector(ordered_prompt("C"), 8))


@pytest.mark.multiprocess
def test_sigkilled_embedding_run_resumes_requesting_only_missing_prompts(tmp_path):
    """A real `diffusets-jax embed` process is SIGKILLed while waiting on its 3rd request; the rerun asks
    the server only for the prompts that were not yet committed, each exactly once."""
    reports = [f"Finding {i}|Supplement {i % 3}" for i in range(20)]
    reports += reports[:5]  # duplicates must not be requested twice
    csv_path = tmp_path / "reports.csv"
    csv_path.write_text("report\n" + "\n".join(reports) + "\n")
    unique = list(dict.fromkeys(ordered_prompt(r) for r in reports))
    cache_path, output = tmp_path / "cache.sqlite", tmp_path / "embeddings.npz"
    dim, batch = 16, 4

    with FakeOpenAIServer(dim=dim) as server:
        command = [sys.executable, "-m", "diffusets_jax", "embed", "--input", str(csv_path), "--embedder", "openai",
                   "--cache", str(cache_path), "--base-url", server.base_url, "--dim", str(dim),
                   "--batch-size", str(batch), "--output", str(output), "--no-progress"]
        env = {**os.environ, "OPENAI_API_KEY": "sk-test", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
        server.block_at_request = 3
        first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert server.blocked.wait(timeout=120), "the embedding run never reached its 3rd request"
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
        assert first.returncode == -signal.SIGKILL
        server.release.set()
        first_run = list(server.received)
        assert first_run == [unique[0:4], unique[4:8], unique[8:12]]

        with EmbeddingCache(cache_path) as cache:  # what survived the kill: the two answered requests
            assert set(cache.get_many(f"openai/text-embedding-ada-002/{dim}", unique)) == set(unique[:8])
        assert not output.exists()

        server.block_at_request = None
        second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        second_run = server.received[len(first_run):]

    requested_again = [p for request in second_run for p in request]
    assert requested_again == unique[8:]  # only the missing ones, in order, once each
    assert all(len(request) <= batch for request in second_run)
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["unique_prompts"] == 20 and summary["already_cached"] == 8 and summary["embedded"] == 12
    with np.load(output) as saved:
        assert list(saved["prompts"]) == unique
        np.testing.assert_allclose(saved["embeddings"], np.stack([fake_vector(p, dim) for p in unique]), atol=1e-7)
