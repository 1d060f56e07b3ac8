"""The latent dataset: encode a prepared dataset, read it back through the input pipeline, resume, skip bad records."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, PartitionSpec

from diffusets_jax import parallel
from diffusets_jax.data import card as card_module
from diffusets_jax.data import latents, pipeline
from diffusets_jax.io.run_dir import fingerprint
from diffusets_jax.models.vae import VAE
from tests.helpers import tiny_ecg_dataset

NAN_INDEX = 5  # the test encoder returns a non-finite posterior for this example: it must be skipped


def toy_encoder(variables, ecg):
    """A deterministic stand-in encoder with the VAE's shapes: (batch, 1024, 12) -> 2 x (batch, 128, 4)."""
    pooled = ecg.reshape(ecg.shape[0], 128, 8, 12).mean(axis=2)[..., :4]
    mean = pooled * variables["scale"]
    logvar = -jnp.abs(mean) + variables["shift"]
    is_bad = (ecg[:, 0, 0] == NAN_INDEX)[:, None, None]
    return mean, jnp.where(is_bad, jnp.nan, logvar)


VARIABLES = {"scale": np.float32(2.0), "shift": np.float32(-1.0)}
TOY_VAE = {"model_dir": "/toy", "uid": "toy", "provenance": {}}  # what load_vae_encoder returns beside the encoder


