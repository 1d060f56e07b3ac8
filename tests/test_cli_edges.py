"""Every subcommand against bad input and other people's files (issue 15): one line, exit code 2, nothing touched.

Each row of CASES runs `diffusets-jax ARGS` in a shared folder (`world`) that holds a user's files, a user's
non-empty folder, a plain file where a folder is expected, damaged inputs and a tiny (unloaded) model directory.
Every case must fail before any expensive work: exit code 2, exactly one line on stderr naming the problem, no
traceback, and every file of the world byte-for-byte and mtime-for-mtime as it was, with nothing added.
The cases that need a trained model, a prepared dataset or a subprocess are grouped in the slow tests below.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusets_jax.cli import main
from tests.helpers.cli import exit_code
from tests.helpers.hash_embedder import HashEmbedder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ECG_DATA = REPO / "tests" / "data" / "ecg"


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | str]:
    """Every path under `root` with its bytes and mtime (folders by name): what a command must leave as it was.
    (A lock file a command opens in a folder of its own earlier run, which it may then refuse, is not counted.)"""
    state: dict[str, tuple[bytes, int] | str] = {}
    for path in sorted(root.rglob("*")):
        if path.name.startswith(".diffusets-run-p") and (path.parent / ".diffusets-run.json").is_file():
            continue
        key = str(path.relative_to(root))
        state[key] = "dir" if path.is_dir() else (path.read_bytes(), path.stat().st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("world")
    (w / "user").mkdir()
    (w / "user" / "thesis.tex").write_text("years of work")
    (w / "file.txt").write_text("a user's file where a folder is expected")
    (w / "folder").mkdir()
    (w / "folder" / "keep.txt").write_text("keep")
    (w / "cond.csv").write_text("text,sex,age,hr\nSinus rhythm,M,50,70\n")
    (w / "cond_latin1.csv").write_bytes("text,sex,age,hr\nSinus rhythm,M,50,70\nRythme sinusal \xe9,F,40,60\n".encode("latin-1"))
    (w / "reports.csv").write_text("report\nSinus rhythm|Normal ECG\n")
    (w / "reports_latin1.csv").write_bytes("report\nRythme sinusal \xe9\nBradycardie sinusale \xe9\n".encode("latin-1"))
    (w / "reports_unclosed.csv").write_text('id,report\n1,Sinus rhythm\n2,"Atrial fibrillation\n3,Normal ECG\n')
    (w / "truncated.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    (w / "random.npz").write_bytes(os.urandom(64))
    (w / "bad.safetensors").write_bytes(b"\xff" * 64)
    (w / "vae_model.pth").write_bytes(b"PK\x03\x04 not really a checkpoint")
    (w / "syntax.py").write_text("def get_config(:\n    pass\n")
    (w / "raises.py").write_text("import ml_collections\n\ndef get_config():\n    return undefined_name\n")
    (w / "config.json").write_text('{"train": {"num_steps": 3,}\n')
    (w / "someone_elses.sqlite").write_bytes(b"")
    (w / "empty.sqlite").write_bytes(b"")  # a user's empty file: SQLite would take it for an empty database
    with sqlite3.connect(w / "someone_elses.sqlite") as db:
        db.execute("CREATE TABLE patients (id INTEGER)")
    # A model directory whose index is damaged: refused before any weights load.
    (w / "model_bad_index" / "vae").mkdir(parents=True)
    (w / "model_bad_index" / "unet").mkdir()
    (w / "model_bad_index" / "model_index.json").write_text('{"format": "diffusets-jax model directory",\n  oops}')
    (w / "legacy_model").mkdir()
    (w / "legacy_model" / "generation.json").write_text("{not json")
    # A MIMIC-IV-ECG download whose patients table is a folder, and one whose measurements lack study_id.
    shutil.copytree(ECG_DATA / "mimic_iv_ecg", w / "mimic_patients_dir", ignore=shutil.ignore_patterns("files"))
    (w / "mimic_patients_dir" / "patients.csv").unlink()
    (w / "mimic_patients_dir" / "patients.csv").mkdir()
    shutil.copytree(ECG_DATA / "mimic_iv_ecg", w / "mimic_no_study_id", ignore=shutil.ignore_patterns("files"))
    table = w / "mimic_no_study_id" / "machine_measurements.csv"
    table.write_text(table.read_text().replace("study_id", "study", 1))
    # An earlier plot run of other records: ours, but not this run.
    (w / "plots").mkdir()
    (w / "plots" / ".diffusets-run.json").write_text(json.dumps(
        {"command": "plot", "fingerprint": "0" * 64, "settings": {"records": ["elsewhere"], "dpi": 200},
         "status": "complete"}))
    (w / "plots" / "elsewhere.png").write_bytes(b"\x89PNG old")
    # A user's project folder holding a command's inputs: conditions, a recording, a config, a Turing kit's key and
    # a rater's sheet, samples; and a model directory whose vae/ holds the checkpoint it was converted from.
    project = w / "project"
    project.mkdir()
    (project / "cond.csv").write_text("text,sex,age,hr\nSinus rhythm,M,50,70\n")
    for suffix in (".hea", ".dat"):
        shutil.copy(RECORD + suffix, project / f"00001_lr{suffix}")
    shutil.copy(CONFIGS / "demo_vae.py", project / "vae.py")
    (project / "key.json").write_text("{}")
    (project / "answers_a.csv").write_text("sheet_id,answer\n")
    (project / "samples.npz").write_bytes(b"PK\x03\x04 samples")
    (w / "models" / "vae").mkdir(parents=True)
    (w / "models" / "vae" / "vae_model.pth").write_bytes(b"PK\x03\x04 a checkpoint")
    # A latent dataset (what `encode` writes) where a prepared ECG dataset is asked for.
    from diffusets_jax.conditioning.spec import ConditioningSpec
    from tests.helpers.gaussian_latents import write_gaussian_latent_dataset
    from tests.helpers.tiny_models import TEXT_DIM, openai_conditioning

    write_gaussian_latent_dataset(w / "latents", splits={"train": 4, "test": 4}, vae_uid=None, latent_scale=1.0,
                                  conditioning=ConditioningSpec(openai_conditioning(TEXT_DIM).embedder, "ordered"),
                                  channel_mean=(0.0,) * 4, channel_std=(1.0,) * 4)
    return w


RECORD = str(ECG_DATA / "ptbxl" / "records100" / "00000" / "00001_lr")
SAMPLE = ["sample", "--model-dir", "{w}/model_bad_index", "--text", "Sinus rhythm", "--sex", "M", "--age", "50",
          "--hr", "70"]
EMBED = ["embed", "--input", "{w}/reports.csv", "--embedder", "local"]
TRAIN_VAE = ["train", "vae", "--config", str(CONFIGS / "demo_vae.py")]
HAS_TORCH = importlib.util.find_spec("torch") is not None

# (id, argv with {w} for the world folder, what the one line must say)
CASES: list[tuple[str, list[str], str]] = [
    # sample: outputs, flags and inputs, all before the model is loaded
    ("sample-out-is-a-file", [*SAMPLE, "--out", "{w}/file.txt"], "is an existing file"),
    ("sample-out-under-a-file", [*SAMPLE, "--out", "{w}/file.txt/out"], "is a file, not a directory"),
    ("sample-out-users-folder", [*SAMPLE, "--out", "{w}/user"], "not written by diffusets-jax sample"),
    ("sample-corpus-into-users-folder", [*SAMPLE, "--corpus", "--out", "{w}/user"],
     "not written by diffusets-jax sample --corpus"),
    ("sample-steps-0", [*SAMPLE, "--out", "{w}/new", "--steps", "0"], "argument --steps: must be a whole number >= 1, got '0'"),
    ("sample-batch-size-0", [*SAMPLE, "--out", "{w}/new", "--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
    ("sample-count-0", [*SAMPLE, "--out", "{w}/new", "-n", "0"], "argument -n/--count: must be a whole number >= 1"),
    ("sample-text-is-a-built-prompt", ["sample", "--model-dir", "{w}/model_bad_index", "--text",
                                       "Most importantly, the 1st diagnosis is {Sinus rhythm}.", "--sex", "M", "--age",
                                       "50", "--hr", "70", "--out", "{w}/new"],
     "--text: text: statement 'Most importantly, the 1st diagnosis is {Sinus rhythm}.' holds '{' or '}'"),
    ("sample-shard-size-0", [*SAMPLE, "--out", "{w}/new", "--corpus", "--shard-size", "0"], "argument --shard-size: must be a whole number >= 1"),
    ("sample-unknown-format", [*SAMPLE, "--out", "{w}/new", "--formats", "npz,gif"], "unknown gif"),
    ("sample-wfdb-fs-negative", [*SAMPLE, "--out", "{w}/new", "--wfdb-fs", "-5"], "--wfdb-fs must be a rate in Hz from 100"),
    # 0.05 crashed after generating (ZeroDivisionError) in a claimed folder; 0.2 wrote 2-sample "ECGs"
    ("sample-wfdb-fs-below-an-ecgs-rate", [*SAMPLE, "--out", "{w}/new", "--wfdb-fs", "0.05"],
     "--wfdb-fs must be a rate in Hz from 100 to 10000 (e.g. 500; the model's own is 102.4), got 0.05"),
    ("sample-wfdb-fs-two-samples", [*SAMPLE, "--out", "{w}/new", "--wfdb-fs", "0.2"], "got 0.2"),
    # flags that could not take effect, refused rather than silently ignored
    ("sample-eta-with-dpmpp", [*SAMPLE, "--out", "{w}/new", "--eta", "1"],
     "eta 1 (--eta) is DDIM's noise; the dpmpp_2m sampler has none to set"),
    ("sample-eta-with-ddpm", [*SAMPLE, "--out", "{w}/new", "--sampler", "ddpm", "--eta", "0.5"],
     "the ddpm sampler has none to set"),
    *[(f"sample-conditions-with-{flag.strip('-')}", ["sample", "--model-dir", "{w}/model_bad_index", "--conditions",
                                                     "{w}/cond.csv", "--out", "{w}/new", flag, value],
       f"--conditions FILE gives each row's sex, age, heart rate and count: drop {flag}")
      for flag, value in (("-n", "4"), ("--sex", "F"), ("--age", "40"), ("--hr", "60"))],
    ("sample-conditions-with-text", ["sample", "--model-dir", "{w}/model_bad_index", "--conditions", "{w}/cond.csv",
                                     "--text", "Sinus rhythm", "--out", "{w}/new"],
     "give one of --conditions FILE, --findings FILE or --text"),
    ("sample-corpus-with-formats", [*SAMPLE, "--out", "{w}/new", "--corpus", "--formats", "bogus"],
     "--formats sets a sample folder's outputs; --corpus writes TFRecord shards only"),
    ("sample-corpus-with-wfdb-fs", [*SAMPLE, "--out", "{w}/new", "--corpus", "--wfdb-fs", "0"],
     "--wfdb-fs sets a sample folder's outputs; --corpus writes TFRecord shards only"),
    ("sample-shard-size-without-corpus", [*SAMPLE, "--out", "{w}/new", "--shard-size", "8"],
     "--shard-size sets the shards of a --corpus"),
    # -n 1e12 built the whole request list in memory (or failed advising --batch-size)
    ("sample-count-beyond-one-run", [*SAMPLE, "--out", "{w}/new", "-n", "1000000000000"],
     "-n 1000000000000 asks for 1,000,000,000,000 ECGs, more than the 10,000,000 one run makes"),
    ("sample-wfdb-fs-a-typo", [*SAMPLE, "--out", "{w}/new", "--wfdb-fs", "500000"], "to 10000 (e.g. 500;"),
    # Python's float() reads these: every non-integer flag refuses them (test_every_non_integer_flag_...)
    ("sample-unknown-sampler", [*SAMPLE, "--out", "{w}/new", "--sampler", "euler"],
     "argument --sampler: invalid choice: 'euler' (choose from 'ddpm', 'ddim', 'dpmpp_2m') (`diffusets-jax sample "
     "--help` lists the options)"),
    ("sample-out-missing", SAMPLE, "the following arguments are required: --out"),
    # JAX keeps a seed's low 32 bits: 2**32 would draw seed 0's ECGs (config.check_seed)
    ("sample-seed-negative", [*SAMPLE, "--out", "{w}/new", "--seed", "-1"],
     "argument --seed: the seed must be a whole number from 0 to 4294967295"),
    ("sample-seed-beyond-32-bits", [*SAMPLE, "--out", "{w}/new", "--seed", "4294967296"],
     "so larger ones would repeat smaller ones), got 4294967296"),
    ("turing-conditions-seed-negative", ["turing-conditions", "--dataset", "{w}/nope", "--out", "{w}/c.csv", "-n", "2",
                                         "--seed", "-3"], "argument --seed: the seed must be a whole number from 0 to 4294967295"),
    ("sample-wfdb-fs-nan", [*SAMPLE, "--out", "{w}/new", "--wfdb-fs", "nan"],
     "argument --wfdb-fs: must be a finite number, got 'nan'"),
    ("sample-guidance-scale-nan", [*SAMPLE, "--out", "{w}/new", "--guidance-scale", "NaN"],
     "argument --guidance-scale: must be a finite number, got 'NaN'"),
    ("sample-eta-inf", [*SAMPLE, "--out", "{w}/new", "--sampler", "ddim", "--eta", "inf"],
     "argument --eta: must be a finite number"),
    ("sample-reference-start-not-a-number", [*SAMPLE, "--out", "{w}/new", "--reference", RECORD, "--observe", "I",
                                             "--reference-start", "1,5"], "argument --reference-start: expected a number"),
    ("sample-conditions-not-utf8", ["sample", "--model-dir", "{w}/model_bad_index", "--conditions",
                                    "{w}/cond_latin1.csv", "--out", "{w}/new"], "cond_latin1.csv line 3: not UTF-8"),
    ("sample-conditions-is-a-folder", ["sample", "--model-dir", "{w}/model_bad_index", "--conditions", "{w}/folder",
                                       "--out", "{w}/new"], "is a directory"),
    ("sample-embedding-cache-is-a-folder", [*SAMPLE, "--out", "{w}/new", "--embedding-cache", "{w}/folder"],
     "--embedding-cache"),
    ("sample-model-dir-missing", ["sample", "--model-dir", "{w}/nope", "--conditions", "{w}/cond.csv", "--out",
                                  "{w}/new"], "does not exist"),
    ("sample-model-dir-is-a-file", ["sample", "--model-dir", "{w}/file.txt", "--conditions", "{w}/cond.csv", "--out",
                                    "{w}/new"], "is a file, not a model directory"),
    ("sample-model-index-malformed", [*SAMPLE, "--out", "{w}/new"], "model_index.json line 2: not valid JSON"),
    ("sample-legacy-generation-json-malformed", ["sample", "--model-dir", "{w}/legacy_model", "--conditions",
                                                 "{w}/cond.csv", "--out", "{w}/new"],
     "generation.json line 1: not valid JSON"),
    # evaluate
    ("evaluate-limit-0", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "x", "--out", "{w}/new", "--limit", "0"],
     "argument --limit: must be a whole number >= 1"),
    ("evaluate-batch-size-0", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "x", "--out", "{w}/new",
                               "--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
    ("evaluate-out-is-a-file", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "x", "--out", "{w}/file.txt"],
     "is an existing file"),
    ("evaluate-out-users-folder", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "x", "--out", "{w}/user"],
     "not written by diffusets-jax evaluate"),
    ("evaluate-dataset-unknown", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "no_such_dataset", "--out",
                                  "{w}/new"], "no dataset 'no_such_dataset'"),
    # a dataset given as a path: what is wrong with the path, not how TFDS failed to parse it as a name
    ("evaluate-dataset-path-missing", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "{w}/nope", "--out",
                                       "{w}/new"], "dataset {w}/nope does not exist: give a prepared dataset's version"),
    ("evaluate-dataset-folder-not-prepared", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "{w}/folder",
                                              "--out", "{w}/new"], "is a folder without dataset_info.json"),
    ("evaluate-dataset-relative-typo", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "data/ptbxl/1.0.0",
                                        "--out", "{w}/new"], "is neither a folder here nor a dataset name"),
    # a latent dataset where ECGs are read: one line before an output folder is claimed, not a KeyError after
    ("evaluate-dataset-is-latents", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "{w}/latents", "--split",
                                     "test", "--out", "{w}/new"], "--dataset {w}/latents: not a prepared ECG dataset"),
    ("reconstruct-eval-dataset-is-latents", ["reconstruct-eval", "--dataset", "{w}/latents", "--out", "{w}/new"],
     "(a latent dataset: `encode` wrote it), it has no ecg"),
    ("turing-conditions-dataset-is-latents", ["turing-conditions", "--dataset", "{w}/latents", "-n", "2", "--seed",
                                              "1", "--out", "{w}/c.csv"], "not a prepared ECG dataset"),
    # embed: every path and flag before a model is loaded or a request is made
    ("embed-input-missing", ["embed", "--input", "{w}/nope.csv", "--embedder", "local", "--cache", "{w}/c.sqlite"],
     "--input {w}/nope.csv does not exist"),
    ("embed-input-is-a-folder", ["embed", "--input", "{w}/folder", "--embedder", "local", "--cache", "{w}/c.sqlite"],
     "is a directory"),
    ("embed-input-not-utf8", ["embed", "--input", "{w}/reports_latin1.csv", "--embedder", "local", "--cache",
                              "{w}/c.sqlite"], "nothing to embed (all 2 records were skipped, e.g. line 2: not UTF-8"),
    ("embed-input-unclosed-quote", ["embed", "--input", "{w}/reports_unclosed.csv", "--embedder", "local", "--cache",
                                    "{w}/c.sqlite"], "reports_unclosed.csv line 3: a quoted field opened on this line"),
    ("embed-cache-is-a-folder", [*EMBED, "--cache", "{w}/folder"], "--cache {w}/folder is a directory"),
    ("embed-cache-under-a-file", [*EMBED, "--cache", "{w}/file.txt/c.sqlite"], "is a file, not a directory"),
    ("embed-cache-not-sqlite", [*EMBED, "--cache", "{w}/file.txt"], "not a usable SQLite database"),
    ("embed-cache-someone-elses-database", [*EMBED, "--cache", "{w}/someone_elses.sqlite"],
     "SQLite database of something else (tables patients): point --cache at a new file"),
    ("embed-cache-empty-file", [*EMBED, "--cache", "{w}/empty.sqlite"],
     "--cache {w}/empty.sqlite is an empty file, not an embedding cache"),
    ("prepare-embedding-cache-not-a-cache", ["prepare", "ptbxl", "--manual-dir", "{w}/user", "--data-dir",
                                             "{w}/new", "--embedding-cache", "{w}/file.txt"],
     "--embedding-cache {w}/file.txt is not a usable SQLite database (file is not a database): point "
     "--embedding-cache at a new file"),
    ("prepare-embedding-cache-empty-file", ["prepare", "ptbxl", "--manual-dir", "{w}/user", "--data-dir",
                                            "{w}/new", "--embedding-cache", "{w}/empty.sqlite"],
     "--embedding-cache {w}/empty.sqlite is an empty file, not an embedding cache"),
    ("sample-embedding-cache-someone-elses-database", [*SAMPLE, "--out", "{w}/new", "--embedding-cache",
                                                      "{w}/someone_elses.sqlite"],
     "--embedding-cache {w}/someone_elses.sqlite is a SQLite database of something else"),
    ("embed-output-under-a-file", [*EMBED, "--cache", "{w}/c.sqlite", "--output", "{w}/file.txt/x.npz"],
     "is a file, not a directory"),
    ("embed-output-is-a-folder", [*EMBED, "--cache", "{w}/c.sqlite", "--output", "{w}/folder"], "is a directory"),
    ("embed-output-users-file", [*EMBED, "--cache", "{w}/c.sqlite", "--output", "{w}/truncated.npz"],
     "exists and was not written by diffusets-jax embed"),
    ("embed-batch-size-0", [*EMBED, "--cache", "{w}/c.sqlite", "--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
    ("embed-openai-without-key", ["embed", "--input", "{w}/reports.csv", "--embedder", "openai", "--cache",
                                  "{w}/c.sqlite", "--api-key-env", "DIFFUSETS_TEST_NO_SUCH_KEY"],
     "$DIFFUSETS_TEST_NO_SUCH_KEY is not set"),
    # convert
    ("convert-truncated-npz", ["convert", "--vae", "{w}/truncated.npz", "--out", "{w}/new"], "truncated.npz"),
    ("convert-not-an-npz", ["convert", "--vae", "{w}/random.npz", "--out", "{w}/new"], "not a .npz archive"),
    ("convert-corrupt-safetensors", ["convert", "--vae", "{w}/bad.safetensors", "--out", "{w}/new"],
     "not a readable .safetensors"),
    ("convert-pth", ["convert", "--vae", "{w}/vae_model.pth", "--out", "{w}/new"],
     "is not a PyTorch checkpoint" if HAS_TORCH else "needs PyTorch"),
    ("convert-checkpoint-is-a-folder", ["convert", "--vae", "{w}/folder", "--out", "{w}/new"], "is a directory"),
    ("convert-out-is-a-file", ["convert", "--vae", "{w}/truncated.npz", "--out", "{w}/file.txt"],
     "is an existing file"),
    # encode: flags, output folder and dataset before the VAE is loaded
    ("encode-batch-size-0", ["encode", "--vae", "{w}/nope", "--data-dir", "{w}", "--dataset", "x", "--out",
                             "{w}/new", "--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
    ("encode-examples-per-shard-0", ["encode", "--vae", "{w}/nope", "--data-dir", "{w}", "--dataset", "x", "--out",
                                     "{w}/new", "--examples-per-shard", "0"],
     "argument --examples-per-shard: must be a whole number >= 1"),
    ("encode-out-is-a-file", ["encode", "--vae", "{w}/nope", "--data-dir", "{w}", "--dataset", "x", "--out",
                              "{w}/file.txt"], "is an existing file"),
    ("encode-out-users-folder", ["encode", "--vae", "{w}/nope", "--data-dir", "{w}", "--dataset", "x", "--out",
                                 "{w}/user"], "not written by diffusets-jax encode"),
    ("encode-dataset-unknown", ["encode", "--vae", "{w}/nope", "--data-dir", "{w}/user", "--dataset", "no_such",
                                "--out", "{w}/new"], "no dataset 'no_such'"),
    # prepare
    ("prepare-workers-negative", ["prepare", "ptbxl", "--manual-dir", "{w}/folder", "--data-dir", "{w}/new",
                                  "--workers", "-3"], "argument --workers: must be a whole number >= 0, got '-3'"),
    ("prepare-workers-with-beam", ["prepare", "ptbxl", "--manual-dir", "{w}/folder", "--data-dir", "{w}/new",
                                   "--workers", "2", "--beam-pipeline-options", "runner=DirectRunner"],
     "with --beam-pipeline-options Beam decodes: drop --workers"),
    ("prepare-chunk-size-0", ["prepare", "ptbxl", "--manual-dir", "{w}/folder", "--data-dir", "{w}/new",
                              "--chunk-size", "0"], "argument --chunk-size: must be a whole number >= 1"),
    ("prepare-manual-dir-missing", ["prepare", "ptbxl", "--manual-dir", "{w}/nope", "--data-dir", "{w}/new"],
     "--manual-dir {w}/nope does not exist"),
    ("prepare-manual-dir-is-a-file", ["prepare", "ptbxl", "--manual-dir", "{w}/file.txt", "--data-dir", "{w}/new"],
     "is a file"),
    ("prepare-data-dir-is-a-file", ["prepare", "ptbxl", "--manual-dir", "{w}/folder", "--data-dir", "{w}/file.txt"],
     "is an existing file"),
    ("prepare-wrong-download", ["prepare", "ptbxl", "--manual-dir", "{w}/folder", "--data-dir", "{w}/new"],
     "ptbxl_database.csv not found"),
    ("prepare-patients-table-is-a-folder", ["prepare", "mimic-iv-ecg", "--manual-dir", "{w}/mimic_patients_dir",
                                            "--data-dir", "{w}/new"], "patients.csv is a directory"),
    ("prepare-measurements-without-study-id", ["prepare", "mimic-iv-ecg", "--manual-dir", "{w}/mimic_no_study_id",
                                               "--data-dir", "{w}/new"], "no column 'study_id'"),
    # train
    ("train-config-for-another-model", ["train", "vae", "--config", str(CONFIGS / "demo_clip.py"), "--workdir",
                                        "{w}/new"], "is a clip config"),
    ("train-config-syntax-error", ["train", "vae", "--config", "{w}/syntax.py", "--workdir", "{w}/new"],
     "syntax.py line 1: Python syntax error"),
    ("train-config-raises", ["train", "vae", "--config", "{w}/raises.py", "--workdir", "{w}/new"],
     "raises.py line 4: get_config() raised NameError"),
    ("train-config-json-malformed", ["train", "vae", "--config", "{w}/config.json", "--workdir", "{w}/new"],
     "config.json line 1: not valid JSON"),
    ("train-config-is-a-folder", ["train", "vae", "--config", "{w}/folder", "--workdir", "{w}/new"],
     "config file {w}/folder is a directory"),
    ("train-negative-steps", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.train.num_steps=-5"],
     "train.num_steps must be a positive"),
    ("train-zero-batch", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.train.global_batch_size=0"],
     "train.global_batch_size must be a positive"),
    # values that train wrongly instead of failing: refused with the key, before any data is read
    ("train-negative-learning-rate", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.optimizer.learning_rate=-1e-4"],
     "optimizer.learning_rate must be in (0, inf), got -0.0001"),
    ("train-nan-learning-rate", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.optimizer.learning_rate=nan"],
     "optimizer.learning_rate must be a finite number"),
    ("train-beta-above-one", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.optimizer.b1=1.5"],
     "optimizer.b1 must be in [0, 1), got 1.5"),
    ("train-negative-weight-decay", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.optimizer.weight_decay=-0.01"],
     "optimizer.weight_decay must be in [0, inf)"),
    ("train-float16", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.train.compute_dtype=float16"],
     "train.compute_dtype must be one of float32, bfloat16, got 'float16'"),
    ("train-seed-beyond-32-bits", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.train.seed=4294967297"],
     "train.seed must be a whole number from 0 to 4294967295"),
    ("train-zero-width", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.model.latent_channels=0"],
     "model.latent_channels must be positive (a width, count or size), got 0"),
    ("train-cond-dropout-above-one", ["train", "unet", "--config", str(CONFIGS / "demo_unet.py"), "--workdir",
                                      "{w}/new", "--config.train.cond_dropout=1.5"], "train.cond_dropout must be in [0, 1)"),
    ("train-unknown-conv-algorithm", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.model.conv_algorithm=fft"],
     "model.conv_algorithm must be one of auto, direct, winograd"),
    ("train-unknown-key", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.train.lr=1"], "unknown config key"),
    ("train-batch-not-divisible-into-micro-batches", [*TRAIN_VAE, "--workdir", "{w}/new",
                                                      "--config.train.grad_accum_steps=3"],
     "train.global_batch_size 8 must be divisible by train.grad_accum_steps 3"),
    ("train-workdir-is-a-file", [*TRAIN_VAE, "--workdir", "{w}/file.txt"], "is an existing file"),
    ("train-workdir-users-folder", [*TRAIN_VAE, "--workdir", "{w}/user"], "not written by diffusets-jax train vae"),
    ("train-model-dir-is-a-file", [*TRAIN_VAE, "--workdir", "{w}/new", "--model-dir", "{w}/file.txt"],
     "--model-dir {w}/file.txt is an existing file"),
    ("train-dataset-unknown", [*TRAIN_VAE, "--workdir", "{w}/new", "--config.data.dataset=no_such_dataset"],
     "no dataset 'no_such_dataset'"),
    # plot
    ("plot-record-missing", ["plot", "{w}/nope.hea", "--out-dir", "{w}/new"], "{w}/nope.hea does not exist"),
    ("plot-record-is-a-folder", ["plot", "{w}/folder", "--out-dir", "{w}/new"],
     "{w}/folder is a directory, not a WFDB record"),
    ("plot-out-dir-is-a-file", ["plot", RECORD, "--out-dir", "{w}/file.txt"], "is an existing file"),
    ("plot-out-dir-users-folder", ["plot", RECORD, "--out-dir", "{w}/user"], "not written by diffusets-jax plot"),
    ("plot-into-another-plot-run", ["plot", RECORD, "--out-dir", "{w}/plots"], "with other settings"),
    ("plot-dpi-0", ["plot", RECORD, "--out-dir", "{w}/new", "--dpi", "0"], "argument --dpi: must be a whole number >= 1"),
    ("plot-dpi-5", ["plot", RECORD, "--out-dir", "{w}/new", "--dpi", "5"], "--dpi must be between"),
    # counts, sizes and limits: refused where the flag is read, alike in every command (`--limit 0` and
    # `--workers -2` used to pass in some commands and not in others)
    ("reconstruct-eval-limit-0", ["reconstruct-eval", "--dataset", "x", "--out", "{w}/new", "--limit", "0"],
     "argument --limit: must be a whole number >= 1, got '0'"),
    ("reconstruct-eval-workers-negative", ["reconstruct-eval", "--dataset", "x", "--out", "{w}/new", "--workers", "-2"],
     "argument --workers: must be a whole number >= 1, got '-2'"),
    # samples come with no CLIP: was "--model-dir None: no such model directory", after the dataset was read
    ("evaluate-generated-without-clip", ["evaluate", "--generated", "{w}/project/samples.npz", "--dataset", "x",
                                         "--out", "{w}/new"], "--generated needs --clip DIR: a model directory with a "
                                                               "clip/ component"),
    # flags that shape only what --model-dir generates: were ignored without a word with --generated
    ("evaluate-generated-with-a-sampler", ["evaluate", "--generated", "{w}/project/samples.npz", "--clip",
                                           "{w}/model_bad_index", "--dataset", "x", "--out", "{w}/new", "--sampler",
                                           "ddim"], "--sampler sets how --model-dir generates; --generated scores its "
                                                    "samples as they are: drop --sampler"),
    ("evaluate-generated-with-guidance-1", ["evaluate", "--generated", "{w}/project/samples.npz", "--clip",
                                            "{w}/model_bad_index", "--dataset", "x", "--out", "{w}/new",
                                            "--guidance-scale", "1"], "drop --guidance-scale"),
    ("evaluate-generated-with-samples-per-record", ["evaluate", "--generated", "{w}/project/samples.npz", "--clip",
                                                    "{w}/model_bad_index", "--dataset", "x", "--out", "{w}/new",
                                                    "--samples-per-record", "3"], "drop --samples-per-record"),
    ("evaluate-records-per-condition-without-rules", ["evaluate", "--model-dir", "{w}/model_bad_index", "--dataset",
                                                      "x", "--out", "{w}/new", "--records-per-condition", "5"],
     "--records-per-condition sets how many records each condition rule picks: add --by-condition, or drop "
     "--records-per-condition"),
    ("downstream-sampling-steps-without-a-model", ["downstream", "--dataset", "x", "--out", "{w}/new",
                                                   "--sampling-steps", "50"],
     "--sampling-steps sets how --model-dir generates the minority ECGs, and no --model-dir is given: add "
     "--model-dir, or drop --sampling-steps"),
    ("downstream-sampler-with-a-corpus", ["downstream", "--dataset", "x", "--generated-corpus", "{w}/latents", "--out",
                                          "{w}/new", "--sampler", "dpmpp_2m"], "drop --sampler"),
    ("evaluate-workers-0", ["evaluate", "--model-dir", "{w}/nope", "--dataset", "x", "--out", "{w}/new", "--workers",
                            "0"], "argument --workers: must be a whole number >= 1"),
    ("turing-conditions-limit-negative", ["turing-conditions", "--dataset", "x", "-n", "2", "--seed", "1", "--out",
                                          "{w}/c.csv", "--limit", "-1"], "argument --limit: must be a whole number >= 1"),
    ("embed-max-retries-negative", [*EMBED, "--cache", "{w}/c.sqlite", "--max-retries", "-1"],
     "argument --max-retries: must be a whole number >= 0, got '-1'"),
    ("sample-count-not-a-number", [*SAMPLE, "--out", "{w}/new", "-n", "ten"],
     "argument -n/--count: expected a whole number, got 'ten'"),
    # an unknown flag is named with its command, as argparse names a bad value
    ("train-unknown-flag", [*TRAIN_VAE, "--workdir", "{w}/new", "--dataset", "x"],
     "diffusets-jax train: error: unrecognized arguments: --dataset x (`diffusets-jax train --help`"),
    ("plot-unknown-flag", ["plot", RECORD, "--out-dir", "{w}/new", "--colour", "red"],
     "diffusets-jax plot: error: unrecognized arguments: --colour red"),
    # describe's and embed's request settings are refused where the flag is read, named as flags: the Python API's
    # messages named its parameters, and an empty --model or a 0 s --timeout reached the server and retried for minutes
    ("describe-temperature-out-of-range", ["describe", "x", "--out", "{w}/f.json", "--temperature", "3"],
     "argument --temperature: must be within 0..2"),
    ("describe-max-statements-too-many", ["describe", "x", "--out", "{w}/f.json", "--max-statements", "19"],
     "argument --max-statements: must be within 1..18"),
    ("describe-model-empty", ["describe", "x", "--out", "{w}/f.json", "--model", ""],
     "argument --model: must not be empty"),
    ("describe-timeout-zero", ["describe", "x", "--out", "{w}/f.json", "--timeout", "0"],
     "argument --timeout: must be a number > 0, got '0'"),
    ("embed-model-empty", ["embed", "--input", "{w}/reports.csv", "--embedder", "openai", "--cache", "{w}/c.sqlite",
                           "--model", ""], "argument --model: must not be empty"),
    ("embed-timeout-zero", ["embed", "--input", "{w}/reports.csv", "--embedder", "openai", "--cache",
                            "{w}/c.sqlite", "--timeout", "0"], "argument --timeout: must be a number > 0"),
    ("embed-api-key-env-empty", ["embed", "--input", "{w}/reports.csv", "--embedder", "openai", "--cache",
                                 "{w}/c.sqlite", "--api-key-env", ""], "argument --api-key-env: must not be empty"),
    ("convert-embedder-model-empty", ["convert", "--out", "{w}/new", "--embedder-model", ""],
     "argument --embedder-model: must not be empty"),
    ("debug-after-the-command", ["plot", RECORD, "--out-dir", "{w}/new", "--debug"],
     "unrecognized arguments: --debug; --debug goes before the command: `diffusets-jax --debug plot ...`"),
    # --overwrite replaces the output folder as a whole: refused when it is, or holds, an input of the same run (a
    # mistyped --out one level up, given --overwrite after the first refusal, deleted the dataset or model it read)
    ("sample-overwrite-out-holds-the-model", [*SAMPLE, "--out", "{w}", "--overwrite"],
     "--out {w} holds --model-dir {w}/model_bad_index, which this run reads: --overwrite would replace it"),
    ("sample-overwrite-out-holds-the-conditions", ["sample", "--model-dir", "{w}/model_bad_index", "--conditions",
                                                   "{w}/project/cond.csv", "--out", "{w}/project", "--overwrite"],
     "--out {w}/project holds --conditions {w}/project/cond.csv"),
    ("sample-overwrite-out-holds-the-recording", [*SAMPLE, "--reference", "{w}/project/00001_lr", "--observe", "I",
                                                  "--out", "{w}/project/", "--overwrite"],
     "holds --reference {w}/project/00001_lr"),
    ("evaluate-overwrite-out-holds-the-samples", ["evaluate", "--generated", "{w}/project/samples.npz", "--dataset",
                                                  "x", "--out", "{w}/project", "--overwrite"],
     "holds --generated {w}/project/samples.npz"),
    ("encode-overwrite-out-is-the-dataset", ["encode", "--vae", "{w}/model_bad_index", "--dataset", "{w}/latents",
                                             "--out", "{w}/latents", "--overwrite"],
     "--out {w}/latents is --dataset {w}/latents"),
    ("diagnose-overwrite-out-holds-the-model", ["diagnose", "--model-dir", "{w}/model_bad_index", "--latents",
                                                "{w}/latents", "--out", "{w}/model_bad_index/..", "--overwrite"],
     "holds --model-dir {w}/model_bad_index"),
    ("reconstruct-eval-overwrite-out-holds-the-model", ["reconstruct-eval", "--model-dir", "{w}/model_bad_index",
                                                        "--dataset", "x", "--out", "{w}", "--overwrite"],
     "holds --model-dir {w}/model_bad_index"),
    ("downstream-overwrite-out-holds-the-dataset", ["downstream", "--dataset", "{w}/latents", "--out", "{w}",
                                                    "--overwrite"], "--out {w} holds --dataset {w}/latents"),
    ("turing-kit-overwrite-out-holds-the-samples", ["turing-kit", "--variant", "alignment", "--generated",
                                                    "{w}/project/samples.npz", "--out", "{w}/project", "--overwrite"],
     "holds --generated {w}/project/samples.npz"),
    ("turing-score-overwrite-out-holds-the-key", ["turing-score", "{w}/project/answers_a.csv", "--key",
                                                  "{w}/project/key.json", "--out", "{w}/project", "--overwrite"],
     "--out {w}/project holds --key {w}/project/key.json"),
    ("train-overwrite-workdir-holds-the-config", ["train", "vae", "--config", "{w}/project/vae.py", "--workdir",
                                                  "{w}/project", "--overwrite"],
     "--workdir {w}/project holds --config {w}/project/vae.py"),
    ("plot-overwrite-out-dir-holds-the-record", ["plot", "{w}/project/00001_lr.hea", "--out-dir", "{w}/project",
                                                 "--overwrite"], "--out-dir {w}/project holds record"),
    ("embed-overwrite-output-is-the-input", [*EMBED, "--cache", "{w}/c.sqlite", "--output", "{w}/reports.csv",
                                             "--overwrite"], "--output {w}/reports.csv is --input {w}/reports.csv"),
    ("convert-overwrite-component-holds-its-checkpoint", ["convert", "--vae", "{w}/models/vae/vae_model.pth", "--out",
                                                          "{w}/models", "--overwrite"],
     "--out {w}/models/vae holds --vae {w}/models/vae/vae_model.pth"),
    # An output inside a folder the run reads mixes with that model's or dataset's own files (with or without
    # --overwrite): refused, where `sample --out MODEL/samples` was written into the model directory.
    ("sample-out-inside-the-model", [*SAMPLE, "--out", "{w}/model_bad_index/samples"],
     "--out {w}/model_bad_index/samples is inside --model-dir {w}/model_bad_index, which this run reads: its "
     "outputs would mix with that folder's own files; choose --out outside it"),
    ("evaluate-out-inside-the-dataset", ["evaluate", "--model-dir", "{w}/model_bad_index", "--dataset", "{w}/latents",
                                         "--out", "{w}/latents/eval"], "is inside --dataset {w}/latents"),
    ("encode-out-inside-the-vae", ["encode", "--vae", "{w}/model_bad_index", "--dataset", "{w}/latents", "--out",
                                   "{w}/model_bad_index/latents"], "is inside --vae {w}/model_bad_index"),
    ("diagnose-out-inside-the-latents", ["diagnose", "--model-dir", "{w}/model_bad_index", "--latents",
                                         "{w}/latents", "--out", "{w}/latents/diagnose"], "is inside --latents"),
    ("train-model-dir-inside-the-dataset", [*TRAIN_VAE, "--workdir", "{w}/new", "--model-dir", "{w}/latents/model",
                                            "--config.data.dataset={w}/latents"],
     "--model-dir {w}/latents/model is inside --config.data.dataset {w}/latents"),
    ("embed-output-inside-the-encoder", [*EMBED, "--model-dir", "{w}/folder", "--cache", "{w}/c.sqlite", "--output",
                                         "{w}/folder/prompts.npz"], "is inside --model-dir {w}/folder"),
    # demo
    ("demo-out-users-folder", ["demo", "--out", "{w}/user", "--quick"], "not written by diffusets-jax demo"),
    ("demo-out-is-a-file", ["demo", "--out", "{w}/file.txt", "--quick"], "is an existing file"),
]


def typed_flags(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    """(command, action) of every flag with a type, in every command."""
    found = []
    for action in parser._actions:
        if action.type is not None:
            found.append((parser.prog, action))
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            found += typed_flags(sub)
    return found


def test_every_non_integer_flag_refuses_nan_and_inf():
    """Python's float() reads "nan" and "inf", which no range check refuses (`nan <= 0` is false): a NaN guidance
    scale or WFDB rate sampled for minutes, then wrote no usable ECG. So every such flag of every command parses
    with `finite_float`."""
    from diffusets_jax.cli import _temperature, build_parser, finite_float, positive_float

    typed = typed_flags(build_parser())
    assert not [(prog, action.dest) for prog, action in typed if action.type is float]
    assert len([a for _, a in typed if a.type in (finite_float, positive_float, _temperature)]) >= 16
    assert finite_float("0.5") == 0.5 and finite_float("-3") == -3.0
    for parse in (finite_float, positive_float, _temperature):
        for text in ("nan", "inf", "-Infinity", "abc", ""):
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)


def test_every_integer_flag_has_a_range_where_it_is_read():
    """Counts, sizes and limits parse with `positive_int` (or `non_negative_int` where 0 means something, or
    `seed_int`), never bare `int`: commands had each checked their own flags, and some let 0 or -2 through."""
    from diffusets_jax.cli import build_parser, non_negative_int, positive_int, seed_int

    typed = typed_flags(build_parser())
    assert not [(prog, action.dest) for prog, action in typed if action.type is int]
    assert len([a for _, a in typed if a.type is positive_int]) >= 40
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and seed_int("0") == 0
    for parse, text in ((positive_int, "0"), (positive_int, "-1"), (positive_int, "1.5"), (non_negative_int, "-1"),
                        (non_negative_int, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_every_argument_of_every_command_has_help():
    """`demo --seed`, `evaluate --sampler` and `turing-kit --variant` had none: --help listed them with nothing to
    say what they seed, replace or choose."""
    from diffusets_jax.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    silent = [(name, action.option_strings or action.dest) for name, command in commands.choices.items()
              for action in command._actions if not action.help and not isinstance(action, argparse._HelpAction)]
    assert silent == []


def test_every_commands_help_renders():
    """argparse %-formats argument help but not descriptions: a '%%' written into a description reached the
    reader as '95%%'. Every command's --help is rendered here, which also catches a bad '%' in an argument's help."""
    from diffusets_jax.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(commands.choices) >= 15
    for name, command in commands.choices.items():
        text = command.format_help()
        assert "%%" not in text and "%(" not in text, name


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    return exit_code(argv), capsys.readouterr().err


def assert_one_line(err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert lines[0].startswith("diffusets-jax "), lines[0]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, capsys, monkeypatch, argv, expected):
    monkeypatch.delenv("DIFFUSETS_TEST_NO_SUCH_KEY", raising=False)
    before = snapshot(world)
    code, err = run_cli([a.replace("{w}", str(world)) for a in argv], capsys)
    assert code == 2, err
    assert_one_line(err, expected.replace("{w}", str(world)))
    assert snapshot(world) == before  # nothing changed, nothing added (not even a lock file or an empty folder)


def test_a_second_run_into_a_busy_folder_is_refused(world, tmp_path, capsys):
    from diffusets_jax.io.run_dir import exclusive_lock

    out = tmp_path / "busy"
    out.mkdir()
    with exclusive_lock(out, "held by this test"):  # what a running command holds
        code, err = run_cli(["plot", RECORD, "--out-dir", str(out)], capsys)
    assert code == 2
    assert_one_line(err, "another diffusets-jax run is writing there now")
    assert not list(out.glob("*.png"))


def test_plot_reports_each_skipped_record_on_stderr_and_reruns_into_its_own_folder(world, tmp_path, capsys):
    out = tmp_path / "plots"
    args = ["plot", RECORD, str(world / "nope"), "--out-dir", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert_one_line(captured.err, f"skipped {world / 'nope'}: {world / 'nope.hea'} does not exist")
    assert json.loads(captured.out)["written"] == 1 and (out / "00001_lr.png").is_file()
    assert main(args) == 0  # the same command again: its own folder, redrawn
    capsys.readouterr()
    assert main(["plot", RECORD, "--out-dir", str(out), "--dpi", "100", "--overwrite"]) == 0  # replaced whole
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["00001_lr.png"]


def test_run_failures_are_one_line_exit_1_and_preemption_exits_75(world, monkeypatch, capsys):
    from diffusets_jax.train import loop, run

    def nan_loss(*args, **kwargs):
        raise loop.NonFiniteLossError("loss is nan at step 6; stopped without saving it, the last good checkpoint "
                                      "is step 4 in W. Lower optimizer.learning_rate")

    monkeypatch.setattr(run, "run_training", nan_loss)
    code, err = run_cli([*TRAIN_VAE, "--workdir", str(world / "new")], capsys)
    assert code == 1
    assert_one_line(err, "loss is nan at step 6")

    monkeypatch.setattr(run, "run_training", lambda *a, **k: loop.TrainResult(state=None, step=7, preempted=True))
    code, err = run_cli([*TRAIN_VAE, "--workdir", str(world / "new")], capsys)
    assert code == 75
    assert_one_line(err, "preempted (SIGTERM) at step 7, checkpoint saved; rerun the same command to resume")


@pytest.mark.parametrize("error", ["xla", "host"])
def test_running_out_of_memory_is_one_line_exit_1_saying_to_run_smaller(world, monkeypatch, capsys, error):
    import jax

    from diffusets_jax.train import run

    def out_of_memory(*args, **kwargs):
        if error == "xla":
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 61531218206912 bytes.")
        raise MemoryError

    monkeypatch.setattr(run, "run_training", out_of_memory)
    code, err = run_cli([*TRAIN_VAE, "--workdir", str(world / "new")], capsys)
    assert code == 1
    assert_one_line(err, "error: out of memory (")
    assert "train.global_batch_size or more train.grad_accum_steps" in err

    def bug(*args, **kwargs):  # any other runtime error is a bug: its traceback stays
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(run, "run_training", bug)
    with pytest.raises(jax.errors.JaxRuntimeError):
        run_cli([*TRAIN_VAE, "--workdir", str(world / "new")], capsys)


@pytest.mark.parametrize("error", [
    # a collective of a multi-host run timed out: another process stopped or never came
    "timed out",
    # gloo (CPU) saw the other process leave: a ValueError, which read as a bad input (exit 2) with gloo's words
    "peer closed",
])
def test_another_host_not_answering_is_one_line_exit_1_pointing_at_its_own_error(world, monkeypatch, capsys, error):
    import jax

    from diffusets_jax.train import run

    def lost(*args, **kwargs):
        if error == "peer closed":
            raise ValueError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
                             "Connection closed by peer [127.0.0.1]:3487")
        raise jax.errors.JaxRuntimeError("UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED: "
                                         "GetKeyValue() timed out with key: cpu:gloo/0,2048/1")

    monkeypatch.setattr(run, "run_training", lost)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    code, err = run_cli([*TRAIN_VAE, "--workdir", str(world / "new")], capsys)
    assert code == 1
    assert_one_line(err, "error: process 0 of 2 stopped: another process of this multi-host run did not answer in time")
    assert "its own error line says why" in err


def test_a_one_process_command_on_a_second_host_is_one_line(tmp_path, monkeypatch, capsys):
    """`encode` started on two hosts of a multi-host job: each did the whole work into the same folder, and the
    second was refused as "another diffusets-jax run is writing there now". Process 0 runs it as usual."""
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    args = ["plot", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "plots")]
    code, err = run_cli(args, capsys)
    assert code == 2
    assert_one_line(err, "plot runs as one process, not on several hosts (this is JAX_PROCESS_ID=1 of "
                         "JAX_NUM_PROCESSES=2): run it on one host")
    assert not (tmp_path / "plots").exists()
    monkeypatch.setenv("JAX_PROCESS_ID", "0")  # process 0's host: the command's own checks
    code, err = run_cli(args, capsys)
    assert code == 2 and "one process" not in err and "missing" in err, err


def test_exit_codes_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code in ("0 done", "1 the run could not finish", "2 bad input", "75 preempted", "130 interrupted",
                 "143 stopped by SIGTERM"):
        assert code in text


def test_progress_bars_write_a_few_lines_a_minute_to_a_log_file(monkeypatch):
    from diffusets_jax.io import progress

    log = io.StringIO()  # not a terminal, like a cluster job's log file
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress.progress_bar(5000, desc="decode", unit="record")
    began = time.monotonic()
    for _ in range(5000):
        bar.update(1)
        bar.set_postfix(n=1, refresh=False)
    bar.close()
    assert time.monotonic() - began < progress.LOG_INTERVAL_S  # the loop was fast: only start and end are drawn
    redraws = log.getvalue().count("\r") + log.getvalue().count("\n")
    assert 1 <= redraws <= 4, log.getvalue()
    assert "5000/5000" in log.getvalue()


# ------------------------------------------------------------------------------------------------------------
# Cases that need a model, a dataset or a subprocess.


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.helpers.tiny_models import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("model") / "model")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", OPENAI_API_KEY="sk-test",
               OPENAI_BASE_URL="http://127.0.0.1:9")
    return env


@pytest.mark.slow
def test_a_damaged_model_is_one_line_without_tensorstore_echoes(tiny_model, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model, damaged)
    for data in (damaged / "unet" / "variables").rglob("d/*"):  # every data file of the U-Net's weights
        data.write_bytes(data.read_bytes()[:20])
    (tmp_path / "cond.csv").write_text("text,sex,age,hr\nSinus rhythm,M,50,70\n")
    before = snapshot(tmp_path)
    # A subprocess: the echoes of a failed restore are printed late (at garbage collection, at exit).
    proc = subprocess.run([sys.executable, "-m", "diffusets_jax.cli", "sample", "--model-dir", str(damaged),
                           "--conditions", str(tmp_path / "cond.csv"), "--out", str(tmp_path / "out")],
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("diffusets-jax")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"model {damaged / 'unet'}: its weights" in errors[0] and "damaged or incomplete" in errors[0]
    for echo in ("Traceback", "never retrieved", "Event loop is closed", "OUT_OF_RANGE", "FAILED_PRECONDITION: Error"):
        assert echo not in proc.stderr.replace(errors[0], ""), proc.stderr[-3000:]
    assert snapshot(tmp_path) == before


def test_a_bad_input_is_the_only_line_on_stderr_even_when_tensorflow_loads(tmp_path):
    """As a user runs it (no TF_CPP_MIN_LOG_LEVEL of their own): TensorFlow's C++ start-up notices and TFDS's absl
    warnings used to surround the one line."""
    env = _env()
    for key in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
        env.pop(key, None)
    for dataset, expected in ((str(tmp_path / "nope"), "does not exist"),
                              ("ptbxl", "is not prepared under")):  # TFDS warns of the empty variant folder
        proc = subprocess.run([sys.executable, "-m", "diffusets_jax", "evaluate", "--model-dir", str(tmp_path / "m"),
                               "--dataset", dataset, "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")],
                              env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2
        assert_one_line(proc.stderr, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # three training runs, each compiling the step for 8 devices
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, caplog):
    from diffusets_jax import parallel
    from diffusets_jax.train import loop
    from tests.helpers.train_helpers import batches_from, tiny_config, tiny_task

    mesh = parallel.make_mesh(8, 1)
    loop.train(tiny_task(), tiny_config(num_steps=8, checkpoint_every=4), tmp_path, batches_from(16), None, mesh=mesh)
    checkpoints = tmp_path / "checkpoints"
    for data in (checkpoints / "8").rglob("d/*"):
        data.write_bytes(b"")  # the newest checkpoint lost its data (a full disk, a half-copied folder)
    # A reader (`train --export-only`, maybe beside the training that owns the folder) falls back the same way but
    # renames nothing: the folder is the training's.
    manager = loop.checkpoint_manager(checkpoints, 5, async_save=False)
    abstract, _ = loop.abstract_state(tiny_task(), mesh, 0, False)
    with caplog.at_level("WARNING"):
        assert loop.restore_latest(manager, abstract, set_aside=False)[2] == 4
    manager.close()
    assert "step(s) 8 left as they are" in caplog.text
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4", "8"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        result = loop.train(tiny_task(), tiny_config(num_steps=12, checkpoint_every=4), tmp_path, batches_from(16),
                            None, mesh=mesh)
    assert "checkpoint step 8" in caplog.text and "cannot be read" in caplog.text
    assert "resuming from step 4" in caplog.text
    assert result.step == 12 and not result.preempted
    assert (checkpoints / "unreadable-8").is_dir()  # kept, not deleted, and out of Orbax's way
    assert (checkpoints / "8").is_dir() and (checkpoints / "12").is_dir()  # step 8 saved again, then 12

    # Every checkpoint unreadable: one line saying what to do, nothing trained over them.
    for step in ("4", "8", "12"):
        for data in (checkpoints / step).rglob("d/*"):
            data.write_bytes(b"")
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be read \(step 12: .*step 4: .*move it away"):
        loop.train(tiny_task(), tiny_config(num_steps=16), tmp_path, batches_from(16), None, mesh=mesh)


SIGTERM_CHILD = """
import os, signal, sys, time
from pathlib import Path
sys.argv = ["diffusets-jax"] + sys.argv[1:]
from diffusets_jax import cli
from diffusets_jax.train import loop, run
from tests.helpers.train_helpers import batch_at, tiny_config, tiny_task

