"""The library entry point: a model directory in, sharded deterministic ECGs out, conditioned as recorded."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from diffusets_jax.conditioning.requests import make_condition
from diffusets_jax.diffusion.samplers import sample, sampler_config
from diffusets_jax.diffusion.schedule import DiffusionSpec, make_schedule
from diffusets_jax.models import model_dir as model_dirs
from diffusets_jax.pipeline import ECGGenerator
from tests.helpers.fake_openai_server import fake_openai_env
from tests.helpers.tiny_models import (
    FAKE_EMBEDDER,
    TEXT_DIM,
    replace_vae_if_unlocked,
    tiny_model_dir,
    tiny_vae_unet,
)


def test_ddpm_clips_x0_as_the_model_directory_says(model_dir, tmp_path):
    """sampler_config("ddpm") leaves clipping to the model: on for the published diffusion, off for one whose
    latents are not within [-1, 1]; an explicit choice always wins."""
    assert sampler_config("ddpm").clip_sample is None
    assert sampler_config("dpmpp_2m").clip_sample is False
    assert ECGGenerator(model_dir, sampler_config("ddpm")).sampler.clip_sample is True
    unit_variance = tiny_model_dir(tmp_path / "model", diffusion=DiffusionSpec(latent_scale=1.07, scale_by_std=True,
                                                                               clip_sample=False))
    assert ECGGenerator(unit_variance, sampler_config("ddpm")).sampler.clip_sample is False
    assert ECGGenerator(unit_variance, sampler_config("ddpm", clip_sample=True)).sampler.clip_sample is True
    with pytest.raises(ValueError, match="clip_sample is None"):
        sample(lambda x, t, c: x, make_schedule(), {"sex": np.zeros(2)}, jax.random.key(0), sampler_config("ddpm", steps=2))


def test_generation_is_sharded_deterministic_and_padding_free(model_dir, openai_env):
    # `sample --steps 2 --batch-size 8`'s chain (tests/test_io_outputs.py, tests/test_cli_edges.py): compiled once.
    sampler = sampler_config("dpmpp_2m", steps=2)
    gen = ECGGenerator(model_dir, sampler, batch_size=8, seed=3)
    assert gen.batch_size % jax.device_count() == 0
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 5), make_condition("Atrial fibrillation", "M", 80, 110, 6)]
    batches = list(gen.generate(conditions))
    ecgs = np.concatenate([b.ecgs for b in batches])
    assert ecgs.shape == (11, 1024, 12) and np.isfinite(ecgs).all()
    assert [len(b.conditions) for b in batches] == [8, 3]  # the last batch is padded inside, trimmed outside
    assert [b.start for b in batches] == [0, 8]
    again = np.concatenate([b.ecgs for b in ECGGenerator(model_dir, sampler, batch_size=8, seed=3).generate(conditions)])
    np.testing.assert_array_equal(ecgs, again)
    other = np.concatenate([b.ecgs for b in ECGGenerator(model_dir, sampler, batch_size=8, seed=4).generate(conditions)])
    assert not np.allclose(ecgs, other)
    assert not np.allclose(ecgs[0], ecgs[1])  # same condition, different noise within a batch
    # A batch generated alone (a resumed run, another host) is the batch generated in sequence.
    alone = next(ECGGenerator(model_dir, sampler, batch_size=8, seed=3).generate(conditions, batches=[1]))
    np.testing.assert_array_equal(alone.ecgs, batches[1].ecgs)


def test_prompts_reach_the_recorded_embedder_in_the_recorded_style(model_dir, openai_env):
    openai_env.received.clear()
    openai_env.models.clear()
    gen = ECGGenerator(model_dir, sampler_config("ddim", steps=2), batch_size=8)
    list(gen.generate([make_condition("Sinus rhythm|Normal ECG", "F", 40, 60, 2)]))
    assert openai_env.models == [FAKE_EMBEDDER]
    assert openai_env.received == [["Most importantly, the 1st diagnosis is {Sinus rhythm}."
                                    "As a supplementary condition, the 2nd diagnosis is {Normal ECG}."]]


def test_reconstruct_names_ecgs_of_the_wrong_layout(model_dir):
    gen = ECGGenerator(model_dir, sampler_config("ddim", steps=2), batch_size=8)
    with pytest.raises(ValueError, match=r"reconstruct: ecgs has shape \(1024, 12\), expected \(n, 1024, 12\)"):
        gen.reconstruct(np.zeros((1024, 12)))
    with pytest.raises(ValueError, match=r"reconstruct: ecgs has shape \(2, 12, 1024\)"):
        gen.reconstruct(np.zeros((2, 12, 1024)))
    # A 10-second record at its recorded 500 Hz ran through the VAE (any multiple of 8 samples) unrefused.
    with pytest.raises(ValueError, match=r"reconstruct: ecgs has 5000 samples per record, expected 1024"):
        gen.reconstruct(np.zeros((2, 5000, 12)))


def test_prompt_embeddings_are_kept_once_per_distinct_prompt_however_many_ecgs(model_dir, openai_env):
    """A corpus of millions of ECGs from a few conditions held one vector per ECG (6 GB of host memory per million
    at the published 1536 dimensions): the table holds each distinct prompt once, ECGs point into it."""
    gen = ECGGenerator(model_dir, sampler_config("ddim", steps=2), batch_size=8)
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 100_000), make_condition("Sinus rhythm", "M", 70, 80, 3),
                  make_condition("Atrial fibrillation", "M", 80, 110, 5)]
    openai_env.received.clear()
    table, row = gen.prompt_embeddings(conditions)
    assert table.shape == (2, TEXT_DIM) and row.shape == (100_008,)  # two conditions share the first prompt
    assert sorted(len(request) for request in openai_env.received) == [2]  # each distinct prompt asked for once
    expected = gen.embed([gen.prompt(c) for c in conditions])
    np.testing.assert_array_equal(table[row[[0, 99_999, 100_000, 100_002, 100_003, 100_007]]], expected[[0, 0, 1, 1, 2, 2]])
    # Only the batches asked for are embedded (a resumed run): here the last one, eight ECGs of two conditions.
    openai_env.received.clear()
    table, row = gen.prompt_embeddings(conditions, batches=[100_007 // 8])
    assert len(table) == 2 and (row[:100_000] == -1).all() and (row[100_000:] >= 0).all()
    # A finished run resumed: nothing to ask for, and the embedder (a local model's weights) is not even loaded.
    fresh = ECGGenerator(model_dir, sampler_config("ddim", steps=2), batch_size=8)
    table, row = fresh.prompt_embeddings(conditions, batches=[])
    assert table.shape == (0, TEXT_DIM) and (row == -1).all() and fresh._embedder is None


def test_directories_whose_parts_do_not_fit_are_refused(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ECGGenerator(tmp_path / "absent")
    only_vae = tmp_path / "only_vae"
    vae, vae_vars, _, _ = tiny_vae_unet()
    model_dirs.write_component(only_vae, "vae", vae, vae_vars, provenance={})
    with pytest.raises(ValueError, match="has no unet .*train unet"):
        ECGGenerator(only_vae)
    # The VAE replaced after the U-Net was trained on the old one's latents.
    replaced = tmp_path / "replaced"
    shutil.copytree(model_dir, replaced)
    model_dirs.write_component(replaced, "vae", vae, vae_vars, provenance={}, overwrite=True)
    with pytest.raises(ValueError, match=r"trained on latents of VAE .*\(replaced since\)"):
        ECGGenerator(replaced)
    # An index whose embedder width disagrees with the U-Net's text input.
    wrong = tmp_path / "wrong"
    shutil.copytree(model_dir, wrong)
    index = json.loads((wrong / "model_index.json").read_text())
    index["conditioning"]["embedder"]["dim"] = 384
    (wrong / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="takes 16-d text embeddings but the recorded embedder"):
        ECGGenerator(wrong)
    (wrong / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_index.json line 1: not valid JSON"):
        ECGGenerator(wrong)


def test_a_module_written_with_its_own_compute_dtype_is_in_the_settings(model_dir, tmp_path):
    """A U-Net written from Python as `UNet(dtype=bfloat16)` computes in bf16 without compute_dtype: its settings (a
    run's fingerprint) said float32, so such a run resumed into, and mixed its ECGs with, a float32 one."""
    import jax.numpy as jnp

    float32 = ECGGenerator(model_dir).settings()
    assert "module_dtypes" not in float32 and "compute_dtype" not in float32
    bf16 = tmp_path / "bf16"
    shutil.copytree(model_dir, bf16)
    module, variables = model_dirs.load_component(bf16, "unet")
    index = model_dirs.read_index(bf16)
    model_dirs.write_component(bf16, "unet", module.clone(dtype=jnp.bfloat16), variables, provenance={},
                               conditioning=index.conditioning, diffusion=index.diffusion,
                               vae_uid=index.components["unet"]["vae_uid"], overwrite=True)
    settings = ECGGenerator(bf16).settings()
    assert settings["module_dtypes"] == {"unet": "bfloat16"}
    # a compute dtype given runs every network in it, whatever the modules say
    assert "module_dtypes" not in ECGGenerator(bf16, compute_dtype=jnp.bfloat16).settings()


def test_a_vae_replaced_while_the_generator_loads_is_not_paired_with_the_old_entry(model_dir, tmp_path, monkeypatch):
    """`train vae --overwrite` finishing into the directory while `sample` loads it: the generator decoded with the
    new VAE but recorded (and checked the U-Net against) the old VAE's uid. The writer now waits for the load."""
    directory = shutil.copytree(model_dir, tmp_path / "model")
    trained_on = model_dirs.read_index(directory).components["unet"]["vae_uid"]
    load = model_dirs.load_component
    replaced = []

    def load_while_another_writes(where, name):
        if name == "vae":
            replaced.append(replace_vae_if_unlocked(directory))
        return load(where, name)

    monkeypatch.setattr(model_dirs, "load_component", load_while_another_writes)
    gen = ECGGenerator(directory)
    assert replaced == [False]  # the writer had to wait for the load
    assert gen.settings()["components"]["vae"] == trained_on
    _, old_vars, _, _ = tiny_vae_unet()
    for loaded, old in zip(jax.tree.leaves(gen.vae_variables), jax.tree.leaves(old_vars), strict=True):
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(old))
    # Loaded, the generator holds no lock: the writer goes ahead, and the next load refuses the pair.
    monkeypatch.setattr(model_dirs, "load_component", load)
    assert replace_vae_if_unlocked(directory)
    with pytest.raises(ValueError, match=r"\(replaced since\)"):
        ECGGenerator(directory)


