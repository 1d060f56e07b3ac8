"""`diffusets-jax convert` end to end on .npz dumps of the parity-filled reference state dicts (no PyTorch)."""

import jax
import numpy as np
import pytest

from diffusets_jax.cli import main
from diffusets_jax.convert import clip_from_torch, vae_from_torch
from diffusets_jax.models.clip import CLIP
from diffusets_jax.models.model_dir import load_component, read_index
from diffusets_jax.models.vae import VAE
from tests.helpers.reference_weights import reference_state_dict, reference_vae_state_dict


def test_convert_writes_loadable_models(tmp_path, capsys):
    vae_sd = {f"{half}.{k}": v for half, sd in reference_vae_state_dict().items() for k, v in sd.items()}
    clip_sd = reference_state_dict("clip")
    np.savez(tmp_path / "vae_model.npz", **vae_sd)
    np.savez(tmp_path / "clip_model.npz", **clip_sd)
    out = tmp_path / "models"

    assert main(["convert", "--vae", str(tmp_path / "vae_model.npz"), "--clip", str(tmp_path / "clip_model.npz"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"vae: {tmp_path / 'vae_model.npz'} -> {out / 'vae'}" in printed
    assert "CLIP, 22,005,377 parameters" in printed

    for name, expected_module, (_, expected) in (("vae", VAE(), vae_from_torch(vae_sd)),
                                                 ("clip", CLIP(), clip_from_torch(clip_sd))):
        module, variables = load_component(out, name)
        assert module == expected_module
        assert jax.tree.structure(variables) == jax.tree.structure(expected)
        jax.tree.map(np.testing.assert_array_equal, variables, expected)
    index = read_index(out)
    assert set(index.components) == {"vae", "clip"} and index.conditioning is None  # no U-Net: no conditioning
    checkpoint = index.components["clip"]["provenance"]["checkpoint"]
    import hashlib

    assert checkpoint["sha256"] == hashlib.sha256((tmp_path / "clip_model.npz").read_bytes()).hexdigest()

    # Converting the same checkpoint again: this command's own output, left as it is.
    uid = index.components["clip"]["uid"]
    capsys.readouterr()
    assert main(["convert", "--clip", str(tmp_path / "clip_model.npz"), "--out", str(out)]) == 0
    assert "left as it is" in capsys.readouterr().out and read_index(out).components["clip"]["uid"] == uid
    # Another checkpoint into the same folder: the CLIP there is the user's, refused in one line before any work.
    np.savez(tmp_path / "clip_other.npz", **{**clip_sd, "ecg_projector.bias": clip_sd["ecg_projector.bias"] + 1})
    assert main(["convert", "--clip", str(tmp_path / "clip_other.npz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds clip/" in err[0] and "--overwrite" in err[0]
    assert read_index(out).components["clip"]["uid"] == uid
    assert main(["convert", "--clip", str(tmp_path / "clip_model.npz"), "--out", str(out), "--overwrite"]) == 0
    assert read_index(out).components["clip"]["uid"] != uid


def test_convert_needs_a_checkpoint(tmp_path, capsys):
    assert main(["convert", "--out", str(tmp_path)]) == 2
    assert "--vae, --unet, --clip" in capsys.readouterr().err


def test_convert_reports_a_missing_file_before_writing(tmp_path, capsys):
    np.savez(tmp_path / "vae_model.npz", x=np.zeros(1))
    assert main(["convert", "--vae", str(tmp_path / "vae_model.npz"), "--clip", str(tmp_path / "nope.pth"),
                 "--out", str(tmp_path / "models")]) == 2
    assert "nope.pth" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_convert_reports_a_wrong_checkpoint(tmp_path, capsys):
    np.savez(tmp_path / "clip_model.npz", **{"encoder.0.weight": np.zeros((3, 12, 3), np.float32)})
    assert main(["convert", "--clip", str(tmp_path / "clip_model.npz"), "--out", str(tmp_path / "models")]) == 2
    assert "CLIP checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--vae", "--unet", "--clip"])
def test_convert_help_lists_flags(capsys, flag):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert flag in capsys.readouterr().out


def test_a_truncated_or_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    np.savez(tmp_path / "vae_model.npz", x=np.zeros(1000))
    data = (tmp_path / "vae_model.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    (tmp_path / "model.pth").write_bytes(b"not a zip")
    for name in ("cut.npz", "bad.safetensors", "model.pth"):
        assert main(["convert", "--vae", str(tmp_path / name), "--out", str(tmp_path / "models")]) == 2
        err = capsys.readouterr().err.strip()
        assert name in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_a_unet_for_another_embedder_must_name_it(tmp_path, capsys):
    """A U-Net whose text input is not ada-002's 1536 needs its embedder named; the width is checked, not guessed."""
    from diffusets_jax.convert import unet_to_torch, vae_to_torch
    from tests.helpers.tiny_models import tiny_vae_unet

    _, _, unet, unet_vars = tiny_vae_unet(text_dim=16)
    np.savez(tmp_path / "unet.npz", **unet_to_torch(unet_vars))
    vae_vars = VAE(widths=(32, 32, 32), num_res_blocks=1).init(  # GroupNorm's 32 groups, as convert assumes
        jax.random.key(0), np.zeros((1, 1024, 12), np.float32), jax.random.key(1))
    np.savez(tmp_path / "vae.npz", **vae_to_torch(vae_vars))
    out = tmp_path / "models"
    # With a VAE beside it, the refusal came after the VAE was written: the rerun naming the embedder was then
    # refused as "already holds vae/".
    assert main(["convert", "--vae", str(tmp_path / "vae.npz"), "--unet", str(tmp_path / "unet.npz"),
                 "--out", str(out)]) == 2
    assert "takes 16-d text embeddings" in capsys.readouterr().err
    assert not out.exists()
    assert main(["convert", "--unet", str(tmp_path / "unet.npz"), "--out", str(out), "--embedder-model", "E-72B",
                 "--embedder-dim", "8192"]) == 2
    assert "does not match the U-Net's 16-d" in capsys.readouterr().err
    assert main(["convert", "--unet", str(tmp_path / "unet.npz"), "--out", str(out), "--embedder-model", "E-72B",
                 "--embedder-base-url", "http://127.0.0.1:9/v1"]) == 0
    embedder = read_index(out).conditioning.embedder
    assert (embedder.kind, embedder.model, embedder.dim, embedder.options) == (
        "openai", "E-72B", 16, {"base_url": "http://127.0.0.1:9/v1"})


def test_a_local_embedder_must_give_the_unets_width(tmp_path, capsys):
    """`--embedder-kind local` used to record the U-Net's width as the encoder's: the model directory converted,
    then its first `sample` failed (the default all-MiniLM-L6-v2 gives 384-d vectors)."""
    import json

    from diffusets_jax.convert import unet_to_torch
    from tests.helpers.tiny_models import tiny_vae_unet

    _, _, unet, unet_vars = tiny_vae_unet(text_dim=16)
    np.savez(tmp_path / "unet.npz", **unet_to_torch(unet_vars))
    out = tmp_path / "models"
    assert main(["convert", "--unet", str(tmp_path / "unet.npz"), "--out", str(out), "--embedder-kind", "local"]) == 2
    err = capsys.readouterr().err
    assert ("the default local encoder (all-MiniLM-L6-v2) gives 384-d vectors but this U-Net takes 16-d text "
            "embeddings") in err and len(err.splitlines()) == 1
    assert not out.exists()
    encoder = tmp_path / "encoder16"  # a sentence encoder of the U-Net's width: its config.json says so
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"hidden_size": 16, "num_attention_heads": 2}))
    assert main(["convert", "--unet", str(tmp_path / "unet.npz"), "--out", str(out), "--embedder-kind", "local",
                 "--embedder-model", str(encoder)]) == 0
    embedder = read_index(out).conditioning.embedder
    assert (embedder.kind, embedder.model, embedder.dim) == ("local", str(encoder), 16)


def test_unet_conditioning_flags_without_a_unet_are_refused(tmp_path, capsys):
    """They describe a U-Net's conditioning: with only --vae they were silently ignored."""
    np.savez(tmp_path / "vae.npz", **{f"{half}.{k}": v for half, sd in reference_vae_state_dict().items()
                                      for k, v in sd.items()})
    assert main(["convert", "--vae", str(tmp_path / "vae.npz"), "--out", str(tmp_path / "m"), "--embedder-model",
                 "E-72B", "--prompt-style", "free_text"]) == 2
    err = capsys.readouterr().err
    assert "--embedder-model, --prompt-style describe the conditioning of a U-Net: give --unet too" in err
    assert not (tmp_path / "m").exists()


def test_a_conversion_interrupted_between_components_is_finished_by_its_rerun(tmp_path, capsys, monkeypatch):
    """Killed after the VAE was written and before the CLIP, `convert` rerun as it was refused "already holds vae/,
    a converted vae: pass --overwrite", which would convert the VAE again under a new uid. The rerun now leaves the
    VAE it wrote as it is and writes the CLIP; another checkpoint for that VAE is still refused."""
    from diffusets_jax.models import model_dir as model_dirs

    vae_sd = {f"{half}.{k}": v for half, sd in reference_vae_state_dict().items() for k, v in sd.items()}
    np.savez(tmp_path / "vae_model.npz", **vae_sd)
    np.savez(tmp_path / "clip_model.npz", **reference_state_dict("clip"))
    out = tmp_path / "models"
    argv = ["convert", "--vae", str(tmp_path / "vae_model.npz"), "--clip", str(tmp_path / "clip_model.npz"),
            "--out", str(out)]
    write = model_dirs.write_component

    def killed_before_the_clip(directory, name, *args, **kwargs):
        if name == "clip":
            raise KeyboardInterrupt
        return write(directory, name, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(model_dirs, "write_component", killed_before_the_clip)
        assert main(argv) == 130
    vae_uid = read_index(out).components["vae"]["uid"]
    assert set(read_index(out).components) == {"vae"}
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "(converted by this same command before: left as it is)" in printed and "CLIP, 22,005,377" in printed
    assert set(read_index(out).components) == {"vae", "clip"} and read_index(out).components["vae"]["uid"] == vae_uid
    # Not this command's output: another VAE checkpoint is refused as before.
    np.savez(tmp_path / "other_vae.npz", **{k: v * 2 for k, v in vae_sd.items()})
    assert main(["convert", "--vae", str(tmp_path / "other_vae.npz"), "--out", str(out)]) == 2
    assert "already holds vae/, a converted vae" in capsys.readouterr().err
    assert read_index(out).components["vae"]["uid"] == vae_uid


@pytest.mark.slow
def test_a_unet_converted_after_its_vae_records_that_vae(tmp_path, capsys):
    """`convert --vae` then `convert --unet` into the same directory (README: "each flag is optional; components are
    added") recorded the U-Net with no VAE uid, so a VAE converted over it later was not refused at sampling, as it
    is when the two are converted in one command: the published U-Net's latents decoded by another VAE."""
    from diffusets_jax.convert import unet_to_torch, vae_to_torch
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import tiny_vae_unet

    _, _, unet, unet_vars = tiny_vae_unet(text_dim=16)
    np.savez(tmp_path / "unet.npz", **unet_to_torch(unet_vars))
    vae = VAE(widths=(32, 32, 32), num_res_blocks=1)  # GroupNorm's 32 groups, as convert assumes
    vae_vars = vae.init(jax.random.key(0), np.zeros((1, 1024, 12), np.float32), jax.random.key(1))
    np.savez(tmp_path / "vae.npz", **vae_to_torch(vae_vars))
    np.savez(tmp_path / "other_vae.npz", **vae_to_torch(jax.tree.map(lambda x: x * 0.5, vae_vars)))
    out = tmp_path / "models"
    assert main(["convert", "--vae", str(tmp_path / "vae.npz"), "--out", str(out)]) == 0
    assert main(["convert", "--unet", str(tmp_path / "unet.npz"), "--out", str(out), "--embedder-model", "E-72B"]) == 0
    index = read_index(out)
    assert index.components["unet"]["vae_uid"] == index.components["vae"]["uid"]
    assert main(["convert", "--vae", str(tmp_path / "other_vae.npz"), "--out", str(out), "--overwrite"]) == 0
    module_vae, _ = load_component(out, "vae")
    module_unet, _ = load_component(out, "unet")
    with pytest.raises(ValueError, match="the U-Net was trained on latents of VAE"):
        model_dirs.check_generation_parts(out, read_index(out), module_vae, module_unet)
    capsys.readouterr()


def test_a_checkpoint_given_to_another_flag_is_named_with_its_flag(tmp_path, capsys):
    """`--vae unet_all.pth` was refused with twenty of the U-Net's keys as "unexpected" (and `--unet vae_model.pth` as
    a U-Net missing a key), which did not say the file was fine and only given to the wrong flag."""
    from diffusets_jax.convert import unet_to_torch, vae_to_torch
    from tests.helpers.tiny_models import tiny_vae_unet

    _, vae_vars, _, unet_vars = tiny_vae_unet()
    np.savez(tmp_path / "unet.npz", **unet_to_torch(unet_vars))
    np.savez(tmp_path / "vae.npz", **vae_to_torch(vae_vars))
    np.savez(tmp_path / "clip.npz", **reference_state_dict("clip"))
    out = tmp_path / "models"
    for flag, name, right in (("--vae", "unet", "--unet"), ("--unet", "vae", "--vae"), ("--vae", "clip", "--clip"),
                              ("--clip", "unet", "--unet")):
        assert main(["convert", flag, str(tmp_path / f"{name}.npz"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"holds a DiffuSETS {name} checkpoint" in err, err
        assert err.endswith(f"give it as {right}")
    assert not out.exists()
    # A checkpoint of the right kind that does not fit keeps its own message.
    np.savez(tmp_path / "cut.npz", **{k: v for k, v in reference_state_dict("clip").items() if "ecg_projector" not in k})
    assert main(["convert", "--clip", str(tmp_path / "cut.npz"), "--out", str(out)]) == 2
    assert "CLIP checkpoint is missing ecg_projector.weight" in capsys.readouterr().err
