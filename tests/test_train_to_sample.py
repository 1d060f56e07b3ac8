"""The path a user takes, with no copying: train vae --model-dir M, encode --vae M, train unet --model-dir M,
sample --model-dir M (tiny configs on the tiny prepared dataset; its embeddings are served by a fake endpoint)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from diffusets_jax.cli import main
from tests.helpers import tiny_ecg_dataset
from tests.helpers.fake_openai_server import FakeOpenAIServer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMON = ["--config.train.global_batch_size=8", "--config.train.num_steps=2", "--config.train.log_every=1",
          "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.train.checkpoint_every=2",
          "--config.train.progress_bar=false"]


@pytest.mark.slow
def test_train_encode_train_sample_through_one_model_directory(tmp_path, capsys):
    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    data_dir = os.path.dirname(os.path.dirname(builder.data_dir))
    models = tmp_path / "models"
    assert main(["train", "vae", "--config", str(CONFIGS / "demo_vae.py"), "--workdir", str(tmp_path / "vae"),
                 "--model-dir", str(models), f"--config.data.dataset={builder.data_dir}",
                 "--config.data.train_split=validation", "--config.data.val_split=test",
                 "--config.model.widths=(8,8,8)", "--config.model.groups=4", "--config.model.num_res_blocks=1",
                 *COMMON]) == 0
    assert main(["encode", "--vae", str(models), "--data-dir", data_dir, "--dataset", "tiny_ecg", "--out",
                 str(tmp_path / "latents"), "--batch-size", "8", "--splits", "validation", "test"]) == 0
    assert main(["train", "unet", "--config", str(CONFIGS / "demo_unet.py"), "--workdir", str(tmp_path / "unet"),
                 "--model-dir", str(models), f"--config.data.dataset={tmp_path / 'latents'}",
                 "--config.data.train_split=validation", "--config.data.val_split=test",
                 "--config.model.channels=(8,16)", "--config.model.down_attention_dims=(8,16)",
                 "--config.model.up_attention_dims=(32,16)", "--config.model.bottleneck_attention_dim=16",
                 f"--config.model.text_dim={tiny_ecg_dataset.EMBEDDING_DIM}", *COMMON]) == 0
    index = json.loads((models / "model_index.json").read_text())
    assert index["conditioning"]["embedder"]["model"] == f"fake-embedding-{tiny_ecg_dataset.EMBEDDING_DIM}"
    assert index["conditioning"]["patient_features"] == "normalised"
    assert index["components"]["unet"]["vae_uid"] == index["components"]["vae"]["uid"]
    unet_data = index["components"]["unet"]["provenance"]["dataset"]
    assert unet_data["kind"] == "latents" and unet_data["derived_from"]["dataset"]["name"] == "tiny_ecg"
    assert index["diffusion"]["scale_by_std"] and index["diffusion"]["latent_std"] == pytest.approx(1.0, rel=1e-3)
    # The fast samplers' defaults were checked at this model's latent mean and std, and the record says so.
    validated = {v["sampler"]: v for v in index["sampling"]["validated"]}
    assert validated["dpmpp_2m"]["passed"] and validated["dpmpp_2m"]["latent_std"] == pytest.approx(1.0, rel=1e-3)
    assert index["sampling"]["latent_std_source"].startswith("measured")
    # A U-Net cannot train on ECGs: the error says to encode first.
    assert main(["train", "unet", "--config", str(CONFIGS / "demo_unet.py"), "--workdir", str(tmp_path / "x"),
                 f"--config.data.dataset={builder.data_dir}"]) == 2
    assert "run `diffusets-jax encode" in capsys.readouterr().err
    with FakeOpenAIServer(dim=tiny_ecg_dataset.EMBEDDING_DIM) as server:
        os.environ.update(OPENAI_API_KEY="sk-test")
        try:
            assert main(["sample", "--model-dir", str(models), "--out", str(tmp_path / "samples"), "--text",
                         "Sinus rhythm|Normal ECG", "--sex", "F", "--age", "50", "--hr", "70", "-n", "2", "--steps",
                         "2", "--batch-size", "8", "--embedder-base-url", server.base_url, "--formats", "npz"]) == 0
        finally:
            os.environ.pop("OPENAI_API_KEY", None)
        assert server.models == [f"fake-embedding-{tiny_ecg_dataset.EMBEDDING_DIM}"]
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        assert data["ecg"].shape == (2, 1024, 12) and np.isfinite(data["ecg"]).all()
