"""Generation: conditions in, ECGs out (NPZ, WFDB, PNG, manifest), TFRecord corpora, and the `sample` command."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import wfdb

from diffusets_jax import generate
from diffusets_jax.cli import main
from diffusets_jax.diffusion.samplers import sample
from diffusets_jax.diffusion.schedule import make_schedule
from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.generate import ECGGenerator, GenerationMeta, make_condition, read_conditions
from diffusets_jax.models.bundle import save_model
from diffusets_jax.models.unet import UNet
from diffusets_jax.models.vae import VAE
from diffusets_jax.parallel import jit_run_once
from tests.helpers.fake_openai_server import FakeOpenAIServer

TEXT_DIM = 16


def tiny_model_dir(path, text_dim=TEXT_DIM, embedder="openai", patient_features="normalised"):
    """A small random VAE + U-Net in the bundle format, conditioned on `text_dim`-d embeddings."""
    vae = VAE(widths=(16, 16, 16), groups=4, num_res_blocks=1)
    unet = UNet(channels=(8, 16), down_attention_dims=(8, 16), bottleneck_attention_dim=16,
                up_attention_dims=(32, 16), num_heads=2, bottleneck_heads=2, text_dim=text_dim)
    key_vae, key_unet = jax.random.split(jax.random.PRNGKey(0))
    vae_vars = jit_run_once(vae.init, key_vae, np.zeros((1, 1024, 12), np.float32), jax.random.PRNGKey(1))
    ones = np.ones((1,), np.float32)
    unet_vars = jit_run_once(unet.init, key_unet, np.zeros((1, 128, 4), np.float32), np.zeros((1,), np.int32),
                          np.zeros((1, text_dim), np.float32), ones, ones, ones)
    save_model(path, "vae", vae, vae_vars)
    save_model(path, "unet", unet, unet_vars)
    GenerationMeta(embedder=embedder, embedder_options={"dim": text_dim} if embedder == "openai" else {},
                   patient_features=patient_features).save(path)
    return path


@pytest.fixture(scope="module")
def openai_env():
    """The model's embedder is the real OpenAI client, pointed at a local OpenAI-compatible server."""
    with FakeOpenAIServer(dim=TEXT_DIM) as server:
        old = {k: os.environ.get(k) for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
        os.environ.update(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url)
        yield server
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def test_make_condition_validates_and_builds_the_ordered_prompt():
    c = make_condition("Sinus rhythm|Left axis deviation", "m", "63", 71, 2)
    assert (c.sex, c.age, c.heart_rate, c.count) == (1, 63.0, 71.0, 2)
    assert c.prompt == ("Most importantly, the 1st diagnosis is {Sinus rhythm}."
                        "As a supplementary condition, the 2nd diagnosis is {Left axis deviation}.")
    with pytest.raises(ValueError, match="flags: .*heart_rate"):
        make_condition("Sinus rhythm", "F", 50, 900, where="flags")
    with pytest.raises(ValueError, match="count"):
        make_condition("Sinus rhythm", "F", 50, 60, 0)


def test_read_conditions_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("text,sex,age,hr,count\nSinus rhythm,F,40,60,3\nAtrial fibrillation|Low QRS voltages,male,80,110,\n")
    conditions = read_conditions(csv_path)
    assert [c.count for c in conditions] == [3, 1]
    assert conditions[1].report == ("Atrial fibrillation", "Low QRS voltages")
    assert len(generate.expand(conditions)) == 4
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "Sinus bradycardia", "sex": 0, "age": 70, "heart_rate": 50, "n": 2}) + "\n")
    assert read_conditions(jsonl)[0].count == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("text,sex,age\nSinus rhythm,F,40\n")
    with pytest.raises(ValueError, match=r"bad.csv line 2: missing field 'heart_rate'"):
        read_conditions(bad)
    bad.write_text("text,sex,age,hr\nSinus rhythm,X,40,60\n")
    with pytest.raises(ValueError, match=r"bad.csv line 2: .*sex"):
        read_conditions(bad)


