"""The reconstruction study (experiments/reconstruction.py): baselines and scores against hand-made signals with known
answers, and `reconstruct-eval` end to end on the tiny prepared dataset with a tiny model directory."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.stats

from diffusets_jax.cli import main
from diffusets_jax.data.card import CARD_FILE
from diffusets_jax.experiments import reconstruction as rec
from tests.helpers import tiny_ecg_dataset
from tests.helpers.cli import exit_code
from tests.helpers.tiny_models import tiny_model_dir

LIMB = ("I", "II", "III", "aVR", "aVL", "aVF")


def _linear_ecgs(rng, n, slopes, offsets):
    """ECGs whose lead j is slopes[j] * lead I + offsets[j] exactly (lead I: random beats)."""
    lead_i = np.cumsum(rng.standard_normal((n, 1024)), axis=1) * 0.02
    return (lead_i[:, :, None] * slopes[None, None, :] + offsets[None, None, :]).astype(np.float64)


def test_linear_baseline_recovers_known_coefficients_and_copies_the_observed_lead():
    rng = np.random.default_rng(0)
    slopes, offsets = rng.uniform(-2, 2, 12), rng.uniform(-0.3, 0.3, 12)
    slopes[0], offsets[0] = 1.0, 0.0
    train = _linear_ecgs(rng, 20, slopes, offsets)
    train[3, 100, 5] = np.nan  # a record with a missing sample is left out of the fit
    weights = rec.fit_linear(train, ["I"])
    np.testing.assert_allclose(weights[0], slopes, atol=1e-8)
    np.testing.assert_allclose(weights[1], offsets, atol=1e-8)
    test = _linear_ecgs(rng, 4, slopes, offsets)
    np.testing.assert_allclose(rec.fill_baseline("linear", test, ["I"], weights=weights), test, atol=1e-5)
    zeros = rec.fill_baseline("zeros", test, ["I"])
    np.testing.assert_array_equal(zeros[:, :, 0], test[:, :, 0].astype(np.float32))
    assert not zeros[:, :, 1:].any()
    mean = rec.fill_baseline("train_mean", test, ["I"], train_mean=np.full((1024, 12), 0.5))
    assert np.all(mean[:, :, 1:] == 0.5) and np.allclose(mean[:, :, 0], test[:, :, 0])


def test_lead_scores_match_direct_rmse_and_scipy_pearson():
    rng = np.random.default_rng(1)
    truth = rng.standard_normal((5, 1024, 12))
    prediction = truth + 0.3 * rng.standard_normal((5, 1024, 12))
    prediction[:, :, 4] = 0.0  # constant: correlation undefined
    scores = rec.lead_scores(prediction, truth)
    for lead in range(12):
        expected_rmse = np.sqrt(sum(((prediction[i, :, lead] - truth[i, :, lead]) ** 2).sum() for i in range(5))
                                / (5 * 1024))
        assert scores["rmse_mv"][lead] == pytest.approx(expected_rmse, rel=1e-9)
        if lead == 4:
            assert scores["correlation"][lead] is None
        else:
            expected_r = np.mean([scipy.stats.pearsonr(prediction[i, :, lead], truth[i, :, lead])[0] for i in range(5)])
            assert scores["correlation"][lead] == pytest.approx(expected_r, rel=1e-9)
    summary = rec.summarize(scores, ["I"])
    assert summary["rmse_mv"] == pytest.approx(np.mean(scores["rmse_mv"][1:]))
    assert summary["correlation"] == pytest.approx(np.mean([r for r in scores["correlation"][1:] if r is not None]))


def test_baselines_only_study_ranks_linear_above_the_mean_and_zeros():
    rng = np.random.default_rng(2)
    slopes, offsets = rng.uniform(-2, 2, 12), np.zeros(12)
    slopes[0] = 1.0
    train = _linear_ecgs(rng, 30, slopes, offsets) + 0.01 * rng.standard_normal((30, 1024, 12))
    test_ecg = _linear_ecgs(rng, 6, slopes, offsets) + 0.01 * rng.standard_normal((6, 1024, 12))
    test = {"ecg": test_ecg, "heart_rate": np.full(6, 70.0), "subject_id": np.arange(6), "prompt": ["x"] * 6}
    report = rec.reconstruction_study(None, train, test, n_boot=10)
    for task in rec.TASKS:
        methods = report["tasks"][task]["methods"]
        assert set(methods) == set(rec.BASELINES)
        rmse = {name: row["unobserved_mean"]["rmse_mv"] for name, row in methods.items()}
        assert rmse["linear"] < 0.02 < rmse["zeros"] and rmse["linear"] < rmse["train_mean"]
        assert methods["zeros"]["unobserved_mean"]["correlation"] is None
    assert "| linear |" in rec.render_markdown(report)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_ecg_dataset.build(str(tmp_path_factory.mktemp("tfds")))


@pytest.mark.slow
def test_reconstruct_eval_command_on_tiny_data(dataset, tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model", text_dim=tiny_ecg_dataset.EMBEDDING_DIM)
    out = tmp_path / "out"
    args = ["reconstruct-eval", "--model-dir", str(model), "--dataset", dataset.data_dir, "--out", str(out),
            "--limit", "4", "--steps", "2", "--particles", "2", "--batch-size", "8", "--n-boot", "20"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert report["n_test"] == 4 and printed["n_test"] == 4
    for task, observed in rec.TASKS.items():
        result = report["tasks"][task]
        assert result["observed"] == list(observed)
        assert set(result["methods"]) == {"posterior", *rec.BASELINES}
        assert all(np.isfinite(result["methods"]["posterior"]["rmse_mv"]))
        assert {row["metric"] for row in result["methods"]["posterior"]["clinical"]} >= {"qrs_f1", "heart_rate_mae"}
    # Every tiny-dataset lead is a multiple of one sine, so regression from clean limb leads is near exact.
    limb = report["tasks"]["limb_leads"]["methods"]
    assert limb["linear"]["unobserved_mean"]["rmse_mv"] < 0.5 * limb["zeros"]["unobserved_mean"]["rmse_mv"]
    assert "### limb_leads: observed " + ", ".join(LIMB) in (out / "report.md").read_text()
    assert main(args) == 0  # the finished run is returned, not redone
    assert exit_code([*args[:-2], "--n-boot", "0", "--overwrite"]) == 2
    assert "argument --n-boot: must be a whole number >= 1" in capsys.readouterr().err
    # A dataset embedded by another model of the same width: the posterior used to condition on it unchecked.
    other = tmp_path / "other_embedder"
    shutil.copytree(dataset.data_dir, other)
    card = json.loads((other / CARD_FILE).read_text())
    card["conditioning"]["embedder"].update(model="another-embedding-8", embedder_id="")
    (other / CARD_FILE).write_text(json.dumps(card))
    assert exit_code(["reconstruct-eval", "--model-dir", str(model), "--dataset", str(other), "--out",
                      str(tmp_path / "other_out"), "--limit", "4", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "'another-embedding-8'" in err and "but the U-Net of --model-dir" in err and err.count("\n") == 1
    assert not (tmp_path / "other_out").exists()


def test_reconstruct_eval_refuses_posterior_settings_for_the_baselines_alone(tmp_path, capsys):
    """Without --model-dir only the baselines run: `--particles 32 --steps 1000` were ignored with exit 0, and the
    report then listed the noise level given as if it had been used."""
    args = ["reconstruct-eval", "--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    for flags, named in ((["--particles", "32", "--steps", "1000"], "--steps, --particles set the model's"),
                         (["--noise-std", "0.1"], "--noise-std sets the model's"),
                         (["--batch-size", "4"], "--batch-size sets the model's")):
        assert main([*args, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and "add --model-dir DIR" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_reconstruct_eval_refuses_bad_settings_before_loading(tmp_path, capsys):
    args = ["reconstruct-eval", "--model-dir", str(tmp_path / "models"), "--dataset", str(tmp_path / "none"),
            "--out", str(tmp_path / "out")]
    assert main([*args, "--noise-std", "0"]) == 2
    assert "--noise-std must be > 0" in capsys.readouterr().err
    assert exit_code([*args, "--particles", "0"]) == 2
    assert "argument --particles: must be a whole number >= 1" in capsys.readouterr().err
    # From Python a limit of 0 passed as "no limit" (`limit or 1`): load_split then read the whole split
    for name in ("limit", "train_limit"):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be >= 1, got 0"):
            rec.reconstruct_eval(None, tmp_path / "none", tmp_path / "out", **{name: 0})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("splits,expected", [
    (("validation", "validation"), "--train-split and --test-split are both 'validation': the regression and mean "
                                   "baselines would be fitted on the records they are scored on"),
    (("all", "test"), "--train-split all: dataset 'tiny_ecg' has no such split"),
    (("train", "tset"), "--test-split tset: dataset 'tiny_ecg' has no such split"),
])
def test_the_baselines_are_never_fitted_on_the_records_they_are_scored_on(dataset, tmp_path, capsys, splits,
                                                                         expected):
    """The same split (or `all`, which holds the test records) for both ran, and scored baselines fitted on their
    own test records; a split the dataset lacks was found after --out was claimed."""
    out = tmp_path / "out"
    assert main(["reconstruct-eval", "--dataset", dataset.data_dir, "--train-split", splits[0], "--test-split",
                 splits[1], "--out", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_a_dataset_prepared_again_at_the_same_path_is_another_input(dataset, tmp_path, capsys):
    """The finished run was recognised by the dataset's path alone: after `prepare --overwrite` rebuilt it from other
    records, the same command returned the old report. The dataset card's fingerprint is now in the settings."""
    import json
    import shutil

    from diffusets_jax.data.card import CARD_FILE

    copy = shutil.copytree(dataset.data_dir, tmp_path / "dataset")
    out = tmp_path / "out"
    args = ["reconstruct-eval", "--dataset", str(copy), "--out", str(out), "--limit", "4", "--train-limit", "8",
            "--n-boot", "20"]
    assert main(args) == 0 and main(args) == 0  # the finished run, returned
    card = json.loads((copy / CARD_FILE).read_text())
    (copy / CARD_FILE).write_text(json.dumps({**card, "derived_from": {"records_fingerprint": "another build"}}))
    capsys.readouterr()
    assert exit_code(args) == 2
    assert "holds an earlier reconstruct-eval run with other settings (dataset_card: " in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_written_again_into_the_same_directory_is_another_input(dataset, tmp_path, capsys):
    """The finished run was recognised by the model directory's path alone: after a U-Net was trained again into it,
    the same command returned the old model's report. The components' uids are now in the settings."""
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import tiny_vae_unet

    model = tiny_model_dir(tmp_path / "model", text_dim=tiny_ecg_dataset.EMBEDDING_DIM)
    out = tmp_path / "out"
    args = ["reconstruct-eval", "--model-dir", str(model), "--dataset", dataset.data_dir, "--out", str(out),
            "--limit", "1", "--train-limit", "8", "--steps", "1", "--particles", "1", "--batch-size", "1",
            "--n-boot", "2"]
    assert main(args) == 0
    index = model_dirs.read_index(model)
    entry = index.components["unet"]
    _, _, unet, unet_vars = tiny_vae_unet(tiny_ecg_dataset.EMBEDDING_DIM)
    model_dirs.write_component(model, "unet", unet, unet_vars, provenance={"source": "test"},
                               conditioning=index.conditioning, diffusion=index.diffusion, vae_uid=entry["vae_uid"],
                               overwrite=True)
    assert model_dirs.read_index(model).components["unet"]["uid"] != entry["uid"]
    capsys.readouterr()
    assert exit_code(args) == 2
    err = capsys.readouterr().err
    assert "holds an earlier reconstruct-eval run with other settings (components.unet: " in err, err