def test_a_directory_written_before_model_index_still_loads(model_dir, tmp_path, openai_env):
    """generation.json + vae/ + unet/ (the previous format) is read as the index it describes."""
    legacy = tmp_path / "legacy"
    for name in ("vae", "unet"):
        shutil.copytree(model_dir / name, legacy / name)
    (legacy / "generation.json").write_text(json.dumps({
        "embedder": "openai", "embedder_options": {"dim": TEXT_DIM, "model": FAKE_EMBEDDER},
        "patient_features": "normalised", "schedule": {}, "latent_scale": 0.18215, "clip_sample": True}))
    gen = ECGGenerator(legacy, sampler_config("ddim", steps=2), batch_size=8)
    assert gen.index.legacy and gen.conditioning.embedder.model == FAKE_EMBEDDER
    assert gen.conditioning.patient_features == "normalised"
    expected = next(ECGGenerator(model_dir, sampler_config("ddim", steps=2), batch_size=8).generate(
        [make_condition("Sinus rhythm", "F", 40, 60, 1)])).ecgs
    got = next(gen.generate([make_condition("Sinus rhythm", "F", 40, 60, 1)])).ecgs
    np.testing.assert_array_equal(got, expected)
    assert dataclasses.asdict(gen.diffusion.schedule) == dataclasses.asdict(DiffusionSpec().schedule)


