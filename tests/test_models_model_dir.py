"""The model directory: model_index.json written atomically under a lock, components replaced whole, the old
generation.json format still read."""

from __future__ import annotations

import json
import threading

import pytest

from diffusets_jax.diffusion.schedule import DiffusionSpec
from diffusets_jax.models import model_dir as model_dirs
from tests.helpers.tiny_models import openai_conditioning, tiny_vae_unet


@pytest.fixture(scope="module")
def parts():
    return tiny_vae_unet()


def test_components_are_recorded_with_uid_provenance_and_conditioning(parts, tmp_path):
    vae, vae_vars, unet, unet_vars = parts
    model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"source": "test"})
    vae_uid = model_dirs.read_index(tmp_path).components["vae"]["uid"]
    model_dirs.write_component(tmp_path, "unet", unet, unet_vars, provenance={"source": "test"},
                               conditioning=openai_conditioning(), diffusion=DiffusionSpec(latent_std=0.2),
                               vae_uid=vae_uid)
    raw = json.loads((tmp_path / "model_index.json").read_text())
    assert raw["format"] == model_dirs.INDEX_FORMAT and set(raw["components"]) == {"vae", "unet"}
    assert raw["components"]["vae"]["latent_shape"] == [128, 4]
    assert raw["components"]["unet"]["vae_uid"] == vae_uid and raw["components"]["unet"]["text_dim"] == 16
    assert raw["components"]["vae"]["provenance"]["code"]["package_version"]
    assert raw["conditioning"]["embedder"]["dim"] == 16 and raw["diffusion"]["latent_std"] == 0.2
    index = model_dirs.read_index(tmp_path)
    assert index.conditioning == openai_conditioning() and index.diffusion == DiffusionSpec(latent_std=0.2)
    # Another VAE over this one is refused (it is not this run's), naming what is there ...
    with pytest.raises(ValueError, match=r"--model-dir .* already holds vae/, a test vae .*pass --overwrite"):
        model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"source": "retrained"})
    # convert's flag is --out: found here when another convert wrote the VAE after convert's own early check
    with pytest.raises(ValueError, match=r"^--out .* already holds vae/.*or give another --out$"):
        model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"source": "retrained"}, flag="--out")
    assert model_dirs.read_index(tmp_path).components["vae"]["uid"] == vae_uid
    # ... and with overwrite, replacing the VAE keeps the U-Net's entry and gives the new VAE a new uid.
    model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"source": "retrained"}, overwrite=True)
    again = model_dirs.read_index(tmp_path)
    assert again.components["vae"]["uid"] != vae_uid and again.components["unet"] == index.components["unet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model_index.lock", "model_index.json", "unet", "vae"]


def test_an_export_removes_the_staging_folders_a_killed_export_of_that_component_left(parts, tmp_path):
    """A SIGKILL (or a SIGTERM outside the training loop) during `save_model` leaves its `.NAME.tmp-*` staging
    folder, possibly holding most of a model's weights; the next export of that component, under the index's lock,
    removes it. Another component's stays."""
    vae, vae_vars, _, _ = parts
    for left in (".vae.tmp-k1ll3d", ".vae.tmp-0th3r1"):
        (tmp_path / left / "variables").mkdir(parents=True)
        (tmp_path / left / "config.json").write_text("{}")
    (tmp_path / ".clip.tmp-n0tv43").mkdir()
    model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"source": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".clip.tmp-n0tv43", ".model_index.lock", "model_index.json",
                                                          "vae"]
    assert model_dirs.load_component(tmp_path, "vae")[0] == vae


def test_a_unet_needs_its_conditioning_and_a_matching_embedder_width(parts, tmp_path):
    _, _, unet, unet_vars = parts
    with pytest.raises(ValueError, match="conditioning"):
        model_dirs.write_component(tmp_path, "unet", unet, unet_vars, provenance={})
    with pytest.raises(ValueError, match="takes 16-d text but its embedder"):
        model_dirs.write_component(tmp_path, "unet", unet, unet_vars, provenance={},
                                   conditioning=openai_conditioning(text_dim=384), diffusion=DiffusionSpec())
    assert not (tmp_path / "unet").exists()
    with pytest.raises(ValueError, match="must be one of"):
        model_dirs.write_component(tmp_path, "decoder", unet, unet_vars, provenance={})