def test_ddpm_clips_x0_as_the_model_directs(model_dir, tmp_path):
    """sampler_config("ddpm") leaves clipping to the model: on for the published one, off for a model whose
    generation.json says its latents are not within [-1, 1]; an explicit choice always wins."""
    assert generate.sampler_config("ddpm").clip_sample is None
    assert generate.sampler_config("dpmpp_2m").clip_sample is False
    assert ECGGenerator(model_dir, generate.sampler_config("ddpm")).sampler.clip_sample is True
    unit_variance = tmp_path / "model"
    shutil.copytree(model_dir, unit_variance)
    meta = GenerationMeta.load(model_dir)
    dataclasses.replace(meta, latent_scale=1.07, clip_sample=False).save(unit_variance)
    assert ECGGenerator(unit_variance, generate.sampler_config("ddpm")).sampler.clip_sample is False
    assert ECGGenerator(unit_variance, generate.sampler_config("ddpm", clip_sample=True)).sampler.clip_sample is True
    with pytest.raises(ValueError, match="clip_sample is None"):
        sample(lambda x, t, c: x, make_schedule(), {"sex": np.zeros(2)}, jax.random.key(0),
               generate.sampler_config("ddpm", steps=2))


def test_generation_is_sharded_deterministic_and_padding_free(model_dir, openai_env):
    sampler = generate.sampler_config("dpmpp_2m", steps=3)
    gen = ECGGenerator(model_dir, sampler, batch_size=8, seed=3)
    assert gen.batch_size % jax.device_count() == 0
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 5), make_condition("Atrial fibrillation", "M", 80, 110, 6)]
    batches = list(gen.generate(conditions))
    ecgs = np.concatenate([e for _, _, e in batches])
    assert ecgs.shape == (11, 1024, 12) and np.isfinite(ecgs).all()
    assert [len(chunk) for _, chunk, _ in batches] == [8, 3]  # the last batch is padded inside, trimmed outside
    again = np.concatenate([e for _, _, e in ECGGenerator(model_dir, sampler, batch_size=8, seed=3).generate(conditions)])
    np.testing.assert_array_equal(ecgs, again)
    other = np.concatenate([e for _, _, e in ECGGenerator(model_dir, sampler, batch_size=8, seed=4).generate(conditions)])
    assert not np.allclose(ecgs, other)
    # Same condition, different noise within a batch: samples differ.
    assert not np.allclose(ecgs[0], ecgs[1])