def expected_posterior(index: int) -> tuple[np.ndarray, np.ndarray]:
    mean, logvar = toy_encoder(VARIABLES, tiny_ecg_dataset.example(index)["ecg"][None])
    return np.asarray(mean[0]), np.asarray(logvar[0])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_ecg_dataset.build(str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def encoded(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latents"))
    index = latents.encode_dataset(source, out, toy_encoder, VARIABLES, batch_size=8, examples_per_shard=20,
                                   vae=TOY_VAE)
    return out, index


def shard_mtimes(out: str) -> dict[str, int]:
    return {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if ".tfrecord-" in n}


def test_index_lists_shards_counts_and_skips(encoded):
    out, index = encoded
    with open(os.path.join(out, latents.INDEX_FILE)) as f:
        assert json.load(f) == index
    assert index["complete"] and index["vae"] == "toy" and index["embedding_dim"] == tiny_ecg_dataset.EMBEDDING_DIM
    train = index["splits"]["train"]
    assert len(train["shards"]) == 3  # 53 examples, 20 per shard
    assert [s["source"] for s in train["shards"]] == [[0, 20], [20, 40], [40, 53]]
    assert sum(s["num_examples"] for s in train["shards"]) == 51
    assert sum(s["skipped"] for s in train["shards"]) == 2  # a NaN in the ECG, a NaN posterior
    assert set(index["splits"]) == {"train", "validation", "test"}


def test_latent_examples_hold_the_posterior_and_conditions(encoded):
    out, _ = encoded
    builder = pipeline.load_builder(out)
    examples = list(builder.as_dataset("train", shuffle_files=False).as_numpy_iterator())
    assert sorted(int(e["study_id"]) for e in examples) == [
        i for i in range(53) if i not in (NAN_INDEX, tiny_ecg_dataset.NAN_ECG_INDEX)]
    for example in examples[:10]:
        index = int(example["study_id"])
        mean, logvar = expected_posterior(index)
        np.testing.assert_allclose(example["latent_mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(example["latent_logvar"], logvar, rtol=1e-5, atol=1e-6)
        src = tiny_ecg_dataset.example(index)
        assert example["prompt"].decode() == src["prompt"] and int(example["sex"]) == src["sex"]
        assert float(example["heart_rate"]) == src["heart_rate"]
        np.testing.assert_array_equal(example["text_embedding"], src["text_embedding"])
        assert int(example["subject_id"]) == src["subject_id"]


def test_pipeline_reads_latents_as_sharded_batches(encoded):
    out, _ = encoded
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    host = next(pipeline.train_dataset(pipeline.load_builder(out), "train", host_batch_size=16,
                                       fields=pipeline.LATENT_FIELDS, seed=0, shuffle_buffer=8).as_numpy_iterator())
    batch = parallel.shard_host_batch(host, mesh)
    assert batch["latent_mean"].shape == batch["latent_logvar"].shape == (16, 128, 4)
    assert batch["latent_mean"].sharding.spec == PartitionSpec(("data", "fsdp"))
    assert batch["text_embedding"].shape == (16, tiny_ecg_dataset.EMBEDDING_DIM)
    z = VAE.sample_latent(batch["latent_mean"], batch["latent_logvar"], jax.random.key(0))
    assert z.shape == (16, 128, 4) and bool(jnp.isfinite(z).all())


def test_measured_latent_scale_gives_unit_variance(encoded, source):
    out, _ = encoded
    # independently: the toy encoder's posterior means of the train examples that were kept
    kept = [i for i in range(tiny_ecg_dataset.SPLIT_SIZES["train"]) if i not in (NAN_INDEX, tiny_ecg_dataset.NAN_ECG_INDEX)]
    means = np.stack([expected_posterior(i)[0] for i in kept]).astype(np.float64)
    assert latents.measure_latent_scale(out, "train") == pytest.approx(1.0 / means.std(), rel=1e-5)
    # max_examples: the leading examples in stored order
    first = [int(e["study_id"]) for e in pipeline.load_builder(out).as_dataset("train[:3]", shuffle_files=False)
             .as_numpy_iterator()]
    few = np.stack([expected_posterior(i)[0] for i in first]).astype(np.float64)
    assert latents.measure_latent_scale(out, "train", max_examples=3) == pytest.approx(1.0 / few.std(), rel=1e-5)
    with pytest.raises(ValueError, match="no split 'nope'"):
        latents.measure_latent_scale(out, "nope")
    # `train unet` measures it before it holds the latents as read for its run: an `encode --overwrite` moving them
    # away then crashed the measurement mid-read.
    from diffusets_jax.io.run_dir import READERS_LOCK, exclusive_lock

    with exclusive_lock(out, "busy", name=READERS_LOCK), pytest.raises(ValueError, match="being replaced now"):
        latents.measure_latent_scale(out, "train")


def test_latent_scale_of_all_splits_or_a_sum_of_splits(encoded):
    """A U-Net trained on `all` (the published all-data recipe) measures its scale there at export: `all[:n]` is no
    TFDS split, and `train+validation[:n]` would have sliced the validation part alone."""
    out, _ = encoded
    builder = pipeline.load_builder(out)

    def scale_of(split: str, n: int) -> float:
        in_order = tfds.ReadConfig(interleave_cycle_length=1)  # the first n in stored order, file after file
        ids = [int(e["study_id"]) for e in
               builder.as_dataset(split, shuffle_files=False, read_config=in_order).take(n).as_numpy_iterator()]
        assert len(ids) == n
        return 1.0 / np.stack([expected_posterior(i)[0] for i in ids]).astype(np.float64).std()

    # A named split is measured on its first n in stored order (`train[:n]`) across its shards, as before `all`
    # was read: `take` on TFDS's interleave of 16 files would sample them instead.
    assert builder.info.splits["train"].num_examples > 30 and len(builder.info.splits["train"].filenames) > 1
    first = [int(e["study_id"]) for e in builder.as_dataset("train[:30]", shuffle_files=False).as_numpy_iterator()]
    assert sorted(first) == sorted(int(e["study_id"]) for e in builder.as_dataset(
        "train", shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)).take(30).as_numpy_iterator())
    assert latents.measure_latent_scale(out, "train", max_examples=30) == pytest.approx(scale_of("train", 30), rel=1e-5)
    everything = builder.info.splits["all"].num_examples
    assert latents.measure_latent_scale(out, "all") == pytest.approx(scale_of("all", everything), rel=1e-5)
    assert latents.measure_latent_scale(out, "train+validation", max_examples=60) == pytest.approx(
        scale_of("train+validation", 60), rel=1e-5)


def test_training_resolves_the_measured_scale_only_for_the_unet_with_scale_by_std(encoded):
    from pathlib import Path

    from diffusets_jax.config import load_config
    from diffusets_jax.train.run import resolve_from_dataset

    out, _ = encoded
    configs = Path(__file__).resolve().parents[1] / "configs"
    measured = latents.measure_latent_scale(out, "train")
    builder = pipeline.load_builder(out)
    demo = load_config(configs / "demo_unet.py", [f"data.dataset={out}"])  # scale_by_std=True
    resolve_from_dataset("unet", demo, builder)
    assert demo.diffusion.latent_scale == pytest.approx(measured)
    faithful = load_config(configs / "diffusets_unet.py", [f"data.dataset={out}"])
    resolve_from_dataset("unet", faithful, builder)
    assert faithful.diffusion.latent_scale == 0.18215
    other = load_config(configs / "demo_unet.py", [f"data.dataset={out}"])
    resolve_from_dataset("vae", other, builder)
    assert other.diffusion.latent_scale == 0.18215


def test_latent_examples_go_through_the_one_serializer_and_read_back_like_tfds_serialization():
    from diffusets_jax.data.shards import example_serializer

    features = latents.latent_features(6)
    rng = np.random.default_rng(0)
    example = {"latent_mean": rng.standard_normal((128, 4), np.float32),
               "latent_logvar": rng.standard_normal((128, 4), np.float32),
               "text_embedding": rng.standard_normal(6, np.float32), "sex": np.int32(1), "age": np.float32(71.5),
               "heart_rate": np.float32(88.25), "prompt": "Sinus rhythm|Left axis deviation",
               "subject_id": np.int64(2**40 + 3), "study_id": np.int64(7)}
    assert set(example) == set(features.keys())
    ours = features.deserialize_example(example_serializer(features)(example))
    reference = features.deserialize_example(features.serialize_example(example))
    assert set(ours) == set(reference)
    for key in reference:
        assert ours[key].dtype == reference[key].dtype
        np.testing.assert_array_equal(ours[key].numpy(), reference[key].numpy())


def test_rerun_skips_finished_shards_and_redoes_missing_ones(source, tmp_path):
    out = str(tmp_path)
    kwargs = {"batch_size": 8, "examples_per_shard": 20, "vae": TOY_VAE, "splits": ["train"]}
    latents.encode_dataset(source, out, toy_encoder, VARIABLES, **kwargs)
    before = shard_mtimes(out)
    latents.encode_dataset(source, out, toy_encoder, VARIABLES, **kwargs)
    assert shard_mtimes(out) == before  # nothing re-encoded

    victim = sorted(before)[1]
    # What a run killed while writing that shard (SIGKILL, an OOM kill) also left: its temporary file, which the
    # rerun removes once every shard is written.
    left = os.path.join(out, f".{victim}.tmp-4242-0123456789ab")
    with open(left, "wb") as f:
        f.write(b"half a shard")
    with open(os.path.join(out, victim), "rb") as f:
        original = f.read()
    os.remove(os.path.join(out, victim))
    latents.encode_dataset(source, out, toy_encoder, VARIABLES, **kwargs)
    after = shard_mtimes(out)
    assert {n for n in after if after[n] != before.get(n)} == {victim}
    assert not os.path.exists(left) and not [n for n in os.listdir(out) if ".tmp-" in n]
    with open(os.path.join(out, victim), "rb") as f:
        assert f.read() == original  # a shard always holds the same examples

    with pytest.raises(ValueError, match="other settings.*vae"):  # another VAE's latents never mix with these
        latents.encode_dataset(source, out, toy_encoder, VARIABLES, **{**kwargs, "vae": {**TOY_VAE, "uid": "other"}})


def test_a_source_rebuilt_in_place_is_not_resumed_into(source, tmp_path):
    """`prepare --overwrite` rebuilds a dataset under the same path and version; its card (records, embedder,
    build time) changes, and a half-done encoding of the old build must not be resumed with the new one."""
    rebuilt = tmp_path / "source"
    shutil.copytree(source.data_dir, rebuilt)
    kwargs = {"batch_size": 8, "examples_per_shard": 20, "vae": TOY_VAE, "splits": ["train"]}
    out = str(tmp_path / "latents")
    latents.encode_dataset(str(rebuilt), out, toy_encoder, VARIABLES, **kwargs)
    latents.encode_dataset(str(rebuilt), out, toy_encoder, VARIABLES, **kwargs)  # the same source: resumes
    card = rebuilt / "diffusets_dataset.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "created": "2027-01-01T00:00:00+00:00"}))
    with pytest.raises(ValueError, match="was encoded from another build of tiny_ecg .* prepared again since"):
        latents.encode_dataset(str(rebuilt), out, toy_encoder, VARIABLES, **kwargs)
    fresh = str(tmp_path / "latents_of_the_new_build")
    latents.encode_dataset(str(rebuilt), fresh, toy_encoder, VARIABLES, **kwargs)
    latents.encode_dataset(str(rebuilt), fresh, toy_encoder, VARIABLES, **kwargs)  # which then resumes


def test_a_source_without_a_card_rebuilt_in_place_is_not_resumed_into(source, tmp_path, monkeypatch):
    """A dataset prepared before cards existed gets a card made up from its config (`read_card`), the same after a
    rebuild; its identity is TFDS's record of the build (`card_fingerprint`). An index an earlier version wrote
    with the made-up card's fingerprint is still resumed once."""
    rebuilt = tmp_path / "source"
    shutil.copytree(source.data_dir, rebuilt)
    card = json.loads((rebuilt / "diffusets_dataset.json").read_text())
    (rebuilt / "diffusets_dataset.json").unlink()
    for module in (latents, card_module):  # what the legacy path makes up
        monkeypatch.setattr(module, "read_card", lambda builder: card)
    kwargs = {"batch_size": 8, "examples_per_shard": 20, "vae": TOY_VAE, "splits": ["train"]}
    out = tmp_path / "latents"
    latents.encode_dataset(str(rebuilt), str(out), toy_encoder, VARIABLES, **kwargs)
    index_path = out / latents.INDEX_FILE
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "source_card": fingerprint(card), "complete": False}))
    latents.encode_dataset(str(rebuilt), str(out), toy_encoder, VARIABLES, **kwargs)  # an earlier version's index
    assert json.loads(index_path.read_text())["source_card"] == index["source_card"]  # now the build's identity
    info = rebuilt / "dataset_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "description": "rebuilt"}))  # prepared again in place
    with pytest.raises(ValueError, match="was encoded from another build of tiny_ecg .* prepared again since"):
        latents.encode_dataset(str(rebuilt), str(out), toy_encoder, VARIABLES, **kwargs)