@pytest.mark.slow
def test_sample_with_converted_reference_checkpoints(tmp_path):
    """The published architecture end to end: convert reference-filled .npz state dicts, then `sample`."""
    import wfdb

    from diffusets_jax.cli import main
    from diffusets_jax.ecg.leads import STANDARD_LEADS
    from tests.helpers.reference_weights import reference_state_dict, reference_vae_state_dict

    vae_sd = {f"{part}.{k}": v for part, sd in reference_vae_state_dict().items() for k, v in sd.items()}
    np.savez(tmp_path / "vae_model.npz", **vae_sd)
    np.savez(tmp_path / "unet_all.npz", **reference_state_dict("unet"))
    models = tmp_path / "models"
    assert main(["convert", "--vae", str(tmp_path / "vae_model.npz"), "--unet", str(tmp_path / "unet_all.npz"),
                 "--out", str(models)]) == 0
    index = model_dirs.read_index(models)
    embedder = index.conditioning.embedder
    assert (embedder.kind, embedder.model, embedder.dim) == ("openai", "text-embedding-ada-002", 1536)
    assert index.conditioning.patient_features == "faithful" and index.diffusion.clip_sample
    assert index.components["unet"]["vae_uid"] == index.components["vae"]["uid"]  # converted together: a pair
    assert index.sampling["latent_std_source"].startswith("assumed") and all(
        v["passed"] and v["latent_std"] == 0.18 for v in index.sampling["validated"])
    out = tmp_path / "out"
    with fake_openai_env(1536) as server:
        assert main(["sample", "--model-dir", str(models), "--out", str(out), "--text", "Sinus rhythm",
                     "--sex", "M", "--age", "50", "--hr", "90", "-n", "2", "--steps", "2", "--batch-size", "8"]) == 0
        assert server.models == ["text-embedding-ada-002"]
        assert server.received == [["Most importantly, the 1st diagnosis is {Sinus rhythm}."]]
    manifest = json.loads((out / "manifest.json").read_text())
    with np.load(out / "samples.npz") as data:
        ecgs = data["ecg"]
    assert ecgs.shape == (2, 1024, 12) and np.isfinite(ecgs).all()
    for entry, ecg in zip(manifest["samples"], ecgs, strict=True):
        record = wfdb.rdrecord(str(out / entry["wfdb"]))
        assert record.fs == 102.4 and record.sig_name == list(STANDARD_LEADS)
        np.testing.assert_allclose(record.p_signal, ecg, atol=1e-3)  # 16-bit quantisation at 1000 adu/mV
        assert (out / entry["png"]).stat().st_size > 10_000


