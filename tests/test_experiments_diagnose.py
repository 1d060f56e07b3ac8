"""`diffusets-jax diagnose`: fixed-noise denoising error against closed-form references, terminal latent statistics.

The plumbing is proved with stand-in networks whose answers are known: an oracle returning the exact optimal
output for Gaussian latents must score at the Gaussian reference, one returning the data mean at the data-mean
reference, and a zero epsilon network at its hand-computed error.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax import parallel
from diffusets_jax.cli import main
from diffusets_jax.conditioning.spec import ConditioningSpec
from diffusets_jax.diffusion.samplers import sampler_config
from diffusets_jax.diffusion.schedule import DiffusionSpec, ScheduleConfig, make_schedule
from diffusets_jax.experiments import diagnose as dg
from diffusets_jax.io.files import write_json_atomic
from diffusets_jax.models import model_dir as model_dirs
from diffusets_jax.models.unet import UNet
from diffusets_jax.models.vae import VAE
from tests.helpers.cli import exit_code
from tests.helpers.gaussian_latents import gaussian_latents, write_gaussian_latent_dataset
from tests.helpers.tiny_models import TEXT_DIM, openai_conditioning, tiny_model_dir

CHANNEL_MEAN = (0.3, -0.2, 0.0, 0.1)
CHANNEL_STD = (1.0, 0.5, 2.0, 0.8)
TIMESTEPS = (1, 50, 250, 500, 998)


class Oracle(nn.Module):
    """The exact network output for latents whose elements are independent N(mean_c, var_c): the x0 of `kind`
    ("gaussian": the posterior mean E[x0 | x_t]; "data_mean": mean_c) written as `prediction_type`'s output.
    Computed here from the forward process, independently of experiments.diagnose."""

    mean: tuple[float, ...]
    var: tuple[float, ...]
    prediction_type: str = "epsilon"
    kind: str = "gaussian"
    text_dim: int = TEXT_DIM

    def __call__(self, x_t, t, text, sex, age, heart_rate):
        abar = make_schedule().alphas_cumprod[t][:, None, None]
        a, b = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        m, v = jnp.asarray(self.mean), jnp.asarray(self.var)
        if self.kind == "gaussian":
            # x0 and x_t = a x0 + b eps are jointly Gaussian: E[x0 | x_t] = m + Cov(x0, x_t) / Var(x_t) (x_t - a m).
            x0 = m + (a * v) / (a * a * v + b * b) * (x_t - a * m)
        else:
            x0 = jnp.broadcast_to(m, x_t.shape)
        if self.prediction_type == "epsilon":
            return (x_t - a * x0) / b
        return (a * x_t - x0) / b  # v, since x0 = a x_t - b v


class Diverged(nn.Module):
    """A model whose training diverged: every output is NaN."""

    text_dim: int = TEXT_DIM

    def __call__(self, x_t, t, text, sex, age, heart_rate):
        return jnp.full_like(x_t, jnp.nan)


class Zero(nn.Module):
    text_dim: int = TEXT_DIM

    def __call__(self, x_t, t, text, sex, age, heart_rate):
        return jnp.zeros_like(x_t)


def condition_arrays(n: int, text_dim: int = TEXT_DIM) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"text_embedding": rng.standard_normal((n, text_dim)).astype(np.float32),
            "sex": (np.arange(n) % 2).astype(np.float32), "age": np.full(n, 0.5, np.float32),
            "heart_rate": np.full(n, 0.7, np.float32)}


def latent_split(n: int, latent_scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A latent split (load_latent_split's arrays) whose scaled latents are the test's Gaussians."""
    scaled = gaussian_latents(n, CHANNEL_MEAN, CHANNEL_STD, seed)
    return {"latent_mean": scaled / np.float32(latent_scale), "latent_logvar": np.full(scaled.shape, -30.0, np.float32),
            **condition_arrays(n)}


# ----------------------------------------------------------------------------------------------------------
# Closed-form references