def test_encode_neither_replaces_latents_being_read_nor_reads_a_source_being_replaced(source, tmp_path):
    """A U-Net training reads its latents for days: `encode --overwrite` into them is refused while it does, and
    an encode does not start on a source a `prepare --overwrite` is replacing."""
    from diffusets_jax.io.run_dir import READERS_LOCK, add_readers_lock, exclusive_lock, reading

    kwargs = {"batch_size": 8, "examples_per_shard": 20, "vae": TOY_VAE, "splits": ["train"]}
    out = tmp_path / "latents"
    latents.encode_dataset(source, str(out), toy_encoder, VARIABLES, **kwargs)
    assert (out / READERS_LOCK).is_file()  # made by encode, for its readers
    before = shard_mtimes(str(out))
    with reading(out), pytest.raises(ValueError, match=r"^--overwrite: .* is being read by a run now"):
        latents.encode_dataset(source, str(out), toy_encoder, VARIABLES, **{**kwargs, "examples_per_shard": 10},
                               overwrite=True)
    assert shard_mtimes(str(out)) == before
    latents.encode_dataset(source, str(out), toy_encoder, VARIABLES, **{**kwargs, "examples_per_shard": 10}, overwrite=True)

    rebuilt = tmp_path / "source"
    shutil.copytree(source.data_dir, rebuilt)
    add_readers_lock(rebuilt)
    with exclusive_lock(rebuilt, "busy", name=READERS_LOCK), pytest.raises(ValueError, match="being replaced now"):
        latents.encode_dataset(str(rebuilt), str(tmp_path / "new"), toy_encoder, VARIABLES, **kwargs)
    assert not (tmp_path / "new").exists()