def test_reconstructions_through_the_posterior_mean_or_one_draw_per_row(model_dir):
    """The paper protocol's references: decoder(z) of one posterior draw per record (the published latents are
    encoder samples), drawn by row, so an ECG's place in a batch does not matter; without a key, the mean."""
    from diffusets_jax.models.vae import VAE

    ecgs = np.random.default_rng(0).normal(0.0, 0.2, (3, 1024, 12)).astype(np.float32)
    gen = ECGGenerator(model_dir, batch_size=8)
    key, rows, scale = jax.random.PRNGKey(5), np.array([7, 2, 40]), gen.diffusion.latent_scale

    @jax.jit
    def expected(variables, ecg, keys):
        mean, logvar = gen.vae.apply(variables, ecg, method=VAE.encode)
        drawn = jax.vmap(lambda m, lv, k: VAE.sample_latent(m[None], lv[None], k, scale)[0])(mean, logvar, keys)
        decode = lambda z: gen.vae.apply(variables, z, latent_scale=scale, method=VAE.decode)
        return decode(drawn), decode(mean * scale)

    drawn, by_mean = expected(gen.vae_variables, ecgs, jax.vmap(lambda r: jax.random.fold_in(key, r))(rows))
    np.testing.assert_allclose(gen.reconstruct(ecgs, key=key, rows=rows), drawn, atol=1e-4)
    np.testing.assert_allclose(gen.reconstruct(ecgs[1:], key=key, rows=rows[1:]), drawn[1:], atol=1e-4)
    np.testing.assert_allclose(gen.reconstruct(ecgs), by_mean, atol=1e-4)
    assert not np.allclose(by_mean, drawn, atol=1e-3)
    # A typed key draws what the raw key of the same seed draws (it was a TypeError: no NumPy form).
    np.testing.assert_array_equal(gen.reconstruct(ecgs[:1], key=jax.random.key(5), rows=rows[:1]),
                                  gen.reconstruct(ecgs[:1], key=key, rows=rows[:1]))
    with pytest.raises(ValueError, match=r"reconstruct: rows has shape \(\), expected \(3,\)"):
        gen.reconstruct(ecgs, key=key, rows=7)


