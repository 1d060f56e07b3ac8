"""`diffusets-jax train` end to end on a real (tiny) prepared TFDS dataset through the tf.data pipeline."""

import json
import os
import re

import ml_collections
import pytest

pytest.importorskip("diffusets_jax.data.pipeline")
tiny_ecg_dataset = pytest.importorskip("tests.helpers.tiny_ecg_dataset")

from pathlib import Path  # noqa: E402

from diffusets_jax import cli  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
def test_train_clip_cli_end_to_end_then_resume_and_export(tmp_path, capsys):
    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    workdir = tmp_path / "run"
    args = ["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", str(workdir),
            f"--config.data.dataset={builder.data_dir}",
            # The tiny dataset's train split holds a NaN ECG on purpose (bad-record tests); train on its clean
            # validation split and validate on its test split.
            "--config.data.train_split=validation", "--config.data.val_split=test",
            f"--config.model.text_dim={tiny_ecg_dataset.EMBEDDING_DIM}", "--config.model.filters=(8,)",
            "--config.model.blocks_per_stage=(1,)", "--config.model.kernel_size=4",
            "--config.train.global_batch_size=8", "--config.train.num_steps=4", "--config.train.log_every=2",
            "--config.train.eval_every=4", "--config.train.eval_batches=1", "--config.train.checkpoint_every=2",
            "--config.train.progress_bar=false"]
    assert cli.main(args) == 0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["num_train_examples"] == tiny_ecg_dataset.SPLIT_SIZES["validation"]
    assert saved["train"]["num_steps"] == 4
    assert (workdir / "checkpoints" / "4").is_dir()
    from diffusets_jax.models.model_dir import read_index

    assert (workdir / "model" / "clip" / "config.json").is_file()  # the default model directory, WORKDIR/model
    provenance = read_index(workdir / "model").components["clip"]["provenance"]
    assert provenance["dataset"]["name"] == "tiny_ecg" and provenance["dataset"]["split"] == "validation"
    assert provenance["dataset"]["examples"] == tiny_ecg_dataset.SPLIT_SIZES["validation"]
    assert provenance["run"]["step"] == 4 and provenance["code"]["package_version"]
    # What its text tower learnt from, which `evaluate` checks a dataset's embeddings against.
    conditioning = read_index(workdir / "model").components["clip"]["conditioning"]
    assert conditioning["embedder"]["model"] == f"fake-embedding-{tiny_ecg_dataset.EMBEDDING_DIM}"
    assert list((workdir / "tensorboard").iterdir())

    # Extend the same run to 6 steps: it resumes at step 4 from the checkpoint and the data position.
    assert cli.main([a if not a.startswith("--config.train.num_steps") else "--config.train.num_steps=6"
                     for a in args]) == 0
    assert (workdir / "checkpoints" / "6").is_dir()
    import orbax.checkpoint as ocp

    from diffusets_jax.train.loop import checkpoint_manager

    manager = checkpoint_manager(workdir / "checkpoints", 3, async_save=False)
    position = manager.restore(6, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    manager.close()
    assert position["step"] == 6 and position["examples_seen"] == 48
    assert json.loads((workdir / "dataset_build.json").read_text())["dataset"] == str(Path(builder.data_dir).resolve())

    # --export-only: the latest checkpoint into another model directory, as the run's config says; a reader, so a
    # config that does not fit or another model's workdir is refused and the checkpoints are left as they are.
    checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    exported = tmp_path / "exported"
    assert cli.main(["train", "clip", "--config", str(workdir / "config.json"), "--workdir", str(workdir),
                     "--export-only", "--model-dir", str(exported)]) == 0
    assert read_index(exported).components["clip"]["provenance"]["run"]["step"] == 6
    capsys.readouterr()
    assert cli.main([*args, "--export-only", "--model-dir", str(tmp_path / "other"), "--config.model.filters=(16,)"]) == 2
    assert (f"differs from the run in {workdir} (config.model.filters: [8] -> [16]), which changes what its export "
            f"means: export with the config the run saved, --config {workdir / 'config.json'}") in capsys.readouterr().err
    assert cli.main(["train", "vae", "--config", str(CONFIGS / "demo_vae.py"), "--workdir", str(workdir),
                     "--export-only", "--model-dir", str(tmp_path / "other")]) == 2
    assert "holds a diffusets-jax train clip run, not train vae" in capsys.readouterr().err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints
    assert not (tmp_path / "other").exists()


def test_a_training_does_not_resume_on_another_build_of_its_dataset(tmp_path):
    """The run's fingerprint names the dataset by path: after `prepare` or `encode` wrote it again there, a resumed
    run would have gone on with other examples. The build (its card's fingerprint) is recorded in the workdir."""
    from types import SimpleNamespace

    from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
    from diffusets_jax.data.card import write_card
    from diffusets_jax.train.run import DATASET_BUILD_FILE, check_same_dataset_build

    dataset, workdir = tmp_path / "dataset", tmp_path / "run"
    dataset.mkdir()
    workdir.mkdir()

    def build(records: str) -> SimpleNamespace:
        write_card(dataset, kind="prepared", name="tiny", config=None, version="1.0.0", splits={"train": 4},
                   conditioning=ConditioningSpec(EmbedderSpec("openai", "fake", 8), "ordered"),
                   derived_from={"records_fingerprint": records})
        return SimpleNamespace(data_dir=str(dataset))

    first = build("first")
    check_same_dataset_build(workdir, first, "DS")  # a new run records its build
    assert (workdir / DATASET_BUILD_FILE).is_file()
    check_same_dataset_build(workdir, first, "DS")  # resuming on the same build
    with pytest.raises(ValueError, match=r"holds a training on another build of DS .*new --workdir.*--overwrite"):
        check_same_dataset_build(workdir, build("second"), "DS")


@pytest.mark.parametrize("key,value,expected", [
    ("widths", (32, 0, 64), "model.widths must be positive (a width, count or size), got (32, 0, 64)"),
    ("groups", -8, "model.groups must be positive"),
    ("latent_channels", 0, "model.latent_channels must be positive"),
    ("groups", 7, "model.groups=7 must divide every one of model.widths (32, 64, 64)"),
    ("widths", (32, 60, 64), "model.groups=8 must divide every one of model.widths (32, 60, 64)"),
])
def test_the_architectures_numbers_are_checked_before_any_module_is_built(key, value, expected):
    from diffusets_jax.config import load_config
    from diffusets_jax.train.run import check_train_section

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_vae.py")
    config.model[key] = value
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_train_section(config, "demo_vae.py")


@pytest.mark.parametrize("config_file,key", [("demo_vae.py", "widths"), ("demo_clip.py", "filters"),
                                             ("demo_unet.py", "channels")])
def test_an_empty_model_tuple_is_one_line_before_the_workdir_is_claimed(tmp_path, capsys, config_file, key):
    """`--config.model.widths=` (an unset shell variable) gave (): the VAE failed in its first trace, after the
    workdir was claimed, with an IndexError traceback."""
    workdir = tmp_path / "run"
    model = {"demo_vae.py": "vae", "demo_clip.py": "clip", "demo_unet.py": "unet"}[config_file]
    assert cli.main(["train", model, "--config", str(CONFIGS / config_file), "--workdir", str(workdir),
                     "--config.data.dataset=/nowhere", f"--config.model.{key}="]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{config_file}: model.{key} is empty" in err, err
    assert f"--config.model.{key}=32,64" in err and not workdir.exists()


@pytest.mark.parametrize("widths", [(32.0, 64, 64), (32, 64, "a"), (32, True, 64)])
def test_a_model_tuple_takes_whole_numbers(widths):
    """A float among the widths of a config file or an edited config.json failed in the first traced step, after
    the workdir was claimed; a string failed in the groups check as `invalid literal for int()`, naming no key."""
    from diffusets_jax.config import load_config
    from diffusets_jax.train.run import check_train_section

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_vae.py")
    config.model.widths = widths
    with pytest.raises(ValueError, match=re.escape(f"demo_vae.py: model.widths takes whole numbers (widths, counts "
                                                   f"or sizes), got {widths}")):
        check_train_section(config, "demo_vae.py")


def test_a_saved_config_with_a_float_width_is_one_line_before_the_workdir_is_claimed(tmp_path, capsys):
    from diffusets_jax.config import load_config, save_config

    config = load_config(CONFIGS / "demo_vae.py")
    config.model.widths = (32.0, 64, 64)
    saved = save_config(config, tmp_path)
    workdir = tmp_path / "run"
    for args in (["--config", str(saved)],
                 ["--config", str(CONFIGS / "demo_vae.py"), "--config.model.widths=(32,64,'a')"]):
        assert cli.main(["train", "vae", *args, "--workdir", str(workdir), "--config.data.dataset=/nowhere",
                         "--config.train.num_steps=1"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "model.widths" in err and "whole numbers" in err, err
        assert not workdir.exists()


@pytest.mark.parametrize("config_file,key,value,expected", [
    ("demo_vae.py", "num_res_blocks", 2.0, "got 2.0 (a float): write 2"),
    ("demo_unet.py", "latent_channels", 4.0, "got 4.0 (a float): write 4"),
    ("demo_clip.py", "kernel_size", 4.5, "got 4.5 (a float)"),
    ("downstream_net1d.py", "num_classes", True, "got True (a bool)"),
])
def test_a_scalar_int_field_takes_an_int_not_a_float_or_a_bool(config_file, key, value, expected):
    """Only a tuple's elements were checked: `num_res_blocks=2.0` in a config file passed and failed in the first
    traced step (`range(2.0)`), after the workdir was claimed; a bool passed as 1."""
    from diffusets_jax.config import load_config
    from diffusets_jax.train.run import check_train_section

    config = load_config(CONFIGS / config_file)
    # As a config file writes it (`module_section(VAE, num_res_blocks=2.0)`, a dict literal) or config.json holds
    # it: assigning a float to the int field of a built ConfigDict is refused by ml_collections itself.
    config.model = ml_collections.ConfigDict({**config.model.to_dict(), key: value})
    with pytest.raises(ValueError, match=re.escape(f"{config_file}: model.{key} takes an int (a width, count or "
                                                   f"size), {expected}")):
        check_train_section(config, config_file)
    config.model = ml_collections.ConfigDict({**config.model.to_dict(), key: 1})
    check_train_section(config, config_file)  # floats where the module declares them (a dropout rate) still pass


@pytest.mark.parametrize("config_file,overrides", [
    ("diffusets_unet.py", ["diffusion.scale_by_std=true"]),  # the recipe clips: the README's flag half given
    ("demo_unet.py", ["diffusion.clip_sample=true"]),  # the recipe measures the scale
])
def test_scale_by_std_with_clip_sample_is_refused_after_overrides(tmp_path, capsys, config_file, overrides):
    """The combination a recipe's diffusion_section refuses passed as command-line overrides: the U-Net trained and
    exported with DDPM clipping its unit-variance latents to [-1, 1] by default."""
    workdir = tmp_path / "run"
    args = [f"--config.{o}" for o in overrides]
    assert cli.main(["train", "unet", "--config", str(CONFIGS / config_file), "--workdir", str(workdir),
                     "--config.data.dataset=/nowhere", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"{config_file}: diffusion.scale_by_std makes the latents unit-variance" in err, err
    assert "diffusion.clip_sample=false" in err and not workdir.exists()


@pytest.mark.parametrize("key,value,expected", [
    ("global_batch_size", 8.5, "got 8.5 (a float)"),
    ("num_steps", 200.0, "got 200.0 (a float): write 200"),
    ("checkpoint_every", True, "got True (a bool)"),
])
def test_a_train_count_takes_an_int_not_a_float_or_a_bool(key, value, expected):
    """`global_batch_size=8.5` in a config file or an edited config.json was truncated to 8 by int(): a run of
    another batch size than asked for, silently."""
    from diffusets_jax.config import load_config
    from diffusets_jax.train.run import check_train_section

    config = load_config(CONFIGS / "demo_vae.py")
    config.train = ml_collections.ConfigDict({**config.train.to_dict(), key: value})  # as a config file writes it
    with pytest.raises(ValueError, match=re.escape(f"demo_vae.py: train.{key} takes an int (a count), {expected}")):
        check_train_section(config, "demo_vae.py")


def test_a_config_file_or_saved_config_with_a_float_count_is_one_line_before_the_workdir_is_claimed(tmp_path,
                                                                                                    capsys):
    from diffusets_jax.config import load_config, save_config

    config = load_config(CONFIGS / "demo_vae.py")
    config.model = ml_collections.ConfigDict({**config.model.to_dict(), "latent_channels": 4.0})
    saved = save_config(config, tmp_path)  # as a user edits config.json: "latent_channels": 4.0
    edited = tmp_path / "my_vae.py"
    edited.write_text("import runpy\n\nfrom diffusets_jax.config import module_section\n"
                      "from diffusets_jax.models.vae import VAE\n\n\ndef get_config():\n"
                      f"    config = runpy.run_path({str(CONFIGS / 'demo_vae.py')!r})['get_config']()\n"
                      "    config.model = module_section(VAE, widths=(32, 64, 64), groups=8, num_res_blocks=2.0)\n"
                      "    return config\n")
    workdir = tmp_path / "run"
    for path, key, value in ((saved, "latent_channels", "4.0"), (edited, "num_res_blocks", "2.0")):
        assert cli.main(["train", "vae", "--config", str(path), "--workdir", str(workdir),
                         "--config.data.dataset=/nowhere", "--config.train.num_steps=1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{path}: model.{key} takes an int (a width, count or size), got {value} (a float)" in err, err
        assert not workdir.exists()


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_a_dropout_rate_outside_0_1_is_refused(value):
    from diffusets_jax.config import load_config
    from diffusets_jax.train.run import check_train_section

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_clip.py")
    config.model.dropout_rate = value
    with pytest.raises(ValueError, match="model.dropout_rate must be"):
        check_train_section(config, "demo_clip.py")


def test_a_dataset_of_other_widths_than_the_model_is_refused_before_anything_compiles(tmp_path, capsys):
    """The tiny dataset's 8-d text embeddings against the demo CLIP's text_dim 384: this used to fail inside the first
    train step as an XLA broadcasting error, after the workdir was claimed."""
    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    capsys.readouterr()  # the build's progress bars
    workdir = tmp_path / "run"
    code = cli.main(["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", str(workdir),
                     f"--config.data.dataset={builder.data_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not workdir.exists()
    assert (f"its text embeddings are {tiny_ecg_dataset.EMBEDDING_DIM}-d (the embedder it was prepared with), but "
            f"the model's text_dim is 384: set --config.model.text_dim={tiny_ecg_dataset.EMBEDDING_DIM}") in err


def test_a_training_takes_all_the_splits_and_names_them_for_a_split_the_dataset_lacks(tmp_path, capsys):
    """`--config.data.train_split=all`, the published all-data recipe the README names, was refused as a split the
    dataset lacks. The demo CLIP's text width stops the run right after the split is accepted, before any compile."""
    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    capsys.readouterr()  # the build's progress bars
    workdir = tmp_path / "run"
    args = ["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", str(workdir),
            f"--config.data.dataset={builder.data_dir}"]
    assert cli.main([*args, "--config.data.train_split=all"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the model's text_dim is 384" in err and "no split" not in err
    assert cli.main([*args, "--config.data.train_split=dev"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no split 'dev'" in err and "or 'all', their union" in err
    assert not workdir.exists()


def test_a_validation_split_the_dataset_lacks_is_refused_unless_it_is_the_recipes_default(tmp_path, capsys):
    """`--config.data.val_split=valid` (a typo) trained without any validation, said only by a warning. The demo
    CLIP's text width stops an accepted run before any compile."""
    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    capsys.readouterr()  # the build's progress bars
    workdir = tmp_path / "run"
    args = ["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", str(workdir),
            f"--config.data.dataset={builder.data_dir}"]
    assert cli.main([*args, "--config.data.val_split=valid"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no split 'valid' (it has [" in err, err
    assert "--config.data.val_split to one of them, or to '' for no periodic validation" in err
    for accepted in ("--config.data.val_split=", "--config.data.val_split=test"):
        assert cli.main([*args, accepted]) == 2
        assert "the model's text_dim is 384" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize("dataset,expected", [
    ("/nowhere/mimic", "a dataset name with --config.data.data_dir"),  # a mistyped path
    ("mimic_iv_ecg", "pass the --config.data.data_dir it was prepared into"),  # a name without its data dir
])
def test_a_dataset_not_found_names_the_data_dir_flag_train_takes(tmp_path, capsys, dataset, expected):
    """The line said `--data-dir`, a flag `train` does not have (`unrecognized arguments` when tried)."""
    workdir = tmp_path / "run"
    assert cli.main(["train", "vae", "--config", str(CONFIGS / "demo_vae.py"), "--workdir", str(workdir),
                     f"--config.data.dataset={dataset}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and " --data-dir" not in err, err
    assert not workdir.exists()


@pytest.mark.parametrize("edit,expected", [
    (lambda c: c["optimizer"].pop("grad_clip_norm"), "lacks optimizer.grad_clip_norm: add it"),  # an older run's
    (lambda c: c.pop("mesh"), "has no mesh section"),
    (lambda c: c["train"].update(learning_rate=1e-3), "train.learning_rate is not read by a vae training and would "
                                                      "be ignored; did you mean optimizer.learning_rate?"),
])
def test_a_config_lacking_or_adding_a_field_is_one_line_before_the_workdir_is_claimed(tmp_path, capsys, edit,
                                                                                      expected):
    """A field missing from a config.json or config file failed as a KeyError traceback; a field the training does
    not read (`train_section(learning_rate=...)`) was ignored, training with the default."""
    from diffusets_jax.config import config_to_dict, load_config

    config = config_to_dict(load_config(CONFIGS / "demo_vae.py"))
    edit(config)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(config))
    workdir = tmp_path / "run"
    assert cli.main(["train", "vae", "--config", str(path), "--workdir", str(workdir),
                     "--config.data.dataset=/nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not workdir.exists()


def test_latents_of_another_vae_are_refused_by_their_channels():
    from types import SimpleNamespace

    from diffusets_jax.models.unet import UNet
    from diffusets_jax.train.run import check_dataset_fits_model

    def latent_dataset(channels, text_dim):
        features = {"latent_mean": SimpleNamespace(shape=(128, channels)),
                    "text_embedding": SimpleNamespace(shape=(text_dim,))}
        return SimpleNamespace(info=SimpleNamespace(features=features))

    unet = UNet(latent_channels=4, text_dim=16)
    check_dataset_fits_model(unet, latent_dataset(4, 16), "LAT")  # fits: nothing to say
    with pytest.raises(ValueError, match=re.escape("dataset LAT: its latents have 8 channels (the VAE it was encoded "
                                                   "with), but the model's latent_channels is 4: set "
                                                   "--config.model.latent_channels=8")):
        check_dataset_fits_model(unet, latent_dataset(8, 16), "LAT")
    with pytest.raises(ValueError, match="text_dim is 16: set --config.model.text_dim=1536"):
        check_dataset_fits_model(unet, latent_dataset(4, 1536), "LAT")


def test_a_unet_is_not_trained_into_a_model_directory_whose_vae_did_not_encode_its_latents(tmp_path, capsys):
    """`sample` refuses a U-Net beside another VAE than the one that encoded its latents; the training ran to its end
    and exported into such a directory all the same. Refused before the workdir is claimed."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffusets_jax.data import latents
    from diffusets_jax.models import model_dir as model_dirs
    from diffusets_jax.models.vae import VAE

    source = tiny_ecg_dataset.build(str(tmp_path / "tfds"))

    def encoder(variables, ecg):  # the VAE's shapes: (batch, 1024, 12) -> 2 x (batch, 128, 4)
        mean = ecg.reshape(ecg.shape[0], 128, 8, 12).mean(axis=2)[..., :4]
        return mean, jnp.zeros_like(mean)

    out = tmp_path / "latents"
    latents.encode_dataset(source, str(out), encoder, {}, vae={"model_dir": "/models/a", "uid": "a" * 32,
                                                               "provenance": {}}, batch_size=8, splits=["validation"])
    vae = VAE(widths=(8, 8, 8), groups=4, num_res_blocks=1)
    shapes = jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 1024, 12)), method=VAE.encode))
    models = tmp_path / "models"
    model_dirs.write_component(models, "vae", vae, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes),
                               provenance={"source": "test"})
    there = model_dirs.read_index(models).components["vae"]["uid"]
    capsys.readouterr()
    workdir = tmp_path / "run"
    code = cli.main(["train", "unet", "--config", str(CONFIGS / "demo_unet.py"), "--workdir", str(workdir),
                     "--model-dir", str(models), f"--config.data.dataset={out}", "--config.data.train_split=validation"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not workdir.exists()
    assert f"holds VAE {there[:8]}, but the latents of {out} were encoded by VAE aaaaaaaa (of /models/a)" in err


def test_a_vae_run_does_not_train_again_over_the_vae_its_model_directorys_unet_needs(tmp_path, capsys):
    """Extending a VAE run that had exported into a model directory, after a U-Net was trained there on its latents,
    trained to the end and then replaced that VAE: the U-Net had nothing left to decode with. Refused before the
    training starts."""
    from diffusets_jax.diffusion.schedule import DiffusionSpec
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import openai_conditioning, tiny_vae_unet

    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    capsys.readouterr()  # the build's progress bars
    vae, vae_vars, unet, unet_vars = tiny_vae_unet()
    workdir, models = tmp_path / "run", tmp_path / "models"
    model_dirs.write_component(models, "vae", vae, vae_vars, provenance={
        "source": "trained", "run": {"workdir": str(workdir.resolve()), "step": 2}})
    vae_uid = model_dirs.read_index(models).components["vae"]["uid"]
    model_dirs.write_component(models, "unet", unet, unet_vars, provenance={"source": "test"},
                               conditioning=openai_conditioning(), diffusion=DiffusionSpec(latent_std=0.2),
                               vae_uid=vae_uid)
    code = cli.main(["train", "vae", "--config", str(CONFIGS / "demo_vae.py"), "--workdir", str(workdir),
                     "--model-dir", str(models), f"--config.data.dataset={builder.data_dir}",
                     "--config.train.num_steps=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"its unet/ was trained on the latents of its vae/ (uid {vae_uid})" in err
    assert not workdir.exists()  # refused before the workdir is claimed
    assert model_dirs.read_index(models).components["vae"]["uid"] == vae_uid


def test_the_model_directory_and_the_workdir_must_not_overlap(tmp_path):
    """Refused at the start, not when the export finds the folder taken at the end of the training."""
    from diffusets_jax.train.run import check_apart

    work = tmp_path / "runs" / "vae"
    check_apart(work / "model", work)  # WORKDIR/model, the default given explicitly
    check_apart(tmp_path / "models" / "demo", work)
    for model_dir in (work, tmp_path / "runs", work / "checkpoints"):
        with pytest.raises(ValueError, match=r"--model-dir .* overlaps --workdir .*leave --model-dir out"):
            check_apart(model_dir, work)


def test_overwrite_never_replaces_a_workdir_that_holds_the_training_dataset(tmp_path, capsys):
    """`--workdir runs --overwrite` with the dataset in runs/data: the run would have trained, then replaced runs/
    with its outputs, the dataset it had just read included. Refused before anything is trained or written."""
    workdir = tmp_path / "runs"
    builder = tiny_ecg_dataset.build(str(workdir / "data"))
    (workdir / "notes.txt").write_text("a user's file: refused without --overwrite")
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    args = ["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", str(workdir),
            f"--config.data.dataset={builder.data_dir}", f"--config.model.text_dim={tiny_ecg_dataset.EMBEDDING_DIM}",
            "--config.train.num_steps=1", "--overwrite"]
    capsys.readouterr()  # the dataset build's progress
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"--workdir {workdir} holds --config.data.dataset {builder.data_dir}, which this run reads" in err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # no staging folder beside it


def test_a_training_does_not_start_on_a_dataset_being_replaced(tmp_path, capsys):
    """A `prepare --overwrite` of the dataset is under way: the training would read a folder about to move away.
    Refused with one line before the workdir is claimed; otherwise the training holds the dataset as a reader
    for its whole run (tests/test_io_run_dir.py), so an --overwrite of it is refused instead."""
    from diffusets_jax.io.run_dir import READERS_LOCK, add_readers_lock, exclusive_lock

    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    add_readers_lock(builder.data_dir)  # as `prepare` leaves it
    args = ["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", str(tmp_path / "run"),
            f"--config.data.dataset={builder.data_dir}", f"--config.model.text_dim={tiny_ecg_dataset.EMBEDDING_DIM}",
            "--config.train.num_steps=1"]
    capsys.readouterr()
    with exclusive_lock(builder.data_dir, "busy", name=READERS_LOCK):
        assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{builder.data_dir} is being replaced now" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


TINY = {"vae": ["--config.model.widths=(8,8,8)", "--config.model.groups=4", "--config.model.num_res_blocks=1"],
        "unet": ["--config.model.channels=(8,16)", "--config.model.down_attention_dims=(8,16)",
                 "--config.model.up_attention_dims=(32,16)", "--config.model.bottleneck_attention_dim=16"]}


def _tiny_training(model, tmp_path):
    """(its training examples, `train MODEL` arguments): one step of the demo config at toy size on a tiny dataset
    (for the U-Net, unit Gaussian latents, so `scale_by_std` measures a scale other than the config's 0.18215)."""
    if model == "vae":
        builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
        # The train split holds a NaN ECG on purpose (bad-record tests): train on the clean validation split.
        data = [f"--config.data.dataset={builder.data_dir}", "--config.data.train_split=validation",
                "--config.data.val_split=test"]
    else:
        from diffusets_jax.conditioning.spec import ConditioningSpec
        from tests.helpers.gaussian_latents import write_gaussian_latent_dataset
        from tests.helpers.tiny_models import TEXT_DIM, openai_conditioning

        latents = write_gaussian_latent_dataset(
            tmp_path / "latents", splits={"train": 8}, vae_uid=None, latent_scale=1.0,
            conditioning=ConditioningSpec(openai_conditioning(TEXT_DIM).embedder, "ordered"),
            channel_mean=(0.0,) * 4, channel_std=(1.0,) * 4)
        data = [f"--config.data.dataset={latents}", f"--config.model.text_dim={TEXT_DIM}"]
    examples = tiny_ecg_dataset.SPLIT_SIZES["validation"] if model == "vae" else 8
    return examples, ["train", model, "--config", str(CONFIGS / f"demo_{model}.py"), *data, *TINY[model],
                      "--config.train.global_batch_size=8", "--config.train.num_steps=1",
                      "--config.train.progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vae", "unet"])
def test_a_run_resumes_with_its_own_saved_config(model, tmp_path, capsys):
    """`--config WORKDIR/config.json`, which --help offers, was refused as a run "with other settings": the saved
    config holds what the run resolved from its dataset (data.num_train_examples; the U-Net's measured
    diffusion.latent_scale), the fingerprint is of the config as given. Both forms now resume the same run, and
    the run record keeps the fingerprint it had."""
    from diffusets_jax.io.files import read_json
    from diffusets_jax.io.run_dir import RUN_FILE

    workdir = tmp_path / "run"
    examples, args = _tiny_training(model, tmp_path)
    args += ["--workdir", str(workdir)]
    assert cli.main(args) == 0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["num_train_examples"] == examples  # resolved: the config as given says 0
    if model == "unet":
        assert saved["diffusion"]["scale_by_std"] and saved["diffusion"]["latent_scale"] != 0.18215
    record = read_json(workdir / RUN_FILE, "run record")
    capsys.readouterr()
    own = ["train", model, "--config", str(workdir / "config.json"), "--workdir", str(workdir)]
    assert cli.main(own) == 0, capsys.readouterr().err
    assert cli.main(args) == 0  # the config as given still resumes it
    assert read_json(workdir / RUN_FILE, "run record")["fingerprint"] == record["fingerprint"]
    # A real change is still refused, naming only what changed, not what the saved config resolved.
    capsys.readouterr()
    assert cli.main([*own, "--config.optimizer.learning_rate=0.002"]) == 2
    err = capsys.readouterr().err
    assert "with other settings (config.optimizer.learning_rate: 0.001 -> 0.002): choose a new directory" in err, err


@pytest.mark.slow
def test_an_export_with_a_config_that_changes_its_meaning_is_refused(tmp_path, capsys):
    """A v-prediction U-Net trained on normalised patient features, exported with an epsilon, faithful-features
    config: the shapes fit, so it was exported (exit 0) with a model_index.json saying epsilon/faithful, and
    sampling would have used the wrong parameterisation. Where the data lives may differ (a moved dataset)."""
    import shutil

    workdir = tmp_path / "run"
    _, args = _tiny_training("unet", tmp_path)
    args += ["--workdir", str(workdir)]
    assert cli.main(args) == 0
    capsys.readouterr()
    exported = tmp_path / "exported"
    assert cli.main([*args, "--export-only", "--model-dir", str(exported),
                     "--config.diffusion.schedule.prediction_type=epsilon",
                     "--config.train.patient_features=faithful"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert (f"differs from the run in {workdir} (config.diffusion.schedule.prediction_type: \"v_prediction\" -> "
            '"epsilon", config.train.patient_features: "normalised" -> "faithful"), which changes what its export '
            f"means: export with the config the run saved, --config {workdir / 'config.json'}") in err
    assert not exported.exists()
    # The run's saved config, the config as given, and the saved config with the dataset at another path: exported.
    own = ["train", "unet", "--config", str(workdir / "config.json"), "--workdir", str(workdir), "--export-only"]
    moved = shutil.copytree(tmp_path / "latents", tmp_path / "moved")
    for command, model_dir in (([*own], exported), ([*args, "--export-only"], tmp_path / "as_given"),
                               ([*own, f"--config.data.dataset={moved}"], tmp_path / "moved_export")):
        assert cli.main([*command, "--model-dir", str(model_dir)]) == 0, capsys.readouterr().err
        index = json.loads((model_dir / "model_index.json").read_text())
        assert index["diffusion"]["schedule"]["prediction_type"] == "v_prediction"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_hosts_with_fsdp_over_both_export_the_whole_model(tmp_path):
    # With fsdp spanning the hosts each process holds only slices of the weights. Process 0 exported them alone,
    # and jax.device_get refused the arrays it could not see whole: a traceback on process 0, exit 0 on process 1,
    # and no model.
    from diffusets_jax.models.bundle import load_model
    from tests.test_multihost_sample_evaluate import run_two_processes

    _, args = _tiny_training("vae", tmp_path)
    args += ["--config.model.widths=(64,64,64)",  # kernels of 3 x 64 x 64: big enough for fsdp to split them
             "--config.mesh.fsdp=8", "--config.mesh.data=1", "--workdir", str(tmp_path / "run")]
    for code, output in run_two_processes(args, {}, check=False):
        assert code == 0, output[-4000:]
    import jax
    import numpy as np

    module, variables = load_model(tmp_path / "run" / "model", "vae")
    key = jax.random.PRNGKey(0)
    expected = jax.eval_shape(module.init, key, np.zeros((1, 1024, 12), np.float32), key)
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda x: x.shape, dict(expected))  # whole, not slices


@pytest.mark.slow
def test_an_export_refused_after_training_says_the_training_is_kept_and_how_to_export_it(tmp_path, capsys,
                                                                                         monkeypatch):
    """Another run exported into --model-dir while this one trained: the export is refused only at the end, and
    the line said nothing of the finished training or how to get at it (the same command with another --model-dir
    is another run's settings). The command it names exports the kept training."""
    from diffusets_jax.models import model_dir as model_dirs
    from diffusets_jax.train import run as train_run
    from tests.helpers.tiny_models import tiny_vae_unet

    workdir, models = tmp_path / "run", tmp_path / "models"
    _, args = _tiny_training("vae", tmp_path)
    trained = train_run.train

    def train_while_another_run_exports(*a, **k):
        result = trained(*a, **k)
        vae, vae_vars, _, _ = tiny_vae_unet()
        model_dirs.write_component(models, "vae", vae, vae_vars, provenance={
            "source": "trained", "run": {"workdir": str(tmp_path / "other"), "step": 5}})
        return result

    monkeypatch.setattr(train_run, "train", train_while_another_run_exports)
    capsys.readouterr()
    assert cli.main([*args, "--workdir", str(workdir), "--model-dir", str(models)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    hint = re.search(r"this training is complete and kept in (\S+): `diffusets-jax (train vae [^`]*)` writes it", err)
    assert hint and hint[1] == str(workdir), err
    elsewhere = tmp_path / "elsewhere"
    assert cli.main(hint[2].replace("DIR", str(elsewhere)).split()) == 0, capsys.readouterr().err
    assert model_dirs.read_index(elsewhere).components["vae"]["provenance"]["run"]["workdir"] == str(workdir.resolve())


def test_num_epochs_and_num_steps_that_disagree_are_refused(tmp_path, capsys):
    """`--config.train.num_epochs=3` on a config whose num_steps is set (demo_clip.py's 200, or a run's saved
    config.json) trained num_steps and said nothing. Refused in one line naming both, before the workdir is claimed;
    both agreeing (a saved config.json's resolved num_steps) trains."""
    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    workdir = tmp_path / "run"
    args = ["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", str(workdir),
            f"--config.data.dataset={builder.data_dir}", f"--config.model.text_dim={tiny_ecg_dataset.EMBEDDING_DIM}",
            "--config.data.train_split=validation", "--config.train.global_batch_size=4",
            "--config.train.num_epochs=3"]
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    steps = 3 * (tiny_ecg_dataset.SPLIT_SIZES["validation"] // 4)
    assert (f"train.num_steps=200 and train.num_epochs=3 ({steps} steps of 4 of "
            f"{tiny_ecg_dataset.SPLIT_SIZES['validation']} examples) disagree") in err, err
    assert "--config.train.num_steps=0" in err and len(err.strip().splitlines()) == 1, err
    assert not workdir.exists()


def test_both_num_epochs_and_num_steps_zero_is_refused():
    from diffusets_jax.config import load_config
    from diffusets_jax.train.run import check_train_section

    config = load_config(CONFIGS / "demo_clip.py", ["train.num_steps=0"])
    with pytest.raises(ValueError, match="train.num_steps and train.num_epochs are both 0: set one of them"):
        check_train_section(config, "demo_clip.py")
    config = load_config(CONFIGS / "demo_clip.py", ["train.num_epochs=-1"])
    with pytest.raises(ValueError, match=r"train.num_epochs must be a finite number >= 0"):
        check_train_section(config, "demo_clip.py")


def test_shipped_configs_state_one_run_length():
    """Every shipped training config sets num_steps or num_epochs, not both (both would have to agree)."""
    from diffusets_jax.config import load_config

    for path in sorted(CONFIGS.glob("*.py")):
        train = load_config(path).train
        assert (int(train.num_steps) > 0) != (float(train.num_epochs) > 0), path.name


@pytest.mark.parametrize("value", ["1000", "5"])
def test_num_train_examples_other_than_the_split_is_refused(tmp_path, capsys, value):
    """data.num_train_examples only sizes an epoch (the run reads the whole split): larger than the split trained
    more epochs than asked for, smaller trained on the whole split all the same. Refused in one line once the
    split's size is known, before the workdir is claimed."""
    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    workdir = tmp_path / "run"
    capsys.readouterr()
    assert cli.main(["train", "clip", "--config", str(CONFIGS / "demo_clip.py"), "--workdir", str(workdir),
                     f"--config.data.dataset={builder.data_dir}", "--config.data.train_split=validation",
                     f"--config.model.text_dim={tiny_ecg_dataset.EMBEDDING_DIM}",
                     f"--config.data.num_train_examples={value}"]) == 2
    err = capsys.readouterr().err
    assert (f"data.num_train_examples={value}, but split 'validation' of {builder.data_dir} has "
            f"{tiny_ecg_dataset.SPLIT_SIZES['validation']} examples: leave it at 0") in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not workdir.exists()


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_kl_anneal_epochs_below_zero_or_not_finite_is_refused(value):
    """A negative kl_anneal_epochs gave the full KL weight from the first step, as 0 does, without a word."""
    from diffusets_jax.config import load_config
    from diffusets_jax.train.run import check_train_section

    config = load_config(CONFIGS / "demo_vae.py")
    config.train.kl_anneal_epochs = value
    with pytest.raises(ValueError, match=r"demo_vae.py: train.kl_anneal_epochs must be a finite number >= 0"):
        check_train_section(config, "demo_vae.py")
