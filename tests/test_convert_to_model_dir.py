"""`convert.to_model_dir.unet_conditioning`: what a converted U-Net is recorded as conditioned on."""

import pytest

from diffusets_jax.convert.to_model_dir import unet_conditioning


def test_an_endpoint_for_the_published_embedder_is_recorded():
    """`convert --unet unet_all.pth --embedder-base-url URL` (ada-002 behind a proxy) recorded the published
    ada-002 without the endpoint: the flag was dropped without a word whenever no model or kind was named."""
    spec = unet_conditioning(1536, base_url="http://proxy:8000/v1")
    assert (spec.embedder.kind, spec.embedder.model, spec.embedder.dim) == ("openai", "text-embedding-ada-002", 1536)
    assert spec.embedder.options == {"base_url": "http://proxy:8000/v1"}
    assert spec.embedder.embedder_id == unet_conditioning(1536).embedder.embedder_id  # the same vectors
    assert unet_conditioning(1536).embedder.options == {}


def test_an_embedder_width_is_checked_without_a_model_named():
    """`--embedder-dim 8192` on a 1536-d U-Net was dropped, and the U-Net recorded as taking ada-002's 1536."""
    with pytest.raises(ValueError, match="--embedder-dim 8192 does not match the U-Net's 1536-d"):
        unet_conditioning(1536, embedder_dim=8192)
    assert unet_conditioning(1536, embedder_dim=1536).embedder.dim == 1536


def test_the_openai_kind_without_a_model_is_ada_002_and_fits_only_its_width():
    """`--embedder-kind openai` alone on a 16-d U-Net recorded "text-embedding-ada-002" giving 16-d vectors, which
    ada-002 never gives: the model directory converted, and its first `sample` failed."""
    with pytest.raises(ValueError, match="not the published ada-002's 1536: name the model"):
        unet_conditioning(16, embedder_kind="openai")
    assert unet_conditioning(1536, embedder_kind="openai") == unet_conditioning(1536)


def test_an_endpoint_for_the_local_encoder_is_refused():
    with pytest.raises(ValueError, match="--embedder-base-url names an OpenAI-compatible endpoint"):
        unet_conditioning(384, embedder_kind="local", base_url="http://127.0.0.1:9/v1")


def test_a_local_encoder_folder_is_recorded_where_sample_finds_it(tmp_path, monkeypatch):
    """`convert --embedder-kind local --embedder-model ./encoder16` recorded "./encoder16" as given: `sample` run
    from another working directory looked for the encoder there and refused the model directory."""
    import json

    from diffusets_jax.models.text_encoder import sentence_encoder_width

    (tmp_path / "encoder16").mkdir()
    (tmp_path / "encoder16" / "config.json").write_text(json.dumps({"hidden_size": 16, "num_attention_heads": 2}))
    monkeypatch.chdir(tmp_path)
    spec = unet_conditioning(16, embedder_kind="local", embedder_model="./encoder16").embedder
    assert spec.options["model_dir"] == str(tmp_path / "encoder16") == spec.model
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert sentence_encoder_width(spec.options["model_dir"]) == 16


def test_a_unet_is_not_converted_beside_a_vae_trained_here(tmp_path):
    """`convert --unet` into a model directory whose VAE was trained here (not converted) wrote the published U-Net
    beside it: `sample` then decoded its latents with a VAE it was never trained with, without a word."""
    import numpy as np

    from diffusets_jax.convert.to_model_dir import convert_to_model_dir
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import tiny_vae_unet

    vae, vae_vars, _, _ = tiny_vae_unet()
    out = tmp_path / "models"
    model_dirs.write_component(out, "vae", vae, vae_vars, provenance={"source": "trained"})
    uid = model_dirs.read_index(out).components["vae"]["uid"]
    np.savez(tmp_path / "unet.npz", weight=np.zeros(2, np.float32))  # refused before it is read
    with pytest.raises(ValueError, match=rf"^--out {out} holds a trained VAE \(uid {uid}\), not the one the converted "
                                         "U-Net was trained with: give its VAE checkpoint with --vae"):
        convert_to_model_dir(out, unet=str(tmp_path / "unet.npz"))
    assert set(model_dirs.read_index(out).components) == {"vae"}