def test_a_latent_dataset_is_refused_pointing_at_prepare_alone(tmp_path, capsys):
    """The refusal of a latent --dataset told the user to give one `prepare` or `sample --corpus` wrote, but
    reconstruct-eval scores recorded ECGs and refuses a corpus next: only `prepare` is the remedy."""
    from tests.helpers.gaussian_latents import write_gaussian_latent_dataset
    from tests.helpers.tiny_models import openai_conditioning

    latents = write_gaussian_latent_dataset(tmp_path / "latents", splits={"train": 4, "test": 4},
                                            conditioning=openai_conditioning(), vae_uid=None, latent_scale=0.18215,
                                            channel_mean=(0.0,) * 4, channel_std=(0.2,) * 4)
    out = tmp_path / "out"
    assert exit_code(["reconstruct-eval", "--dataset", str(latents), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a prepared ECG dataset (a latent dataset" in err and err.count("\n") == 1, err
    assert "give one `diffusets-jax prepare` wrote" in err and "--corpus" not in err, err
    assert not out.exists()


def test_a_flat_lead_is_no_truth_to_score_against():
    """A record with a disconnected electrode (`prepare` keeps it: Chapman-Shaoxing's JS20004, in the bundled data's
    validation split, has all-zero V2/V4/V6) was scored as if the flat line were the lead: zeros were rewarded with a
    perfect V2 and any real reconstruction penalised. Its flat leads are now left out of their scores, a record whose
    observed lead is flat is left out of that task, and a training record with a flat lead fits no baseline; each is
    counted."""
    rng = np.random.default_rng(3)
    slopes, offsets = rng.uniform(0.5, 2, 12), np.zeros(12)
    slopes[0] = 1.0
    train = _linear_ecgs(rng, 30, slopes, offsets)
    train[:3, :, 7] = 0.0  # all-zero V2 in three training records
    truth = _linear_ecgs(rng, 6, slopes, offsets)
    truth[0, :, [7, 9, 11]] = 0.0  # JS20004's V2, V4, V6
    truth[1, :, 0] = 0.0  # lead I disconnected: nothing to reconstruct lead I's task from
    perfect = truth.copy()
    perfect[0, :, [7, 9, 11]] = truth[2, :, [7, 9, 11]]  # a reconstruction with the amplitude a real V2 has
    scores = rec.lead_scores(perfect, truth)
    assert scores["rmse_mv"][7] == pytest.approx(0.0, abs=1e-12) and scores["correlation"][7] == pytest.approx(1.0)
    zeros = rec.lead_scores(np.zeros_like(truth), truth)
    assert zeros["rmse_mv"][7] == pytest.approx(np.sqrt(np.mean(truth[1:, :, 7] ** 2)))
    test = {"ecg": truth, "heart_rate": np.full(6, 70.0), "subject_id": np.arange(6), "prompt": ["x"] * 6}
    report = rec.reconstruction_study(None, train, test, n_boot=10)
    assert (report["n_train"], report["n_train_left_out"]) == (27, 3)
    lead_i = report["tasks"]["lead_I"]
    assert (lead_i["n_records"], lead_i["n_left_out_flat_observed"], lead_i["n_flat_leads_not_scored"]) == (5, 1, 3)
    assert report["tasks"]["limb_leads"]["n_records"] == 5
    linear = lead_i["methods"]["linear"]  # exact on every recorded lead: the flat V2s neither fit nor score it
    assert max(linear["rmse_mv"]) < 1e-6 and linear["unobserved_mean"]["rmse_mv"] < 1e-6
    assert "1 left out: an observed lead is flat" in rec.render_markdown(report)