def test_sample_command_writes_npz_wfdb_png_and_manifest(model_dir, openai_env, tmp_path):
    out = tmp_path / "out"
    code = main(["sample", "--model-dir", str(model_dir), "--out", str(out), "--text", "Sinus tachycardia|Abnormal ECG",
                 "--sex", "F", "--age", "37", "--hr", "110", "-n", "2", "--steps", "2", "--batch-size", "8",
                 "--wfdb-fs", "500"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 2 and not manifest["skipped"]
    with np.load(out / "samples.npz") as data:
        assert data["ecg"].shape == (2, 1024, 12)
        assert data["heart_rate"].tolist() == [110.0, 110.0]
        ecg0 = data["ecg"][0]
    record = wfdb.rdrecord(str(out / manifest["samples"][0]["wfdb"]))
    assert record.sig_name == list(STANDARD_LEADS) and record.fs == 500 and record.p_signal.shape == (5000, 12)
    assert any("Sinus tachycardia" in c for c in record.comments)
    # The 500 Hz record is the generated signal resampled: its 1024-sample FFT resampling is close to ecg0.
    from scipy.signal import resample

    back = resample(record.p_signal, 1024, axis=0)
    assert np.max(np.abs(back - ecg0)) < 0.01 + 0.05 * np.max(np.abs(ecg0))
    png = out / manifest["samples"][1]["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_command_errors_are_one_clear_line(model_dir, capsys, tmp_path):
    assert main(["sample", "--model-dir", str(model_dir), "--out", str(tmp_path), "--text", "x", "--sex", "F"]) == 2
    assert "missing --age, --hr" in capsys.readouterr().err
    assert main(["sample", "--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path), "--text", "x",
                 "--sex", "F", "--age", "3", "--hr", "60"]) == 2
    assert "generation.json" in capsys.readouterr().err


def test_corpus_is_resumable_and_reads_back_with_tfds(model_dir, openai_env, tmp_path):
    import tensorflow_datasets as tfds

    sampler = generate.sampler_config("ddim", steps=2)
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 10), make_condition("Sinus bradycardia", "M", 70, 48, 7)]
    out = tmp_path / "corpus"
    first = generate.write_corpus(ECGGenerator(model_dir, sampler, batch_size=8), conditions, out, shard_size=8,
                                  progress=False)
    assert first == {"examples": 17, "shards": 3, "written": 3, "skipped": 0}
    shards = sorted(p for p in out.iterdir() if ".tfrecord-" in p.name)
    before = {p.name: p.read_bytes() for p in shards}
    shards[1].unlink()  # a crash lost the middle shard
    second = generate.write_corpus(ECGGenerator(model_dir, sampler, batch_size=8), conditions, out, shard_size=8,
                                   progress=False)
    assert second["written"] == 1 and second["skipped"] == 2
    assert shards[1].read_bytes() == before[shards[1].name]  # regenerated identically
    builder = tfds.builder_from_directory(str(out))
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(examples) == 17
    assert {e["heart_rate_source"].decode() for e in examples} == {"condition"}
    assert examples[0]["ecg"].shape == (1024, 12) and examples[0]["text_embedding"].shape == (TEXT_DIM,)
    assert sorted(int(e["sex"]) for e in examples) == [0] * 10 + [1] * 7


@pytest.mark.slow
def test_sample_with_converted_reference_checkpoints(tmp_path, capsys):
    """The published architecture end to end: convert reference-filled .npz state dicts, then `sample`."""
    from tests.helpers.reference_weights import reference_state_dict, reference_vae_state_dict

    vae_sd = {f"{part}.{k}": v for part, sd in reference_vae_state_dict().items() for k, v in sd.items()}
    np.savez(tmp_path / "vae_model.npz", **vae_sd)
    np.savez(tmp_path / "unet_all.npz", **reference_state_dict("unet"))
    models = tmp_path / "models"
    assert main(["convert", "--vae", str(tmp_path / "vae_model.npz"), "--unet", str(tmp_path / "unet_all.npz"),
                 "--out", str(models)]) == 0
    meta = GenerationMeta.load(models)
    assert (meta.embedder, meta.patient_features) == ("openai", "faithful")  # ada-002, raw sex/age/HR
    out = tmp_path / "out"
    with FakeOpenAIServer(dim=1536) as server:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            assert main(["sample", "--model-dir", str(models), "--out", str(out), "--text", "Sinus rhythm",
                         "--sex", "M", "--age", "50", "--hr", "90", "-n", "2", "--steps", "2",
                         "--batch-size", "8"]) == 0
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    manifest = json.loads((out / "manifest.json").read_text())
    with np.load(out / "samples.npz") as data:
        ecgs = data["ecg"]
    assert ecgs.shape == (2, 1024, 12) and np.isfinite(ecgs).all()
    for entry, ecg in zip(manifest["samples"], ecgs, strict=True):
        record = wfdb.rdrecord(str(out / entry["wfdb"]))
        assert record.fs == 102.4 and record.sig_name == list(STANDARD_LEADS)
        np.testing.assert_allclose(record.p_signal, ecg, atol=1e-3)  # 16-bit quantisation at 1000 adu/mV
        assert (out / entry["png"]).stat().st_size > 10_000