def run_training(model, config, workdir, model_dir=None, overwrite=False):  # the real loop on a tiny task
    def batches(start):
        for step in range(start, 10**6):
            if step == 3:
                Path(workdir, "ready").write_text("3")  # the parent sends SIGTERM now
                while not Path(workdir, "sent").exists():
                    time.sleep(0.05)
            yield batch_at(step, 16)
    return loop.train(tiny_task(), tiny_config(num_steps=1000, checkpoint_every=500), workdir, batches)

run.run_training = run_training
sys.exit(cli.main())
"""


@pytest.mark.slow
def test_sigterm_saves_and_exits_75_for_the_scheduler(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, *TRAIN_VAE, "--workdir", str(workdir)],
                            env=_env(), stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 300
    while not (workdir / "ready").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the child never reached step 3"
        time.sleep(0.2)
    proc.send_signal(15)
    (workdir / "sent").write_text("")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "preempted (SIGTERM) at step 4, checkpoint saved; rerun the same command to resume" in err
    assert "Traceback" not in err
    assert (workdir / "checkpoints" / "4").is_dir()


SIGTERM_PLOT_CHILD = """
import sys, time
from pathlib import Path
sys.argv = ["diffusets-jax"] + sys.argv[1:]
from diffusets_jax import cli
from diffusets_jax.io import files, plot

