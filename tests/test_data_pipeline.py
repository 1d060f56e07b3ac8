"""The input pipeline on 8 simulated CPU devices: host batches assembled into sharded global arrays, determinism,
resume, splitting."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh

from diffusets_jax import parallel
from diffusets_jax.data import pipeline
from tests.helpers import tiny_ecg_dataset

TRAIN_SIZE = tiny_ecg_dataset.SPLIT_SIZES["train"]


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return tiny_ecg_dataset.build(str(tmp_path_factory.mktemp("tfds")))


def ids(batch) -> list[int]:
    """Example indices of a batch (the tiny dataset stores each example's index in ecg[0, 0])."""
    return [int(v) for v in np.asarray(batch["ecg"])[:, 0, 0]]


def first_batches(dataset, n: int) -> list[list[int]]:
    return [ids(b) for b in dataset.take(n).as_numpy_iterator()]


def train_ids(builder, n, **kwargs) -> list[list[int]]:
    kwargs = {"host_batch_size": 8, "fields": pipeline.VAE_FIELDS, "seed": 0, "shuffle_buffer": 16, **kwargs}
    return first_batches(pipeline.train_dataset(builder, "train", **kwargs), n)


def test_tensorflow_sees_no_gpu():
    assert tf.config.get_visible_devices("GPU") == []


def test_each_epoch_is_a_fresh_permutation_of_the_split(builder):
    flat = sum(train_ids(builder, 14), [])  # 112 examples: two full epochs of 53 and a bit
    first, second = flat[:TRAIN_SIZE], flat[TRAIN_SIZE:2 * TRAIN_SIZE]
    assert sorted(first) == list(range(TRAIN_SIZE)) == sorted(second)
    assert first != second, "epochs must be reshuffled"
    assert first != sorted(first), "the order must be shuffled"


def test_same_seed_same_stream_different_seed_differs(builder):
    assert train_ids(builder, 10, seed=3) == train_ids(builder, 10, seed=3)
    assert train_ids(builder, 10, seed=3) != train_ids(builder, 10, seed=4)


@pytest.mark.parametrize("step", [1, 6, 7, 13, 20])  # 6 and 7 straddle the first epoch boundary (53 / 8)
def test_resume_at_step_continues_the_stream(builder, step):
    full = train_ids(builder, step + 4, seed=11)
    resumed = train_ids(builder, 4, seed=11, start_step=step)
    assert resumed == full[step:]


def test_all_is_the_union_of_the_splits_for_training(builder):
    """`split="all"`, the published all-data recipe the README names, and split expressions train like a split:
    `all` was refused as a split the dataset lacks."""
    total = sum(tiny_ecg_dataset.SPLIT_SIZES.values())
    everything = sorted(tiny_ecg_dataset.SPLIT_OFFSETS[s] + i
                        for s, n in tiny_ecg_dataset.SPLIT_SIZES.items() for i in range(n))
    stream = pipeline.train_dataset(builder, "all", host_batch_size=8, fields=pipeline.VAE_FIELDS, seed=2,
                                    shuffle_buffer=16)
    flat = sum(first_batches(stream, -(-total // 8)), [])
    assert sorted(flat[:total]) == everything  # one epoch: every example of every split once
    assert pipeline.split_examples(builder, pipeline.ALL_SPLITS) == total
    assert pipeline.split_examples(builder, "train+validation") == TRAIN_SIZE + tiny_ecg_dataset.SPLIT_SIZES[
        "validation"]
    assert pipeline.has_split(builder, "all") and not pipeline.has_split(builder, "dev")
    with pytest.raises(ValueError, match="no split 'dev'.*'all', their union"):
        pipeline.split_examples(builder, "dev")


def test_fields_select_what_is_parsed(builder):
    ds = pipeline.train_dataset(builder, "train", host_batch_size=4, fields=pipeline.DIFFUSION_FIELDS, seed=0)
    batch = next(ds.as_numpy_iterator())
    assert set(batch) == set(pipeline.DIFFUSION_FIELDS)
    assert batch["ecg"].shape == (4, 1024, 12) and batch["text_embedding"].shape == (4, 8)
    assert batch["sex"].dtype == np.int32 and batch["heart_rate"].dtype == np.float32
    expected = [tiny_ecg_dataset.example(i) for i in ids(batch)]
    np.testing.assert_array_equal(batch["heart_rate"], [e["heart_rate"] for e in expected])
    np.testing.assert_array_equal(batch["ecg"], np.stack([e["ecg"] for e in expected]))


def test_process_slices_are_disjoint_equal_and_cover_the_split(builder):
    count = 3
    train_slices = []
    for index in range(count):
        ds = pipeline.train_dataset(builder, "train", host_batch_size=1, fields=("study_id",), seed=0,
                                    process_index=index, process_count=count)
        per_host = TRAIN_SIZE // count
        train_slices.append({int(b["study_id"][0]) for b in ds.take(per_host).as_numpy_iterator()})
        assert len(train_slices[-1]) == per_host  # one epoch of the host slice, no repeats
    assert set.union(*train_slices) <= set(range(TRAIN_SIZE))
    assert sum(len(s) for s in train_slices) == len(set.union(*train_slices)) == TRAIN_SIZE - TRAIN_SIZE % count

    # Evaluation keeps every example; all processes yield the same number of batches.
    eval_ids, batch_counts = [], []
    for index in range(count):
        ds = pipeline.eval_dataset(builder, "validation", host_batch_size=2, fields=("study_id",),
                                   process_index=index, process_count=count)
        batches = list(ds.as_numpy_iterator())
        batch_counts.append(len(batches))
        eval_ids += [int(i) for b in batches for i in b["study_id"][b["mask"]]]
    assert len(set(batch_counts)) == 1
    assert sorted(eval_ids) == list(range(1000, 1000 + tiny_ecg_dataset.SPLIT_SIZES["validation"]))


@pytest.mark.parametrize("mesh_shape,axes", [((4, 2), ("data", "fsdp")), ((8,), ("data",))])
def test_host_batches_become_global_arrays_sharded_over_all_devices(builder, mesh_shape, axes):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), axes)
    host = next(pipeline.train_dataset(builder, "train", host_batch_size=16, fields=pipeline.CLIP_FIELDS, seed=5,
                                       shuffle_buffer=16).as_numpy_iterator())
    batch = parallel.shard_host_batch(host, mesh)
    ecg = batch["ecg"]
    assert isinstance(ecg, jax.Array) and ecg.shape == (16, 1024, 12)
    assert {s.device for s in ecg.addressable_shards} == set(jax.devices())
    assert all(s.data.shape == (2, 1024, 12) for s in ecg.addressable_shards)
    assert batch["text_embedding"].shape == (16, 8)
    np.testing.assert_array_equal(np.asarray(ecg), host["ecg"])  # the global batch is the host batch, unchanged


def test_eval_dataset_pads_the_tail_with_a_mask(builder):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    host = list(pipeline.eval_dataset(builder, "validation", host_batch_size=8,
                                      fields=("ecg", "study_id")).as_numpy_iterator())
    assert pipeline.eval_num_batches(builder, "validation", 8) == len(host) == 2  # 13 examples
    batches = [parallel.shard_host_batch(b, mesh) for b in host]
    mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
    assert mask.tolist() == [True] * 13 + [False] * 3
    study = np.concatenate([np.asarray(b["study_id"]) for b in batches])
    stored = [int(e["study_id"]) for e in builder.as_dataset("validation", shuffle_files=False).as_numpy_iterator()]
    assert study[:13].tolist() == stored  # the stored order, nothing dropped
    assert not np.asarray(batches[-1]["ecg"])[5:].any()  # padding is zeros


def test_clear_errors_for_bad_requests(builder):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    with pytest.raises(ValueError, match="multiple of 8"):
        pipeline.per_host_batch_size(12, process_count=1, batch_shards=parallel.num_batch_shards(mesh))
    with pytest.raises(ValueError, match="no field"):
        pipeline.train_dataset(builder, "train", host_batch_size=2, fields=("latent_mean",), seed=0)
    with pytest.raises(ValueError, match="no split"):
        pipeline.train_dataset(builder, "dev", host_batch_size=2, fields=("ecg",), seed=0)
    host = next(pipeline.train_dataset(builder, "train", host_batch_size=8, fields=("ecg", "prompt"),
                                       seed=0).as_numpy_iterator())
    with pytest.raises(ValueError, match="strings"):
        parallel.shard_host_batch(host, mesh)
    with pytest.raises(ValueError, match="split over 3 processes"):
        pipeline.per_host_batch_size(16, process_count=3)


def test_load_builder_by_name_directory_or_missing(builder, tmp_path):
    by_name = pipeline.load_builder("tiny_ecg", data_dir=os.path.dirname(os.path.dirname(builder.data_dir)))
    assert by_name.info.splits["train"].num_examples == TRAIN_SIZE
    by_dir = pipeline.load_builder(builder.data_dir)
    assert by_dir.info.splits["validation"].num_examples == tiny_ecg_dataset.SPLIT_SIZES["validation"]
    with pytest.raises(FileNotFoundError, match="no dataset 'absent_ecg'"):
        pipeline.load_builder("absent_ecg", data_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_assemble_one_global_batch(builder, tmp_path):
    """Two hosts x 4 devices: each feeds its own slice; the global batch is both slices, nothing shared."""
    from tests.helpers.two_processes import run_worker_pair

    data_dir = os.path.dirname(os.path.dirname(builder.data_dir))
    outs = [str(tmp_path / f"process{i}.json") for i in range(2)]
    run_worker_pair("pipeline_two_process_worker.py", lambda i: [data_dir, outs[i]], timeout=240)
    results = []
    for path in outs:
        with open(path) as f:
            results.append(json.load(f))
    for result in results:
        assert result["shape"] == [16, 1024, 12] and result["local_devices"] == 4
    assert results[0]["global"] == results[1]["global"]  # both see the same global array
    first = results[0]["global"][0]
    assert sorted(first) == sorted(results[0]["host"] + results[1]["host"])
    assert not set(results[0]["host"]) & set(results[1]["host"])
    # Over the first 48 examples no id repeats: the two process slices are disjoint.
    flat = sum(results[0]["global"], [])
    assert len(set(flat)) == len(flat) == 48
    validation = tiny_ecg_dataset.SPLIT_SIZES["validation"]
    assert sorted(results[0]["eval"]) == list(range(1000, 1000 + validation)) == sorted(results[1]["eval"])


def test_eval_dataset_keeps_text_fields_on_the_host(builder):
    batches = list(pipeline.eval_dataset(builder, "test", host_batch_size=4, fields=("prompt", "study_id"),
                                         process_index=0, process_count=1).as_numpy_iterator())
    prompts = np.concatenate([b["prompt"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    study = np.concatenate([b["study_id"] for b in batches])
    assert mask.sum() == tiny_ecg_dataset.SPLIT_SIZES["test"] and len(mask) == 12
    assert [p.decode() for p in prompts[mask]] == [tiny_ecg_dataset.example(int(i))["prompt"] for i in study[mask]]
    assert set(prompts[~mask]) == {b""}


def test_load_builder_refuses_a_data_dir_with_a_dataset_folder(builder, tmp_path):
    """`encode --dataset FOLDER --data-dir OTHER` read FOLDER and ignored --data-dir (even one that did not exist),
    though the user may have meant the dataset of that name under OTHER."""
    for data_dir in (tmp_path / "nope", os.path.dirname(os.path.dirname(builder.data_dir))):
        with pytest.raises(ValueError, match=r"--data-dir .* goes with a dataset name.*drop --data-dir"):
            pipeline.load_builder(builder.data_dir, data_dir=data_dir)
    with pytest.raises(ValueError, match="drop config.data.data_dir"):
        pipeline.load_builder(builder.data_dir, data_dir=tmp_path, data_dir_flag="config.data.data_dir")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a mistyped path is said to be one
        pipeline.load_builder(tmp_path / "absent", data_dir=tmp_path)


def test_a_wrong_dataset_path_is_told_the_layout_prepare_writes(tmp_path):
    """The message for a dataset path without dataset_info.json said to give DATA_DIR/NAME/VERSION; `prepare` writes
    DATA_DIR/NAME/CONFIG/VERSION (e.g. physionet_challenge/local/1.0.0), so a user following it gave a folder that
    does not exist. The layout it names is the one a builder writes into."""
    import re
    from pathlib import Path

    from diffusets_jax.data.sources import make_builder

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as refused:
        pipeline.load_builder(tmp_path / "empty")
    layout = re.search(r"version folder \((DATA_DIR(?:/[A-Z]+)+),", str(refused.value)).group(1).split("/")[1:]
    written = Path(make_builder("physionet-challenge", str(tmp_path / "data")).data_dir).relative_to(tmp_path / "data")
    assert len(layout) == len(written.parts), (layout, written)
    assert layout == ["NAME", "CONFIG", "VERSION"]


def test_a_name_whose_default_config_is_not_prepared_names_the_prepared_configs(tmp_path):
    """`--dataset mimic_iv_ecg --data-dir DIR` after `prepare mimic-iv-ecg --config openai` (the README's two
    commands) opened TFDS's default config, local, and said the dataset "is not prepared ... run `diffusets-jax
    prepare`", though it was. The line now names the configs prepared there."""
    (tmp_path / "physionet_challenge" / "openai" / "1.0.0").mkdir(parents=True)
    (tmp_path / "physionet_challenge" / "openai" / "1.0.0" / "dataset_info.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as refused:
        pipeline.load_builder("physionet_challenge", tmp_path)
    assert ("prepared there: physionet_challenge/openai: give the name with its config (a name alone means its "
            "default config, local)") in str(refused.value)
    with pytest.raises(FileNotFoundError) as refused:  # nothing prepared: no configs to name
        pipeline.load_builder("physionet_challenge", tmp_path / "elsewhere")
    assert "prepared there" not in str(refused.value)