def test_concurrent_writers_never_lose_each_others_entries(parts, tmp_path):
    """Two trainings finishing into one directory at once (a VAE and a CLIP): both entries survive the lock."""
    vae, vae_vars, _, _ = parts
    errors = []

    def write(name):
        try:
            model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"who": name}, overwrite=True)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    index = model_dirs.read_index(tmp_path)
    assert index.components["vae"]["provenance"]["who"] in {"w0", "w1", "w2"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".vae.", ".model_index.json.tmp"))]


def test_a_training_run_replaces_only_its_own_export(parts, tmp_path):
    """A resumed or re-exported run may replace the component it exported; a folder the index does not list, a
    converted component or another run's export is the user's."""
    vae, vae_vars, _, _ = parts
    mine = {"run": {"workdir": str((tmp_path / "runs" / "vae").resolve()), "step": 10}}
    model_dirs.write_component(tmp_path / "m", "vae", vae, vae_vars, provenance=mine)
    later = {"run": {**mine["run"], "step": 20}}
    model_dirs.write_component(tmp_path / "m", "vae", vae, vae_vars, provenance=later)  # the same run, later
    assert model_dirs.read_index(tmp_path / "m").components["vae"]["provenance"]["run"]["step"] == 20
    other = {"run": {"workdir": str(tmp_path / "elsewhere"), "step": 5}}
    with pytest.raises(ValueError, match="already holds vae/.*from .*runs/vae"):
        model_dirs.write_component(tmp_path / "m", "vae", vae, vae_vars, provenance=other)
    (tmp_path / "u" / "clip").mkdir(parents=True)
    (tmp_path / "u" / "clip" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="a folder its model_index.json does not list"):
        model_dirs.check_component_writable(tmp_path / "u", "clip")
    assert (tmp_path / "u" / "clip" / "notes.txt").read_text() == "mine"


def test_a_vae_that_a_unet_was_trained_on_is_not_replaced_without_overwrite(parts, tmp_path):
    """A training run may replace its own VAE export; extended with more steps, it did so under the U-Net trained
    on that VAE's latents, which then had no VAE to decode with (`sample` refused the directory)."""
    vae, vae_vars, unet, unet_vars = parts
    mine = {"run": {"workdir": str((tmp_path / "runs" / "vae").resolve()), "step": 10}}
    model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance=mine)
    vae_uid = model_dirs.read_index(tmp_path).components["vae"]["uid"]
    model_dirs.check_vae_replaceable(tmp_path)  # no U-Net yet: the run may export again
    model_dirs.write_component(tmp_path, "unet", unet, unet_vars, provenance={"source": "test"},
                               conditioning=openai_conditioning(), diffusion=DiffusionSpec(latent_std=0.2),
                               vae_uid=vae_uid)
    later = {"run": {**mine["run"], "step": 20}}
    with pytest.raises(ValueError, match=r"^--model-dir .*: its unet/ was trained on the latents of its vae/ "
                                         rf"\(uid {vae_uid}\).*pass --overwrite to replace the VAE"):
        model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance=later)
    assert model_dirs.read_index(tmp_path).components["vae"]["uid"] == vae_uid
    model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance=later, overwrite=True)  # asked for
    assert model_dirs.read_index(tmp_path).components["vae"]["uid"] != vae_uid


def test_a_unet_converted_before_its_vae(parts, tmp_path):
    """`convert --unet`, then the VAE (components are added one flag at a time). A VAE trained there decoded the
    published U-Net's latents into noise without a word; the published VAE converted later was not recorded as the
    U-Net's, so replacing it was not refused at sampling as it is when both are converted in one command."""
    vae, vae_vars, unet, unet_vars = parts
    model_dirs.write_component(tmp_path, "unet", unet, unet_vars, provenance={"source": "converted"},
                               conditioning=openai_conditioning(), diffusion=DiffusionSpec())
    trained = {"source": "trained", "run": {"workdir": str(tmp_path / "runs" / "vae"), "step": 10}}
    with pytest.raises(ValueError, match=r"^--model-dir .*: its unet/ is converted, trained on the published VAE's "
                                         r"latents.*convert --vae"):
        model_dirs.check_vae_replaceable(tmp_path, source="trained")  # train vae's early check
    with pytest.raises(ValueError, match="its unet/ is converted"):
        model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance=trained)
    assert "vae" not in model_dirs.read_index(tmp_path).components and not (tmp_path / "vae").exists()
    model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"source": "converted"}, flag="--out")
    index = model_dirs.read_index(tmp_path)
    assert index.components["unet"]["vae_uid"] == index.components["vae"]["uid"]
    with pytest.raises(ValueError, match="its unet/ was trained on the latents of its vae/"):
        model_dirs.check_vae_replaceable(tmp_path, source="trained")  # now linked: replacing it needs --overwrite