def test_a_sample_whose_embedding_server_keeps_failing_is_one_line_exit_1(model_dir, tmp_path, capsys, monkeypatch):
    """After its last retry the OpenAI client gives up with a message that says what to do: `sample` prints it as
    one line with exit 1 (a run that could not finish), as `embed` and `describe` do, not a traceback."""
    from diffusets_jax.cli import main
    from diffusets_jax.conditioning.embedders import OpenAIEmbedder

    monkeypatch.setitem(OpenAIEmbedder.__init__.__kwdefaults__, "sleep", lambda seconds: None)  # no backoff waits
    with fake_openai_env(TEXT_DIM, faults=["500"] * 9):  # the first request and its 8 retries
        code = main(["sample", "--model-dir", str(model_dir), "--out", str(tmp_path / "out"), "--text", "Sinus rhythm",
                     "--sex", "M", "--age", "50", "--hr", "90", "-n", "2", "--steps", "2", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("diffusets-jax sample: error: OpenAI embeddings request failed "
                                                   "after 9 attempts"), err


def test_batches_past_the_end_are_named(model_dir):
    """`generate(batches=[...])` of indices from another batch size was refused as "generate_batch takes 1..8
    conditions, got 0", naming neither the argument nor its range."""
    gen = ECGGenerator(model_dir, sampler_config("ddim", steps=2), batch_size=8)
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 10)]  # 2 batches of 8
    with pytest.raises(ValueError, match=r"batches \[2\] are outside 0..1: 10 ECGs make 2 batches of 8"):
        next(gen.generate(conditions, batches=[1, 2]))


def test_generate_batch_names_a_condition_field_without_its_batch_axis(model_dir):
    """One ECG's embedding `(text_dim,)` was padded to text_dim + batch_size - 1 rows and refused as a batch of that
    size; a scalar sex failed with a TypeError. Both are named before anything is padded or compiled."""
    gen = ECGGenerator(model_dir, sampler_config("ddim", steps=2), batch_size=8)
    one = {"text_embedding": np.zeros((1, TEXT_DIM), np.float32), "sex": np.zeros(1, np.float32),
           "age": np.zeros(1, np.float32), "heart_rate": np.zeros(1, np.float32)}
    unbatched = {**one, "text_embedding": one["text_embedding"][0]}
    with pytest.raises(ValueError, match=rf"generate_batch: cond: every field needs the same batch size .*"
                                         rf"\['text_embedding'\] {TEXT_DIM}"):
        gen.generate_batch(unbatched, 0)
    with pytest.raises(ValueError, match=r"generate_batch: cond\['sex'\] is a scalar"):
        gen.generate_batch({**one, "sex": np.float32(1.0)}, 0)


def test_generate_batch_names_missing_and_unknown_condition_fields(model_dir):
    """A missing field was a KeyError from inside the traced sampler; a misspelt one was dropped without a word."""
    gen = ECGGenerator(model_dir, sampler_config("ddim", steps=2), batch_size=8)
    one = {"text_embedding": np.zeros((1, TEXT_DIM), np.float32), "sex": np.zeros(1, np.float32),
           "age": np.zeros(1, np.float32), "heart_rate": np.zeros(1, np.float32)}
    no_rate = {k: v for k, v in one.items() if k != "heart_rate"}
    with pytest.raises(ValueError, match=r"generate_batch: cond has missing \['heart_rate'\]; unknown \['hr'\]: it "
                                         r"takes exactly the fields \['text_embedding', 'sex', 'age', 'heart_rate'\]"):
        gen.generate_batch({**no_rate, "hr": one["heart_rate"]}, 0)
    with pytest.raises(ValueError, match=r"generate_batch: cond has missing \['heart_rate'\]: it takes"):
        gen.generate_batch(no_rate, 0)
    with pytest.raises(ValueError, match=r"generate_batch: cond has unknown \['ecg'\]: it takes"):
        gen.generate_batch({**one, "ecg": np.zeros((1, 1024, 12), np.float32)}, 0)