def test_reference_predictors_are_the_closed_forms_and_the_gaussian_one_is_optimal():
    n = 64
    z0 = gaussian_latents(n, CHANNEL_MEAN, CHANNEL_STD, seed=1).astype(np.float64)
    noise = np.random.default_rng(2).standard_normal(z0.shape)
    mean, var = dg.channel_moments(z0)
    np.testing.assert_allclose(mean, z0.reshape(-1, 4).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, ((z0 - mean) ** 2).reshape(-1, 4).mean(axis=0), rtol=1e-12)
    abar_table = np.asarray(make_schedule().alphas_cumprod, np.float64)
    for t in (10, 500, 998):
        abar = abar_table[t]
        x_t = np.sqrt(abar) * z0 + np.sqrt(1 - abar) * noise
        # By hand: shrink x_t / sqrt(abar) towards the mean with weight SNR var / (SNR var + 1), SNR = abar / (1 - abar).
        snr = abar / (1 - abar)
        weight = snr * var / (snr * var + 1)
        by_hand = mean + weight * (x_t / np.sqrt(abar) - mean)
        gauss = np.asarray(dg.gaussian_x0(jnp.asarray(x_t, jnp.float32), jnp.float32(abar), jnp.asarray(mean, jnp.float32),
                                          jnp.asarray(var, jnp.float32)))
        np.testing.assert_allclose(gauss, by_hand, rtol=2e-4, atol=2e-4 * np.sqrt(var.max()))
        trivial = np.asarray(dg.data_mean_x0(jnp.asarray(x_t, jnp.float32), abar, jnp.asarray(mean, jnp.float32), None))
        np.testing.assert_allclose(trivial, np.broadcast_to(mean, z0.shape), rtol=1e-6)
        # Expected errors on Gaussian data (n x 128 samples per channel: within a few per cent).
        mse = lambda x0_hat: ((x0_hat - z0) ** 2).reshape(-1, 4).mean(axis=0)
        np.testing.assert_allclose(mse(by_hand), var * (1 - abar) / (abar * var + 1 - abar), rtol=0.05)
        np.testing.assert_allclose(mse(trivial), var, rtol=1e-6)
        # Optimal among shrinkages: more or less shrinkage is worse.
        for factor in (0.8, 1.25):
            other = mean + np.clip(weight * factor, 0, 1) * (x_t / np.sqrt(abar) - mean)
            assert mse(other).sum() > mse(by_hand).sum()


# ----------------------------------------------------------------------------------------------------------
# The MSE plumbing, with networks whose errors are known


@pytest.fixture(scope="module")
def plumbing():
    mesh = parallel.local_mesh()
    n = 20  # not a multiple of the batch: padding rows must not count
    z0 = gaussian_latents(n, CHANNEL_MEAN, CHANNEL_STD, seed=3)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(5), z0.shape, jnp.float32))
    mean, var = dg.channel_moments(z0)
    return mesh, z0, noise, mean, var


def errors_of(module, prediction_type, plumbing):
    mesh, z0, noise, mean, var = plumbing
    schedule = make_schedule(ScheduleConfig(prediction_type=prediction_type))
    fn = dg.denoising_error_fn(module, schedule, mesh)
    return dg.denoising_errors(fn, {}, schedule, z0, noise, condition_arrays(len(z0)), TIMESTEPS, mean=mean, var=var,
                               batch_size=16, mesh=mesh)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_an_oracle_scores_exactly_at_the_gaussian_reference_and_a_mean_network_at_the_data_mean(
        plumbing, prediction_type):
    _, z0, noise, mean, var = plumbing
    oracle = Oracle(tuple(mean.tolist()), tuple(var.tolist()), prediction_type)
    for row in errors_of(oracle, prediction_type, plumbing):
        for kind in ("x0_mse", "eps_mse", "x0_mse_per_channel", "eps_mse_per_channel"):
            np.testing.assert_allclose(row["unet"][kind], row["gaussian"][kind], rtol=2e-3, err_msg=f"t={row['t']}")
        if row["t"] <= 500:  # near T the two differ by abar var^2, less than this sample's noise
            assert row["gaussian"]["x0_mse"] < row["data_mean"]["x0_mse"]
        # Data mean by hand: its x0-MSE is the per-channel variance, whatever t.
        np.testing.assert_allclose(row["data_mean"]["x0_mse_per_channel"], var, rtol=1e-4)
    mean_net = Oracle(tuple(mean.tolist()), tuple(var.tolist()), prediction_type, kind="data_mean")
    for row in errors_of(mean_net, prediction_type, plumbing):
        for kind in ("x0_mse", "eps_mse"):
            np.testing.assert_allclose(row["unet"][kind], row["data_mean"][kind], rtol=2e-3, err_msg=f"t={row['t']}")