def test_a_converted_unet_is_checked_against_the_vae_under_the_lock(parts, tmp_path):
    """`convert --unet` checks the directory's VAE before converting, outside the lock: a `train vae` exporting into
    the directory meanwhile left the published U-Net beside a trained VAE, unlinked, decoding into noise. Written,
    it is checked again under the lock; a converted VAE there is recorded as its own."""
    vae, vae_vars, unet, unet_vars = parts
    converted = {"source": "converted"}
    trained = tmp_path / "trained"
    model_dirs.write_component(trained, "vae", vae, vae_vars, provenance={"source": "trained"})
    with pytest.raises(ValueError, match=r"^--out .*trained holds a trained VAE .*not the one the converted U-Net"):
        model_dirs.write_component(trained, "unet", unet, unet_vars, provenance=converted, flag="--out",
                                   conditioning=openai_conditioning(), diffusion=DiffusionSpec())
    assert set(model_dirs.read_index(trained).components) == {"vae"} and not (trained / "unet").exists()
    published = tmp_path / "published"
    model_dirs.write_component(published, "vae", vae, vae_vars, provenance=converted)
    model_dirs.write_component(published, "unet", unet, unet_vars, provenance=converted,
                               conditioning=openai_conditioning(), diffusion=DiffusionSpec())
    index = model_dirs.read_index(published)
    assert index.components["unet"]["vae_uid"] == index.components["vae"]["uid"]


def test_a_vae_beside_a_trained_unet_is_not_linked_to_it(parts, tmp_path):
    """Only the published pair is linked after the fact: a U-Net trained without a recorded VAE stays unlinked."""
    vae, vae_vars, unet, unet_vars = parts
    model_dirs.write_component(tmp_path, "unet", unet, unet_vars, provenance={"source": "trained"},
                               conditioning=openai_conditioning(), diffusion=DiffusionSpec())
    model_dirs.check_vae_replaceable(tmp_path, source="trained")
    model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"source": "converted"})
    assert model_dirs.read_index(tmp_path).components["unet"]["vae_uid"] is None


@pytest.mark.parametrize(("provenance", "trained"), [
    ({"source": "converted"}, False),  # the published U-Net: no condition dropout
    ({"source": "test"}, False),  # no training config recorded
    ({"source": "trained", "config": {"train": {"cond_dropout": 0.0}}}, False),
    ({"source": "trained", "config": {"train": {"cond_dropout": 0.1}}}, True),
])
def test_guidance_on_a_unet_without_condition_dropout_gets_a_warning(parts, tmp_path, provenance, trained):
    """--guidance-scale ran without a word on U-Nets whose null condition was never trained."""
    vae, vae_vars, unet, unet_vars = parts
    converted = provenance["source"] == "converted"  # a converted U-Net is written beside a converted VAE only
    model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"source": provenance["source"] if converted
                                                                           else "test"})
    model_dirs.write_component(tmp_path, "unet", unet, unet_vars, provenance=provenance,
                               conditioning=openai_conditioning(), diffusion=DiffusionSpec())
    index = model_dirs.read_index(tmp_path)
    assert model_dirs.trained_with_condition_dropout(index) is trained
    assert model_dirs.untrained_guidance_warning(index, 1.0) is None  # no guidance: nothing to say
    warning = model_dirs.untrained_guidance_warning(index, 2.5)
    if trained:
        assert warning is None
    else:
        assert warning.startswith("--guidance-scale 2.5: this U-Net's provenance records no condition dropout")
        assert "\n" not in warning