def test_the_vae_uid_recorded_is_that_of_the_weights_loaded(tmp_path, monkeypatch):
    """`encode --vae M` while `train vae --overwrite` finishes into M: the latents were encoded with the new VAE but
    recorded the old one's uid, which the U-Net trained on them then carried. The writer now waits for the load."""
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import replace_vae_if_unlocked, tiny_model_dir, tiny_vae_unet

    directory = tiny_model_dir(tmp_path / "model")
    load = model_dirs.load_component
    replaced = []

    def load_while_another_writes(where, name):
        replaced.append(replace_vae_if_unlocked(directory))
        return load(where, name)

    monkeypatch.setattr(model_dirs, "load_component", load_while_another_writes)
    _, variables, vae = latents.load_vae_encoder(directory)
    assert replaced == [False]
    _, old_vars, _, _ = tiny_vae_unet()
    for loaded, old in zip(jax.tree.leaves(variables), jax.tree.leaves(old_vars), strict=True):
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(old))
    assert vae["uid"] == model_dirs.read_index(directory).components["vae"]["uid"]


def test_bad_arguments_are_named(source, tmp_path):
    with pytest.raises(ValueError, match="multiple of the 8 local devices"):
        latents.encode_dataset(source, str(tmp_path), toy_encoder, VARIABLES, vae=TOY_VAE, batch_size=12)
    with pytest.raises(ValueError, match="positive multiple"):
        latents.encode_dataset(source, str(tmp_path), toy_encoder, VARIABLES, vae=TOY_VAE, batch_size=0)
    with pytest.raises(ValueError, match="no split"):
        latents.encode_dataset(source, str(tmp_path), toy_encoder, VARIABLES, vae=TOY_VAE, splits=["dev"])