def draw_slowly(record, name, path, dpi):  # half a PNG written under its temporary name, then the kill
    with files.atomic_path(path) as temporary:
        temporary.write_bytes(b"half a PNG")
        Path(path).with_name("ready").write_text("")
        time.sleep(120)

plot._draw_record = draw_slowly
sys.exit(cli.main())
"""


@pytest.mark.slow
def test_sigterm_outside_a_training_is_one_line_and_leaves_nothing_behind(tmp_path, capsys):
    """A plain SIGTERM (`kill`, a scheduler's cancel) to a command other than a training ended it at once with no
    word (exit 143), its temporary file left beside its outputs. It now unwinds as Ctrl-C does: one line saying
    what to do, exit 143, no temporary, no folder it made left empty; the rerun draws the plot."""
    out = tmp_path / "plots"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_PLOT_CHILD, "plot", RECORD, "--out-dir", str(out)],
                            env=_env(), stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    while not (out / "ready").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the child never started drawing"
        time.sleep(0.1)
    (out / "ready").unlink()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines() == ["diffusets-jax plot: stopped by SIGTERM before it finished; rerun the same "
                                        "command to resume (what it finished is kept, its temporary files are "
                                        "removed)"]
    assert not out.exists()  # it had written nothing but its run record: no folder, no temporary
    assert main(["plot", RECORD, "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".diffusets-run")) == ["00001_lr.png"]


@pytest.mark.slow
def test_sample_refuses_a_rerun_with_other_settings_and_leaves_both_runs_apart(tiny_model, tmp_path, capsys,
                                                                                monkeypatch):
    from tests.helpers.fake_openai_server import FakeOpenAIServer
    from tests.helpers.tiny_models import TEXT_DIM

    with FakeOpenAIServer(dim=TEXT_DIM) as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        args = ["sample", "--model-dir", str(tiny_model), "--text", "Sinus rhythm", "--sex", "F", "--age", "40",
                "--hr", "60", "--steps", "2", "--batch-size", "8", "--embedder-base-url", server.base_url]
        folder_args = [*args, "--formats", "npz,wfdb"]  # a corpus has no formats to choose
        out = tmp_path / "out"
        assert main([*folder_args, "-n", "3", "--out", str(out)]) == 0
        capsys.readouterr()
        before = snapshot(tmp_path)
        for extra in (["-n", "2"], ["-n", "3", "--seed", "5"], ["-n", "3", "--sampler", "ddim"]):
            code, err = run_cli([*folder_args, *extra, "--out", str(out)], capsys)  # other conditions, seed, sampler
            assert code == 2
            assert_one_line(err, "with other settings")
            assert snapshot(tmp_path) == before
        corpus = tmp_path / "corpus"
        assert main([*args, "-n", "3", "--corpus", "--shard-size", "8", "--out", str(corpus)]) == 0
        capsys.readouterr()
        code, err = run_cli([*args, "-n", "3", "--corpus", "--shard-size", "16", "--out", str(corpus)], capsys)
        assert code == 2
        assert_one_line(err, "shard_size: 8 -> 16")
        # --corpus into a prepared dataset (a folder that is not ours): refused before any shard is written.
        dataset = tmp_path / "prepared"
        dataset.mkdir()
        (dataset / "dataset_info.json").write_text("{}")
        before = snapshot(dataset)
        code, err = run_cli([*args, "--corpus", "--out", str(dataset)], capsys)
        assert code == 2 and snapshot(dataset) == before


def test_sample_refuses_more_steps_than_the_models_schedule_before_loading_it_or_claiming_out(tiny_model, tmp_path,
                                                                                              capsys, monkeypatch):
    """The model's schedule has 1000 timesteps; `--steps 2000` is known wrong from its index alone. It used to be
    found only when the chain was traced: after the weights loaded and the output folder was claimed, which then
    refused the corrected command as "a sample run with other settings"."""
    from diffusets_jax.models import model_dir as model_dirs

    def no_weights(*_, **__):
        raise AssertionError("the weights were loaded before the sampler settings were checked")

    monkeypatch.setattr(model_dirs, "load_component", no_weights)
    before = snapshot(tmp_path)
    code, err = run_cli(["sample", "--model-dir", str(tiny_model), "--text", "Sinus rhythm", "--sex", "F", "--age",
                         "40", "--hr", "60", "--sampler", "ddim", "--steps", "2000", "--out", str(tmp_path / "out")],
                        capsys)
    assert code == 2
    assert_one_line(err, "steps 2000 (--steps) is more than this model's 1000-step schedule has: give --steps from 1 "
                         "to 1000")
    assert snapshot(tmp_path) == before


def test_sample_without_the_embedders_api_key_is_refused_before_claiming_out(tiny_model, tmp_path, capsys,
                                                                            monkeypatch):
    """The key was looked for only when the first prompts were embedded, after --out was claimed for the run's
    settings: the folder then held a run that had written nothing and refused a corrected command."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    before = snapshot(tmp_path)
    code, err = run_cli(["sample", "--model-dir", str(tiny_model), "--text", "Sinus rhythm", "--sex", "F", "--age",
                         "40", "--hr", "60", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert_one_line(err, "$OPENAI_API_KEY is not set: export the API key of the model's embedder")
    assert snapshot(tmp_path) == before


def test_sample_api_key_env_unset_does_not_send_the_openai_key(tiny_model, tmp_path, capsys, monkeypatch):
    """`--api-key-env MY_KEY` with MY_KEY unset fell back to $OPENAI_API_KEY (the client's default) and sent that key
    to the --embedder-base-url server, exit 0: --help says the key is read from the variable named. Now refused in
    one line naming it, before anything is sent or --out is claimed."""
    from tests.helpers.fake_openai_server import FakeOpenAIServer
    from tests.helpers.tiny_models import TEXT_DIM

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-not-for-this-server")
    monkeypatch.delenv("MY_SERVER_KEY", raising=False)
    before = snapshot(tmp_path)
    with FakeOpenAIServer(dim=TEXT_DIM) as server:
        code, err = run_cli(["sample", "--model-dir", str(tiny_model), "--text", "Sinus rhythm", "--sex", "F", "--age",
                             "40", "--hr", "60", "--steps", "2", "--formats", "npz", "--embedder-base-url",
                             server.base_url, "--api-key-env", "MY_SERVER_KEY", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert_one_line(err, "$MY_SERVER_KEY is not set: export the API key of the model's embedder")
    assert server.authorization == [] and server.received == []
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("corpus", [False, True], ids=["folder", "corpus"])
def test_sample_whose_key_the_server_refuses_leaves_no_folder(tiny_model, tmp_path, capsys, corpus):
    """A run that fails having written nothing removes the folder it claimed: `sample` had made its `.parts` folder,
    and the run's own embedding cache (kept for a resume) was made, before the server refused the first request."""
    from tests.helpers.fake_openai_server import fake_openai_env

    before = snapshot(tmp_path)
    with fake_openai_env(16, faults=["401"]):
        code, err = run_cli(["sample", "--model-dir", str(tiny_model), "--text", "Sinus rhythm", "--sex", "F", "--age",
                             "40", "--hr", "60", "--out", str(tmp_path / "out"), *(["--corpus"] if corpus else [])],
                            capsys)
    assert code == 2
    assert_one_line(err, "Incorrect API key provided")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_evaluate_checks_its_dataset_split_and_clip_before_generating(tiny_model, tmp_path, capsys):
    from tests.helpers import tiny_ecg_dataset

    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    capsys.readouterr()
    before = snapshot(tmp_path)
    base = ["evaluate", "--model-dir", str(tiny_model), "--dataset", str(builder.data_dir), "--out",
            str(tmp_path / "report")]
    code, err = run_cli([*base, "--split", "nope"], capsys)
    assert code == 2
    assert_one_line(err, "--split nope: dataset")
    code, err = run_cli([*base, "--clip", str(tmp_path / "no_such_models")], capsys)
    assert code == 2
    assert_one_line(err, "no such model directory")
    code, err = run_cli(["train", "unet", "--config", str(CONFIGS / "demo_unet.py"), "--workdir",
                         str(tmp_path / "unet"), f"--config.data.dataset={builder.data_dir}"], capsys)
    assert code == 2
    assert_one_line(err, "run `diffusets-jax encode")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_prepare_recognises_its_source_refuses_another_and_recovers_from_kills(tmp_path, capsys):
    from diffusets_jax.data import sources

    embedder = HashEmbedder()
    clean = tmp_path / "ptbxl"
    shutil.copytree(ECG_DATA / "ptbxl", clean)
    # Another download: three unusable rows (not UTF-8, malformed, no integer ecg_id).
    damaged = tmp_path / "ptbxl_damaged"
    shutil.copytree(ECG_DATA / "ptbxl", damaged)
    table = damaged / "ptbxl_database.csv"
    lines = table.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"sinus", b"sinus \xe9", 1)
    lines[3] = lines[3].removesuffix(b"\r") + b",extra,fields\r"  # the table has CRLF line ends
    lines[4] = b"abc" + lines[4][lines[4].index(b","):]
    table.write_bytes(b"\n".join(lines))
    data = tmp_path / "data"
    options = dict(workers=0, embedder=embedder, embedding_cache_path=str(tmp_path / "emb.sqlite"))

    first = sources.prepare("ptbxl", str(clean), str(data), **options)
    dataset = Path(sources.make_builder("ptbxl", str(data)).data_dir)
    card = json.loads((dataset / "diffusets_dataset.json").read_text())
    assert card["derived_from"]["manual_dir"] == str(clean) and card["derived_from"]["records"] == 40

    # The same records in another folder: recognised as complete, nothing rebuilt.
    moved = tmp_path / "moved"
    shutil.copytree(clean, moved)
    before = snapshot(data)
    assert sources.prepare("ptbxl", str(moved), str(data), **options) == first
    assert snapshot(data) == before

    # Another download into the complete dataset: one line, exit 2, the dataset untouched.
    capsys.readouterr()
    code, err = run_cli(["prepare", "ptbxl", "--manual-dir", str(damaged), "--data-dir", str(data)], capsys)
    assert code == 2
    assert_one_line(err, f"built from {clean} (40 records")
    assert "--overwrite" in err and snapshot(data) == before

    # --overwrite rebuilds from it; its bad rows are skipped and counted with their file and line.
    second = sources.prepare("ptbxl", str(damaged), str(data), overwrite=True, **options)
    assert second["skipped_by_reason"]["bad_table_row"] == 3
    where = {e["record_path"]: e["detail"] for e in second["skipped_examples"]["bad_table_row"]}
    assert where[f"{table} line 3"] == "not UTF-8 text"
    assert where[f"{table} line 4"].startswith("malformed CSV line")
    assert where[f"{table} line 5"] == "ecg_id 'abc' is not an integer"
    assert second["records_listed"] == first["records_listed"] - 3
    assert not [p for p in dataset.parent.iterdir() if ".replaced-" in p.name]

    # A killed prepare: TFDS's temporary folders are named, never removed (a `tfds build` running now leaves the
    # same kind); a truncated decode-cache chunk is decoded again.
    shutil.rmtree(dataset)  # (this test's own dataset: stands for one that was never finished)
    stale = dataset.parent / f"incomplete.ABC123_{dataset.name}"
    other = dataset.parent / "incomplete.XYZ789_0.9.0"
    for folder in (stale, other):
        folder.mkdir()
        (folder / "ptbxl-train.tfrecord-00000-of-00001").write_bytes(b"torn")
    for chunk in (data / "downloads" / "decode_cache").rglob("*.npz"):
        chunk.write_bytes(chunk.read_bytes()[:100])
    stale_before = snapshot(stale)
    capsys.readouterr()
    third = sources.prepare("ptbxl", str(damaged), str(data), **options)
    assert third["examples_written"] == second["examples_written"]
    assert third["decode_chunks"]["decoded"] == third["decode_chunks"]["total"] > 0  # decoded again, not a crash
    assert snapshot(stale) == stale_before and other.is_dir()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(stale) in notes[0] and "left as it is" in notes[0]


def test_concurrent_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    from diffusets_jax.io.files import atomic_path

    target = tmp_path / "synthetic_ecg-train.tfrecord-00003-of-00015"
    with atomic_path(target) as first, atomic_path(target) as second:  # two runs writing the same shard at once
        assert first != second and first.parent == second.parent == tmp_path
        first.write_bytes(b"run one, complete")
        second.write_bytes(b"run two, complete")
        assert not target.exists()  # nothing under the real name until a writer is done
    assert target.read_bytes() in (b"run one, complete", b"run two, complete")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left behind


def test_sample_api_key_env_for_a_local_embedder_is_refused(tmp_path, capsys, monkeypatch):
    """`--api-key-env MY_KEY` with a model directory whose embedder is the local sentence encoder was ignored, exit 0:
    the flag does nothing there (and a user who gives it likely means another model). Refused in one line naming
    the embedder, before --out is claimed."""
    from diffusets_jax.conditioning.embedders import LOCAL_DEFAULT_MODEL
    from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
    from diffusets_jax.diffusion.schedule import DiffusionSpec
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import tiny_vae_unet

    vae, vae_vars, unet, unet_vars = tiny_vae_unet(384)  # MiniLM's width
    local = tmp_path / "local_model"
    model_dirs.write_component(local, "vae", vae, vae_vars, provenance={"source": "test"})
    conditioning = ConditioningSpec(EmbedderSpec.from_embedder_config("local", {}, 384), "ordered", "normalised")
    model_dirs.write_component(local, "unet", unet, unet_vars, provenance={"source": "test"}, conditioning=conditioning,
                               diffusion=DiffusionSpec(), vae_uid=model_dirs.read_index(local).components["vae"]["uid"])
    monkeypatch.setenv("MY_KEY", "sk-unused")
    before = snapshot(tmp_path)
    code, err = run_cli(["sample", "--model-dir", str(local), "--text", "Sinus rhythm", "--sex", "F", "--age", "40",
                         "--hr", "60", "--steps", "2", "--formats", "npz", "--api-key-env", "MY_KEY", "--out",
                         str(tmp_path / "out")], capsys)
    assert code == 2
    assert_one_line(err, f"--api-key-env MY_KEY: this model's embedder is the local sentence encoder "
                         f"({LOCAL_DEFAULT_MODEL}), which runs here and needs no API key: drop it")
    assert snapshot(tmp_path) == before