def test_a_users_folder_is_not_made_a_model_directory(parts, tmp_path):
    """`train --model-dir` or `convert --out` naming a folder of the user's wrote model_index.json and vae/ in among
    their files, at the end of the training; the folder is now refused at the start, with or without --overwrite."""
    vae, vae_vars, _, _ = parts
    users = tmp_path / "thesis"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"--model-dir .*thesis is not a model directory and holds other files "
                                             r"\(thesis.tex\)"):
            model_dirs.check_component_writable(users, "vae", overwrite=overwrite)
        with pytest.raises(ValueError, match="is not a model directory"):
            model_dirs.write_component(users, "vae", vae, vae_vars, provenance={}, overwrite=overwrite)
    assert sorted(p.name for p in users.iterdir() if not p.name.startswith(".")) == ["thesis.tex"]
    (tmp_path / "empty").mkdir()
    model_dirs.write_component(tmp_path / "empty", "vae", vae, vae_vars, provenance={})  # new or empty: ours
    (tmp_path / "empty" / "README.md").write_text("notes on this model")  # a model directory may hold anything
    model_dirs.check_component_writable(tmp_path / "empty", "clip")


def test_index_errors_name_the_file(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a diffusets-jax model index"):
        model_dirs.read_index(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"format": model_dirs.INDEX_FORMAT, "format_version": 99}))
    with pytest.raises(ValueError, match="newer diffusets-jax"):
        model_dirs.read_index(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({
        "format": model_dirs.INDEX_FORMAT, "components": {}, "conditioning": {"embedder": {"kind": "cohere",
                                                                                           "model": "x", "dim": 3}}}))
    with pytest.raises(ValueError, match="model_index.json: embedder kind must be one of"):
        model_dirs.read_index(tmp_path)
    (tmp_path / "model_index.json").unlink()
    (tmp_path / "generation.json").write_text(json.dumps({"embedder": "openai", "mystery": 1}))
    with pytest.raises(ValueError, match="is not a diffusets-jax generation.json; write the model directory again"):
        model_dirs.read_index(tmp_path)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model_dirs.read_index(file)


def test_require_says_how_to_add_a_missing_component(tmp_path):
    with pytest.raises(ValueError, match=r"has no clip \(it has nothing\).*train clip"):
        model_dirs.require(model_dirs.read_index(tmp_path), tmp_path, "clip")


def test_a_vae_of_another_lead_count_is_refused_before_generating(parts, tmp_path):
    """`convert` takes a VAE of 8 leads (its channels left as they are): `sample` then ran the whole chain and
    skipped every ECG it made ("expected one ECG of shape (samples, 12) ..., got shape (1024, 8)")."""
    import dataclasses

    vae, _, unet, _ = parts
    model_dirs.write_component(tmp_path, "vae", vae, parts[1], provenance={"source": "test"})
    model_dirs.write_component(tmp_path, "unet", unet, parts[3], provenance={"source": "test"},
                               conditioning=openai_conditioning(), diffusion=DiffusionSpec())
    index = model_dirs.read_index(tmp_path)
    model_dirs.check_generation_parts(tmp_path, index, vae, unet)  # 12 leads: fine
    with pytest.raises(ValueError, match="its VAE decodes 8-channel signals, but generation makes 12-lead ECGs"):
        model_dirs.check_generation_parts(tmp_path, index, dataclasses.replace(vae, in_channels=8), unet)


def test_require_says_a_mistyped_directory_does_not_exist(tmp_path):
    """`encode --vae models/typo` and `reconstruct-eval --model-dir models/typo` said "has no vae (it has nothing):
    add it with `train vae`", which hid the typo."""
    missing = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match=f"model directory {missing} does not exist: check the path"):
        model_dirs.require(model_dirs.read_index(missing), missing, "vae")
    assert not missing.exists()


def test_a_reader_that_may_not_read_the_lock_file_reads_without_it(parts, tmp_path, monkeypatch):
    """A directory shared by another user whose lock file is theirs alone (umask 077): reading it must not fail on
    the lock, which a reader holds only to keep writers out while it loads."""
    vae, vae_vars, _, _ = parts
    model_dirs.write_component(tmp_path, "vae", vae, vae_vars, provenance={"source": "test"})
    lock = tmp_path / model_dirs._LOCK_FILE

    def refused(path, *args, **kwargs):
        if str(path) == str(lock):
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(model_dirs, "open", refused, raising=False)
    with model_dirs.reading(tmp_path):
        assert model_dirs.read_index(tmp_path).components["vae"]["uid"]
    with model_dirs.reading(tmp_path / "absent"):  # and none there: read as before, nothing created
        pass
    assert not (tmp_path / "absent").exists()