@pytest.mark.slow  # compiles a small VAE encoder for 8 devices
def test_encode_command_end_to_end_matches_the_vae_encoder(source, tmp_path, capsys):
    from diffusets_jax.cli import main
    from diffusets_jax.data.card import read_card
    from diffusets_jax.models import model_dir as model_dirs

    vae = VAE(widths=(8, 8, 8), groups=4, num_res_blocks=1)
    variables = jax.jit(lambda key: vae.init(key, jnp.zeros((1, 1024, 12)), method=VAE.encode))(jax.random.key(1))
    model_dirs.write_component(tmp_path / "models", "vae", vae, variables, provenance={"source": "test"})
    data_dir = os.path.dirname(os.path.dirname(source.data_dir))
    argv = ["encode", "--vae", str(tmp_path / "models"), "--data-dir", data_dir, "--dataset", "tiny_ecg",
            "--out", str(tmp_path / "latents"), "--batch-size", "8", "--splits", "validation"]
    assert main(argv) == 0
    assert "validation: 13 latents in 1 shards, 0 bad records skipped" in capsys.readouterr().out
    # The stored posteriors are the VAE encoder's output for each source ECG.
    examples = list(pipeline.load_builder(tmp_path / "latents").as_dataset("validation", shuffle_files=False)
                    .as_numpy_iterator())
    assert len(examples) == 13
    ecg = np.stack([tiny_ecg_dataset.example(int(e["study_id"]))["ecg"] for e in examples])
    mean, logvar = jax.jit(lambda v, x: vae.apply(v, x, method=VAE.encode))(variables, ecg)
    np.testing.assert_allclose(np.stack([e["latent_mean"] for e in examples]), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.stack([e["latent_logvar"] for e in examples]), logvar, rtol=1e-4, atol=1e-5)
    # The latent dataset's card carries the source's conditioning and names the VAE that encoded it.
    card = read_card(tmp_path / "latents")
    assert card["kind"] == "latents" and card["conditioning"]["embedder"]["dim"] == tiny_ecg_dataset.EMBEDDING_DIM
    assert card["derived_from"]["vae"]["uid"] == model_dirs.read_index(tmp_path / "models").components["vae"]["uid"]
    assert main(["encode", "--vae", str(tmp_path / "nowhere"), *argv[3:]]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_a_vae_whose_latents_are_not_128_by_4_is_refused_before_encoding(tmp_path):
    """A VAE of four widths makes (64, 4) latents, which no latent dataset or U-Net takes: nothing refused it before
    the encoding started. Refused in one line when the VAE is loaded."""
    import jax

    from diffusets_jax.data.latents import load_vae_encoder
    from diffusets_jax.models import model_dir as model_dirs
    from diffusets_jax.models.vae import VAE

    vae = VAE(widths=(4, 4, 4, 4), groups=2, num_res_blocks=1)
    shapes = jax.eval_shape(vae.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1024, 12), "float32"),
                            jax.random.PRNGKey(1))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    model_dirs.write_component(tmp_path / "m", "vae", vae, variables, provenance={"source": "test"})
    with pytest.raises(ValueError, match=r"makes \(64, 4\) latents from \(1024, 12\) ECGs, and latent datasets and "
                                         r"U-Nets take \(128, 4\) ones: encode with a VAE of 3 widths"):
        load_vae_encoder(tmp_path / "m")