def test_a_zero_epsilon_network_scores_its_hand_computed_error(plumbing):
    """eps-hat = 0: eps-MSE is the mean square of the noise; x0-hat = x_t / sqrt(abar), off by the noise times
    sqrt((1 - abar) / abar)."""
    _, z0, noise, _, _ = plumbing
    noise_power = (noise.astype(np.float64) ** 2).reshape(-1, 4).mean(axis=0)
    abar = np.asarray(make_schedule().alphas_cumprod, np.float64)
    for row in errors_of(Zero(), "epsilon", plumbing):
        np.testing.assert_allclose(row["unet"]["eps_mse_per_channel"], noise_power, rtol=1e-5)
        expected = (1 - abar[row["t"]]) / abar[row["t"]] * noise_power
        np.testing.assert_allclose(row["unet"]["x0_mse_per_channel"], expected, rtol=1e-3)
        assert row["alpha_bar"] == pytest.approx(abar[row["t"]], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Terminal statistics


def test_terminal_statistics_match_numpy_and_flag_what_is_off():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 0.5, (30, 128, 4))
    stats = dg.latent_statistics(reference)
    flat = reference.reshape(-1, 4)
    assert stats["mean"] == pytest.approx(flat.mean()) and stats["std"] == pytest.approx(flat.std())
    assert stats["min"] == flat.min() and stats["max"] == flat.max()
    np.testing.assert_allclose(stats["per_channel"]["std"], flat.std(axis=0))
    np.testing.assert_allclose(stats["per_channel"]["mean"], flat.mean(axis=0))
    np.testing.assert_allclose(stats["per_channel"]["max"], flat.max(axis=0))

    same = dg.compare_statistics(dg.latent_statistics(reference), stats)
    assert same["std_ratio"] == pytest.approx(1.0) and same["flags"] == []
    generated = reference * 3.0
    generated[..., 2] += 2.0  # channel 2 also shifted by 4 reference stds (its std is now 1.5)
    wide = dg.compare_statistics(dg.latent_statistics(generated), stats, tolerance=1.5)
    np.testing.assert_allclose(wide["per_channel"]["std_ratio"], 3.0, rtol=1e-9)
    assert wide["per_channel"]["mean_offset_in_std"][2] == pytest.approx(
        (generated[..., 2].mean() - flat[:, 2].mean()) / flat[:, 2].std())
    flagged = {(f["where"], f["measure"]) for f in wide["flags"]}
    assert {("overall", "std_ratio"), ("channel 0", "std_ratio"), ("channel 2", "mean_offset_in_std")} <= flagged
    assert ("channel 0", "mean_offset_in_std") not in flagged


# ----------------------------------------------------------------------------------------------------------
# End to end on arrays: a perfect model passes, a zero network fails


