"""`diffusets-jax convert` end to end on .npz dumps of the parity-filled reference state dicts (no PyTorch)."""

import jax
import numpy as np
import pytest

from diffusets_jax.cli import main
from diffusets_jax.convert import clip_from_torch, vae_from_torch
from diffusets_jax.models.bundle import load_model
from diffusets_jax.models.clip import CLIP
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
        module, variables = load_model(out, name)
        assert module == expected_module
        assert jax.tree.structure(variables) == jax.tree.structure(expected)
        jax.tree.map(np.testing.assert_array_equal, variables, expected)


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