def test_diagnosis_passes_the_optimal_model_and_fails_an_untrained_one():
    n, scale = 24, 0.5
    data = latent_split(n, scale)
    z0 = data["latent_mean"] * scale
    mean, var = dg.channel_moments(z0)
    spec = DiffusionSpec(schedule=ScheduleConfig(prediction_type="v_prediction"), latent_scale=scale,
                         clip_sample=False)
    sampler = sampler_config("ddim", steps=25)
    oracle = Oracle(tuple(mean.tolist()), tuple(var.tolist()), "v_prediction")
    results, latents = dg.diagnose_unet(oracle, {}, data, diffusion=spec, patient_features="normalised",
                                        timesteps=(50, 998), sampler=sampler, batch_size=16)
    status = {(c["mode"], c["check"]): c["status"] for c in results["verdict"]["checks"]}
    assert status[("conditional", "denoising beats predicting the data mean at every t")] == "pass"
    # The data are Gaussian: the oracle is the Gaussian predictor, and nothing more can be learned.
    assert status[("conditional", "at t = 50 denoising beats the per-channel Gaussian predictor")] == "warn"
    terminal = results["terminal"]
    assert 0.85 < terminal["conditional"]["against_training"]["std_ratio"] < 1.15, terminal["conditional"]
    np.testing.assert_allclose(terminal["conditional"]["against_training"]["per_channel"]["std_ratio"], 1.0, atol=0.15)
    assert terminal["training"]["per_channel"]["std"] == pytest.approx(list(CHANNEL_STD), rel=0.05)
    np.testing.assert_allclose(latents["training"], z0, atol=1e-5)  # logvar -30: draws are the means
    assert latents["generated/conditional"].shape == (n, 128, 4)

    eps_spec = DiffusionSpec(latent_scale=scale, clip_sample=False)
    results, _ = dg.diagnose_unet(Zero(), {}, data, diffusion=eps_spec, patient_features="normalised",
                                  timesteps=(50, 998), sampler=sampler, batch_size=16, with_unconditional=True)
    assert results["verdict"]["overall"] == "fail"
    failed = {(c["mode"], c["check"]) for c in results["verdict"]["checks"] if c["status"] == "fail"}
    for mode in ("conditional", "unconditional"):
        assert (mode, "denoising beats predicting the data mean at every t") in failed
        assert (mode, "terminal latent std / training std") in failed
    # DDIM with eps-hat = 0 only rescales the start: x_0 = x_T / sqrt(abar_T), a spread ~25x the N(0, 1) start.
    assert results["terminal"]["conditional"]["std"] > 10


def test_a_diverged_model_fails_every_check_and_its_report_is_strict_json(tmp_path):
    """NaN compares false with everything: checks written as `error > reference` passed a model that returns NaN,
    and report.json held NaN tokens that jq and JavaScript refuse."""
    data = latent_split(12, 0.5)
    results, _ = dg.diagnose_unet(Diverged(), {}, data, diffusion=DiffusionSpec(latent_scale=0.5, clip_sample=False),
                                  patient_features="normalised", timesteps=(50, 998),
                                  sampler=sampler_config("ddim", steps=3), batch_size=16)
    status = {c["check"]: c["status"] for c in results["verdict"]["checks"]}
    assert status.pop("terminal latent range / training range") == "warn"  # a range is only ever a warning
    assert set(status.values()) == {"fail"}, status
    assert results["verdict"]["overall"] == "fail" and results["verdict"]["summary"].startswith("diverged")
    finite_check = next(c for c in results["verdict"]["checks"] if c["check"] == "the U-Net's outputs are finite")
    assert "t = 50" in finite_check["detail"] and "conditional sampled latents" in finite_check["detail"]

    write_json_atomic(tmp_path / "report.json", results)
    def refuse(token):
        raise AssertionError(f"report.json holds the non-standard token {token}")

    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert report["terminal"]["conditional"]["std"] is None


# ----------------------------------------------------------------------------------------------------------
# The command, on a model directory and a latent dataset on disk


def dataset_conditioning() -> ConditioningSpec:
    return ConditioningSpec(openai_conditioning(TEXT_DIM).embedder, "ordered")


def latent_dataset(path, model_dir):
    """Gaussian latents whose card names the model directory's VAE and the U-Net's embedder."""
    vae_uid = model_dirs.read_index(model_dir).components["vae"]["uid"]
    return write_gaussian_latent_dataset(path, splits={"train": 16, "validation": 12},
                                         conditioning=dataset_conditioning(), vae_uid=vae_uid, latent_scale=0.18215,
                                         channel_mean=(0.0,) * 4, channel_std=(0.2,) * 4)


@pytest.fixture(scope="module")
def index_only_model_dir(tmp_path_factory):
    """A model directory whose index records a VAE and a U-Net as `tiny_model_dir`'s does, with placeholder weights
    (initialising real ones takes minutes on a busy machine): bad inputs are refused before any weight is read."""
    path = tmp_path_factory.mktemp("index_only")
    placeholder = {"params": {"w": np.zeros(1, np.float32)}}
    model_dirs.write_component(path, "vae", VAE(widths=(16, 16, 16), groups=4, num_res_blocks=1), placeholder,
                               provenance={"source": "test"})
    unet = UNet(channels=(8, 16), down_attention_dims=(8, 16), bottleneck_attention_dim=16, up_attention_dims=(32, 16),
                num_heads=2, bottleneck_heads=2, text_dim=TEXT_DIM)
    model_dirs.write_component(path, "unet", unet, placeholder, provenance={"source": "test"},
                               conditioning=openai_conditioning(TEXT_DIM), diffusion=DiffusionSpec(),
                               vae_uid=model_dirs.read_index(path).components["vae"]["uid"])
    return path


@pytest.fixture(scope="module")
def latents_dir(index_only_model_dir, tmp_path_factory):
    return latent_dataset(tmp_path_factory.mktemp("latents"), index_only_model_dir)


@pytest.mark.slow  # initialises and compiles the tiny U-Net (minutes on 2 busy cores)
def test_diagnose_command_writes_report_plot_and_resumes(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path / "model")
    latents_dir = latent_dataset(tmp_path / "latents", model_dir)
    out = tmp_path / "diag"
    argv = ["diagnose", "--model-dir", str(model_dir), "--latents", str(latents_dir), "--n", "10", "--timesteps",
            "998,50", "--sampler", "ddim", "--steps", "2", "--batch-size", "8", "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed["verdict"] == report["verdict"]["overall"]
    assert report["n"] == 10 and report["timesteps"] == [50, 998]
    assert [r["t"] for r in report["denoising"]["conditional"]] == [50, 998]
    assert "unconditional" not in report["denoising"]  # the tiny U-Net was not trained with condition dropout
    assert report["latents"]["split"] == "validation" and report["latents"]["n_used"] == 10
    assert report["latents"]["derived_from"]["vae"]["uid"] == report["model"]["unet"]["vae_uid"]
    assert report["settings"]["sampler"]["sampler"] == "ddim" and report["warnings"] == []
    # The references depend only on the data: the data-mean x0-MSE is the latents' per-channel variance.
    np.testing.assert_allclose(report["denoising"]["conditional"][0]["data_mean"]["x0_mse_per_channel"],
                               report["reference_moments"]["var"], rtol=1e-4)
    assert report["terminal"]["training"]["std"] == pytest.approx(0.2, rel=0.1)
    assert (out / "diagnose.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "report.md").read_text()
    assert "**Verdict:" in markdown and "| conditional | denoising beats predicting the data mean" in markdown
    # The same command again returns the finished report without recomputing it.
    assert main(argv) == 0
    assert json.loads((out / "report.json").read_text()) == report


def test_a_unet_replaced_while_the_latents_load_is_not_diagnosed_under_the_old_uid(tmp_path, capsys, monkeypatch):
    """The index is read first (its uids in the run's settings, its diffusion and conditioning used with the
    weights), the U-Net's weights only after the latents: a `train unet` or `convert` finishing into the directory
    in between had its U-Net diagnosed with the replaced one's settings and recorded under the old uid."""
    from tests.helpers.tiny_models import replace_unet

    model_dir = tiny_model_dir(tmp_path / "model")
    latents_dir = latent_dataset(tmp_path / "latents", model_dir)
    load = dg.load_latent_split

    def load_while_another_run_exports(*args, **kwargs):
        replace_unet(model_dir)
        return load(*args, **kwargs)

    monkeypatch.setattr(dg, "load_latent_split", load_while_another_run_exports)
    out = tmp_path / "diag"
    err = run_bad(["--model-dir", str(model_dir), "--latents", str(latents_dir), "--n", "4", "--timesteps", "998",
                   "--sampler", "ddim", "--steps", "2", "--batch-size", "8", "--out", str(out)], capsys)
    assert f"--model-dir {model_dir}: its unet/ was replaced since this run read it" in err
    assert not out.exists()


@pytest.fixture()
def no_weights(monkeypatch):
    """Bad inputs must be refused before any weights are read."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr(model_dirs, "load_component", refuse)


def run_bad(argv, capsys) -> str:
    assert exit_code(["diagnose", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("diffusets-jax diagnose: error: ")
    return err


def test_bad_inputs_are_one_line_each(index_only_model_dir, latents_dir, tmp_path, capsys, no_weights):
    model_dir = index_only_model_dir
    base = ["--model-dir", str(model_dir), "--latents", str(latents_dir), "--out", str(tmp_path / "o")]
    (tmp_path / "no_unet").mkdir()
    assert "has no unet" in run_bad(["--model-dir", str(tmp_path / "no_unet"), *base[2:]], capsys)
    assert "--model-dir" in run_bad(["--model-dir", str(tmp_path / "missing"), *base[2:]], capsys)
    assert "no split 'dev'" in run_bad([*base, "--split", "dev"], capsys)
    assert "out of range" in run_bad([*base, "--timesteps", "50,1000"], capsys)
    assert "not an integer" in run_bad([*base, "--timesteps", "50,late"], capsys)
    assert "argument --n: must be a whole number >= 1" in run_bad([*base, "--n", "0"], capsys)
    assert "--tolerance" in run_bad([*base, "--tolerance", "0.9"], capsys)
    assert "not a dataset directory" in run_bad([*base[:2], "--latents", str(tmp_path / "no_unet"), *base[4:]], capsys)
    # More steps than the schedule has: was refused only after the denoising pass, the folder left "running".
    assert "steps 5000 (--steps) is more than this model's 1000-step schedule has: give --steps from 1 to 1000" in run_bad(
        [*base, "--sampler", "ddim", "--steps", "5000"], capsys)
    assert not (tmp_path / "o").exists()  # nothing was claimed


def test_latents_being_replaced_are_refused_before_the_weights_load(index_only_model_dir, tmp_path, capsys,
                                                                     no_weights):
    """An `encode --overwrite` of the latents holds their readers lock: diagnose read them regardless, as they were
    being moved away. One line, nothing claimed, no weights read."""
    from diffusets_jax.io.run_dir import READERS_LOCK, add_readers_lock, exclusive_lock

    latents = latent_dataset(tmp_path / "latents", index_only_model_dir)
    add_readers_lock(latents)  # as `encode` leaves it
    with exclusive_lock(latents, "busy", name=READERS_LOCK):
        err = run_bad(["--model-dir", str(index_only_model_dir), "--latents", str(latents), "--out",
                       str(tmp_path / "o")], capsys)
    assert f"{latents} is being replaced now" in err
    assert not (tmp_path / "o").exists()


def test_latents_of_another_vae_or_embedder_are_refused(index_only_model_dir, tmp_path, capsys, no_weights):
    model_dir = index_only_model_dir
    common = dict(splits={"validation": 4}, latent_scale=0.18215, channel_mean=(0.0,) * 4, channel_std=(0.2,) * 4)
    other_vae = write_gaussian_latent_dataset(tmp_path / "other_vae", conditioning=dataset_conditioning(),
                                              vae_uid="0123456789abcdef", **common)
    err = run_bad(["--model-dir", str(model_dir), "--latents", str(other_vae), "--out", str(tmp_path / "o")], capsys)
    assert "encoded by VAE 01234567" in err and "trained on latents of VAE" in err
    embedder = dataclasses.replace(openai_conditioning(TEXT_DIM).embedder, model="another-embedding-16")
    other_text = write_gaussian_latent_dataset(tmp_path / "other_text", conditioning=ConditioningSpec(embedder),
                                               vae_uid=model_dirs.read_index(model_dir).components["vae"]["uid"],
                                               **common)
    err = run_bad(["--model-dir", str(model_dir), "--latents", str(other_text), "--out", str(tmp_path / "o")], capsys)
    assert "'another-embedding-16'" in err
    unknown = write_gaussian_latent_dataset(tmp_path / "unknown_vae", conditioning=dataset_conditioning(),
                                            vae_uid=None, **common)
    inputs = dg.check_inputs(model_dir, unknown, "validation", (50,))
    assert len(inputs.warnings) == 1 and "cannot be checked" in inputs.warnings[0]


def test_the_stated_magnification_of_an_epsilon_error_at_t_998_is_the_published_schedules():
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), so an eps error reaches x0 times sqrt((1 - abar) / abar): 25 at
    t = 998 of the linear published schedule. The docs said ~15x, the value of a "scaled_linear" schedule."""
    import re
    from pathlib import Path

    abar = float(make_schedule().alphas_cumprod[998])
    factor = np.sqrt((1.0 - abar) / abar)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    stated = [int(x) for x in re.findall(r"magnified[^.|]*?(\d+)x", readme + (dg.__doc__ or ""))]
    assert len(stated) >= 3 and all(abs(x - factor) < 1.0 for x in stated), (stated, factor)
