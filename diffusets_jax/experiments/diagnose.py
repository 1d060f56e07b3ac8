"""Model-free diagnosis of a diffusion U-Net (`diffusets-jax diagnose`): has it learned to denoise?

Learned-feature scores (FID, precision / recall on CLIP features) can look passable while the U-Net is badly
undertrained: an independent reproduction of DiffuSETS found that only through two model-free checks, which this
module computes for a model directory and a split of a latent dataset made with the U-Net's VAE.

1. Fixed-noise denoising error per timestep. z0 = latent_mean x latent_scale (the posterior mean: no sampling
   noise), noise fixed by the seed, x_t = q_sample(z0, t, noise) for each t of a grid. The U-Net's output becomes
   (x0-hat, eps-hat) whatever its prediction type (`predict_x0_and_eps`) and the mean squared error per element
   of each is reported beside two predictors computed in closed form from the split's per-channel mean m and
   variance s2 (over examples and length):
   - "data_mean": x0-hat = m whatever x_t; its x0-MSE is s2 at every t.
   - "gaussian": E[x0 | x_t] if every latent element were an independent N(m, s2),
     x0-hat = m + sqrt(abar) s2 / (abar s2 + 1 - abar) (x_t - sqrt(abar) m): the best predictor for such data
     (expected x0-MSE s2 (1 - abar) / (abar s2 + 1 - abar)), which knows nothing of the latents' structure.
   Every predictor's eps-hat is (x_t - sqrt(abar) x0-hat) / sqrt(1 - abar), so at each t its eps-MSE is
   abar / (1 - abar) times its x0-MSE: both rank predictors alike; x0 reads better at high t, eps at low t.
   A trained U-Net exploits the structure (along length, across channels): it is well below "gaussian" at low
   and middle t and close to it as t -> T, where nothing is left to exploit. An undertrained one is worse than
   "data_mean" at high t (an epsilon U-Net's noise error is magnified sqrt((1 - abar) / abar), ~25x at t = 998 on the
   published schedule) and no better than "gaussian" at low t (eps-MSE near 1 per element on unit-variance
   latents).
2. Terminal latents. The model's sampler (by default the model directory's: 1000 DDPM steps, clipping as it
   records) runs for the split's own conditions (stored text embeddings, sex, age, heart rate) and stops before
   the VAE decode. The mean, std, min and max of its latents, overall and per channel, are compared with those of
   the same examples' latents drawn as the U-Net was trained on them ((mean + exp(logvar / 2) eps) x
   latent_scale). An undertrained U-Net's samples spread several times wider than the training latents.

A U-Net trained with condition dropout (classifier-free guidance) is checked conditionally and unconditionally
(with the fixed null condition it was trained with). `diagnose` writes report.json, report.md and diagnose.png
into an output folder claimed with `io.run_dir.output_dir`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax import parallel
from diffusets_jax.diffusion.guidance import fixed_null_condition
from diffusets_jax.diffusion.samplers import (
    SamplerConfig,
    jit_generate,
    resolve_for_model,
    sampler_timesteps,
    unet_model_fn,
)
from diffusets_jax.diffusion.schedule import (
    DiffusionSpec,
    NoiseSchedule,
    make_schedule,
    predict_x0_and_eps,
    q_sample,
)
from diffusets_jax.io.files import read_json, write_json_atomic, write_text_atomic

DEFAULT_TIMESTEPS: tuple[int, ...] = (50, 250, 500, 998)
# `--dense`: enough points for the curve's shape, from nearly clean to the last trained timestep.
DENSE_TIMESTEPS: tuple[int, ...] = (1, 10, 25, 50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 800, 900, 950, 990,
                                    998)
DEFAULT_TOLERANCE = 1.5  # generated / training latent std (and range) within [1 / 1.5, 1.5]
MEAN_OFFSET_TOLERANCE = 0.5  # |generated mean - training mean| within 0.5 training std
# Margin of the paired MSE comparisons: U-Net and references are scored on the same latents and noise, so their
# difference is not blurred by sampling noise, but a U-Net at the optimum still wobbles by a few per cent.
MSE_MARGIN = 0.05
PREDICTORS: tuple[str, ...] = ("unet", "data_mean", "gaussian")
REPORT_JSON, REPORT_MD, PLOT_PNG = "report.json", "report.md", "diagnose.png"
_STATUS_ORDER = {"pass": 0, "warn": 1, "fail": 2}


# ----------------------------------------------------------------------------------------------------------
# Arguments


def parse_timesteps(text: str, *, dense: bool = False) -> tuple[int, ...]:
    """'50,250,500,998' -> (50, 250, 500, 998), sorted and unique; `dense` adds `DENSE_TIMESTEPS`."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"--timesteps: {part!r} is not an integer timestep (give e.g. 50,250,500,998)") from None
    if not values and not dense:
        raise ValueError("--timesteps is empty: give at least one timestep, e.g. 50,250,500,998")
    return tuple(sorted(set(values) | (set(DENSE_TIMESTEPS) if dense else set())))


def check_timesteps(timesteps: Sequence[int], num_timesteps: int) -> tuple[int, ...]:
    """Sorted unique timesteps, each in [0, num_timesteps - 1] (the U-Net's schedule), else one ValueError."""
    values = tuple(sorted({int(t) for t in timesteps}))
    if not values:
        raise ValueError("--timesteps is empty: give at least one timestep, e.g. 50,250,500,998")
    bad = [t for t in values if not 0 <= t < num_timesteps]
    if bad:
        raise ValueError(f"--timesteps {bad[0]} is out of range: the U-Net's schedule has timesteps 0 to "
                         f"{num_timesteps - 1}")
    return values


# ----------------------------------------------------------------------------------------------------------
# Reference predictors and statistics


def channel_moments(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) variance of latents `(n, length, C)` over examples and length: `(C,)`
    float64 each."""
    flat = np.asarray(z, np.float64).reshape(-1, np.shape(z)[-1])
    return flat.mean(axis=0), flat.var(axis=0)


def data_mean_x0(x_t: jax.Array, abar: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """The trivial predictor: x0-hat = the per-channel data mean `(C,)`, broadcast to x_t's `(batch, length, C)`."""
    del abar, var
    return jnp.broadcast_to(mean.astype(x_t.dtype), x_t.shape)


def gaussian_x0(x_t: jax.Array, abar: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """E[x0 | x_t] when every element of x0 is an independent N(mean_c, var_c): the optimal predictor for such data.

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is then jointly Gaussian with x0, and the posterior mean is
    mean + sqrt(abar) var / (abar var + 1 - abar) (x_t - sqrt(abar) mean). x_t `(batch, length, C)`, abar a scalar,
    mean and var `(C,)`."""
    gain = jnp.sqrt(abar) * var / (abar * var + 1.0 - abar)
    return mean + gain * (x_t - jnp.sqrt(abar) * mean)


REFERENCE_PREDICTORS = {"data_mean": data_mean_x0, "gaussian": gaussian_x0}


def latent_statistics(z: np.ndarray) -> dict[str, Any]:
    """Mean, std, min and max of latents `(n, length, C)`, overall and per channel (lists of C)."""
    flat = np.asarray(z, np.float64).reshape(-1, np.shape(z)[-1])
    return {"mean": float(flat.mean()), "std": float(flat.std()), "min": float(flat.min()), "max": float(flat.max()),
            "per_channel": {"mean": flat.mean(axis=0).tolist(), "std": flat.std(axis=0).tolist(),
                            "min": flat.min(axis=0).tolist(), "max": flat.max(axis=0).tolist()}}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (math.inf if a > 0 else 1.0)


def compare_statistics(generated: Mapping[str, Any], reference: Mapping[str, Any],
                       tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Generated against reference `latent_statistics`: std ratio, range ratio (max - min), mean offset in
    reference std; overall and per channel, with a flag for every value outside its tolerance (std and range
    ratios within [1 / tolerance, tolerance], |mean offset| within `MEAN_OFFSET_TOLERANCE`)."""
    def measures(g: Mapping[str, Any], r: Mapping[str, Any]) -> dict[str, float]:
        return {"std_ratio": _ratio(g["std"], r["std"]),
                "range_ratio": _ratio(g["max"] - g["min"], r["max"] - r["min"]),
                "mean_offset_in_std": _ratio(g["mean"] - r["mean"], r["std"])}

    overall = measures(generated, reference)
    channels = [measures({k: generated["per_channel"][k][c] for k in ("mean", "std", "min", "max")},
                         {k: reference["per_channel"][k][c] for k in ("mean", "std", "min", "max")})
                for c in range(len(reference["per_channel"]["std"]))]
    flags = []
    for where, m in [("overall", overall)] + [(f"channel {c}", m) for c, m in enumerate(channels)]:
        for key in ("std_ratio", "range_ratio"):
            if not 1.0 / tolerance <= m[key] <= tolerance:
                flags.append({"where": where, "measure": key, "value": m[key],
                              "allowed": [1.0 / tolerance, tolerance]})
        if not abs(m["mean_offset_in_std"]) <= MEAN_OFFSET_TOLERANCE:  # NaN is flagged too
            flags.append({"where": where, "measure": "mean_offset_in_std", "value": m["mean_offset_in_std"],
                          "allowed": [-MEAN_OFFSET_TOLERANCE, MEAN_OFFSET_TOLERANCE]})
    return {**overall, "per_channel": {k: [m[k] for m in channels] for k in overall}, "tolerance": tolerance,
            "flags": flags}


# ----------------------------------------------------------------------------------------------------------
# The two measurements


def _padded_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


def _pad(arrays: Mapping[str, np.ndarray], start: int, stop: int, batch_size: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) of each array, padded to `batch_size` rows by repeating the last (one compiled shape)."""
    def pad(value: np.ndarray) -> np.ndarray:
        rows = value[start:stop]
        return np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), axis=0)])

    return {k: pad(np.asarray(v)) for k, v in arrays.items()}


def _device_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
    """`batch_size` rounded up to a multiple of the mesh's batch shards (as `pipeline.ECGGenerator` does)."""
    shards = parallel.num_batch_shards(mesh)
    return max(shards, -(-batch_size // shards) * shards)


def denoising_error_fn(unet: Any, schedule: NoiseSchedule, mesh: jax.sharding.Mesh):  # noqa: ANN201 (jitted)
    """Compile-once `(variables, z0, noise, cond, weight, t, mean, var) -> {predictor: {"x0", "eps": (C,)}}`: the
    weighted per-channel sums of squared errors of the U-Net and the reference predictors at timestep `t` (a
    scalar), for a batch z0, noise `(B, length, C)`, cond `{text_embedding (B, D), sex, age, heart_rate (B,)}`,
    weight `(B,)` (0 for padding rows); mean, var `(C,)` the per-channel moments of the references."""
    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def sums(variables, z0, noise, cond, weight, t, mean, var):
        timesteps = jnp.full((z0.shape[0],), t, jnp.int32)
        x_t = q_sample(schedule, z0, timesteps, noise)
        output = unet_model_fn(unet, variables)(x_t, timesteps, cond)
        predictions = {"unet": predict_x0_and_eps(schedule, output, x_t, timesteps)}
        abar = schedule.alphas_cumprod[t]
        for name, predictor in REFERENCE_PREDICTORS.items():
            x0 = predictor(x_t, abar, mean, var)
            predictions[name] = (x0, (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar))  # the forward process, solved
        w = weight[:, None, None]
        return {name: {"x0": jnp.sum(w * jnp.square(x0 - z0), axis=(0, 1)),
                       "eps": jnp.sum(w * jnp.square(eps - noise), axis=(0, 1))}
                for name, (x0, eps) in predictions.items()}

    return jax.jit(sums, in_shardings=(replicated, batch, batch, batch, batch, replicated, replicated, replicated),
                   out_shardings=replicated)


def denoising_errors(error_fn: Any, variables: Any, schedule: NoiseSchedule, z0: np.ndarray, noise: np.ndarray,
                     cond: Mapping[str, np.ndarray], timesteps: Sequence[int], *, mean: np.ndarray, var: np.ndarray,
                     batch_size: int, mesh: jax.sharding.Mesh, bar: Any = None) -> list[dict[str, Any]]:
    """Per timestep, the x0- and eps-MSE per element (overall and per channel) of the U-Net and the references.

    `error_fn` from `denoising_error_fn`; z0, noise `(n, length, C)`; cond per-sample arrays `(n, ...)`;
    `batch_size` a multiple of the mesh's batch shards. Returns one dict per t, in `timesteps` order.
    """
    n, length, channels = z0.shape
    batch = parallel.batch_sharding(mesh)
    arrays = {"z0": z0, "noise": noise, "weight": np.ones(n, np.float32), **{f"cond/{k}": v for k, v in cond.items()}}
    device_batches = []
    for start, stop in _padded_batches(n, batch_size):
        padded = _pad(arrays, start, stop, batch_size)
        padded["weight"][stop - start:] = 0.0
        device_batches.append(jax.device_put(padded, batch))
    moments = (jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32))
    rows = []
    for t in timesteps:
        totals = {name: {"x0": np.zeros(channels), "eps": np.zeros(channels)} for name in PREDICTORS}
        for b in device_batches:
            cond_batch = {k.split("/", 1)[1]: v for k, v in b.items() if k.startswith("cond/")}
            sums = error_fn(variables, b["z0"], b["noise"], cond_batch, b["weight"], np.int32(t), *moments)
            for name in PREDICTORS:
                for kind in ("x0", "eps"):
                    totals[name][kind] += np.asarray(sums[name][kind], np.float64)
        row: dict[str, Any] = {"t": int(t), "alpha_bar": float(schedule.alphas_cumprod[t])}
        for name in PREDICTORS:
            per_channel = {kind: totals[name][kind] / (n * length) for kind in ("x0", "eps")}
            row[name] = {"x0_mse": float(per_channel["x0"].mean()), "eps_mse": float(per_channel["eps"].mean()),
                         "x0_mse_per_channel": per_channel["x0"].tolist(),
                         "eps_mse_per_channel": per_channel["eps"].tolist()}
        rows.append(row)
        if bar is not None:
            bar.update(1)
    return rows


def terminal_latents(generate: Any, variables: Any, cond: Mapping[str, np.ndarray], key: jax.Array, *,
                     batch_size: int, mesh: jax.sharding.Mesh, null_cond: Any = None, bar: Any = None) -> np.ndarray:
    """The latents `(n, 128, C)` the sampler ends on for conditions `cond` (per-sample arrays `(n, ...)`), before
    any VAE decode. `generate`: `samplers.jit_generate(unet, None, ...)` (one compiled program for every call);
    `null_cond`: the null condition when the sampler guides. Batch i draws its noise from `fold_in(key, i)`."""
    n = len(next(iter(cond.values())))
    out = []
    for index, (start, stop) in enumerate(_padded_batches(n, batch_size)):
        padded = jax.device_put(_pad(cond, start, stop, batch_size), parallel.batch_sharding(mesh))
        latents = generate(variables, None, padded, jax.random.fold_in(key, index), null_cond)
        out.append(np.asarray(jax.device_get(latents))[: stop - start])
        if bar is not None:
            bar.update(stop - start)
    return np.concatenate(out)


def unconditional(cond: Mapping[str, np.ndarray], text_dim: int) -> dict[str, np.ndarray]:
    """The fixed null condition (`guidance.fixed_null_condition`, what condition dropout trained) for every row."""
    n = len(next(iter(cond.values())))
    return {k: np.broadcast_to(np.asarray(v, np.float32), (n, *np.shape(v))).copy()
            for k, v in fixed_null_condition(text_dim).items()}


def diagnose_unet(unet: Any, variables: Any, data: Mapping[str, np.ndarray], *, diffusion: DiffusionSpec,
                  patient_features: str, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                  sampler: SamplerConfig | None = None, seed: int = 0, batch_size: int = 64,
                  with_unconditional: bool = False, tolerance: float = DEFAULT_TOLERANCE,
                  progress: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Both measurements for a U-Net (any Flax module with the U-Net's call signature and `text_dim`).

    data: `latent_mean`, `latent_logvar` `(n, 128, C)`, `text_embedding` `(n, D)`, `sex`, `age`, `heart_rate`
    `(n,)` (a latent split, see `load_latent_split`); `diffusion`: the U-Net's schedule and latent scale;
    `patient_features`: its patient-feature mode. `sampler` (default: 1000 DDPM steps, clipping as `diffusion`
    says) makes the terminal latents. Returns `(results, latents)`: results as in report.json's "denoising",
    "terminal" and "verdict"; latents `{"training": (n, 128, C), "generated/<mode>": ...}` for the plot.
    """
    from diffusets_jax.io.progress import progress_bar
    from diffusets_jax.models.vae import VAE
    from diffusets_jax.train.diffusion import patient_condition

    schedule = make_schedule(diffusion.schedule)
    timesteps = check_timesteps(timesteps, schedule.num_timesteps)
    mesh = parallel.local_mesh()
    mean_latent = np.asarray(data["latent_mean"], np.float32)
    n = mean_latent.shape[0]
    batch_size = _device_batch_size(min(batch_size, n), mesh)  # a small split is not padded to a large batch
    z0 = mean_latent * np.float32(diffusion.latent_scale)  # posterior mean, as train.diffusion's eval_fn
    if diffusion.latent_std is None:  # DDIM's grid follows the latent std: these latents measure it
        diffusion = dataclasses.replace(diffusion, latent_std=float(z0.std()))
    sampler = resolve_for_model(sampler if sampler is not None else SamplerConfig(), diffusion)
    noise_key, posterior_key, sampler_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    noise = np.asarray(jax.random.normal(noise_key, z0.shape, jnp.float32))
    mean, var = channel_moments(z0)
    conditions = {"conditional": {k: np.asarray(v) for k, v in patient_condition(dict(data), patient_features).items()}}
    if with_unconditional:
        conditions["unconditional"] = unconditional(conditions["conditional"], int(unet.text_dim))
    variables = jax.device_put(variables, parallel.replicated(mesh))

    bar = progress_bar(len(conditions) * (len(timesteps) + n), desc="diagnose", unit="step", disable=not progress)
    try:
        error_fn = denoising_error_fn(unet, schedule, mesh)
        denoising = {mode: denoising_errors(error_fn, variables, schedule, z0, noise, cond, timesteps, mean=mean,
                                            var=var, batch_size=batch_size, mesh=mesh, bar=bar)
                     for mode, cond in conditions.items()}
        # What the U-Net was trained to generate: posterior draws, scaled (train.diffusion's loss_fn).
        training = np.asarray(VAE.sample_latent(jnp.asarray(mean_latent), jnp.asarray(data["latent_logvar"],
                                                                                       jnp.float32),
                                                posterior_key, diffusion.latent_scale))
        latents = {"training": training}
        generate = jit_generate(unet, None, schedule, sampler, batch_sharding=parallel.batch_sharding(mesh))
        null_cond = fixed_null_condition(int(unet.text_dim)) if sampler.guidance_scale != 1.0 else None
        for mode, cond in conditions.items():
            latents[f"generated/{mode}"] = terminal_latents(generate, variables, cond, sampler_key,
                                                            batch_size=batch_size, mesh=mesh, null_cond=null_cond,
                                                            bar=bar)
    finally:
        bar.close()
    reference = latent_statistics(training)
    terminal: dict[str, Any] = {"training": reference, "training_posterior_mean": latent_statistics(z0)}
    for mode in conditions:
        generated = latent_statistics(latents[f"generated/{mode}"])
        terminal[mode] = {**generated, "against_training": compare_statistics(generated, reference, tolerance)}
    results = {"n": int(n), "timesteps": list(timesteps), "sampler": sampler.record(),
               "reference_moments": {"mean": mean.tolist(), "var": var.tolist()},
               "denoising": denoising, "terminal": terminal}
    results["verdict"] = verdict(denoising, terminal, tolerance=tolerance)
    return results, latents


# ----------------------------------------------------------------------------------------------------------
# Verdict


def _worst(statuses: Sequence[str]) -> str:
    return max(statuses, key=_STATUS_ORDER.__getitem__, default="pass")


def verdict(denoising: Mapping[str, Sequence[Mapping[str, Any]]], terminal: Mapping[str, Any], *,
            tolerance: float = DEFAULT_TOLERANCE, margin: float = MSE_MARGIN) -> dict[str, Any]:
    """Pass / warn / fail checks from `diagnose_unet`'s measurements, and the worst of them as `overall`.

    - high noise: the U-Net's x0-MSE above the data-mean predictor's (by more than `margin`) at any t: fail.
    - low noise: at the smallest t, U-Net eps-MSE / Gaussian reference eps-MSE above 1 + margin: fail (nothing
      learned beyond per-channel moments); within 1 +- margin: warn; below: pass.
    - terminal latents: std ratio or mean offset outside tolerance (overall or any channel): fail; range ratio
      outside tolerance only: warn.
    - a NaN or inf among the U-Net's errors or its sampled latents' statistics: fail (a diverged model), and every
      comparison above is written so that a NaN fails it rather than passing (`nan > x` is false).
    """
    checks = []
    non_finite = [f"{mode} denoising at t = {r['t']}" for mode, rows in denoising.items() for r in rows
                  if not all(math.isfinite(r["unet"][k]) for k in ("x0_mse", "eps_mse"))]
    non_finite += [f"{mode} sampled latents" for mode, stats in terminal.items() if "against_training" in stats
                   and not all(math.isfinite(stats[k]) for k in ("mean", "std", "min", "max"))]
    checks.append({"mode": "all", "check": "the U-Net's outputs are finite",
                   "status": "fail" if non_finite else "pass",
                   "detail": "NaN or inf in: " + "; ".join(non_finite) if non_finite else "no NaN or inf"})
    for mode, rows in denoising.items():
        worse = [r for r in rows if not r["unet"]["x0_mse"] <= r["data_mean"]["x0_mse"] * (1.0 + margin)]
        detail = ("; ".join(f"t = {r['t']}: x0-MSE {r['unet']['x0_mse']:.4g} vs data mean "
                            f"{r['data_mean']['x0_mse']:.4g}" for r in worse) if worse else
                  f"x0-MSE at t = {rows[-1]['t']}: {rows[-1]['unet']['x0_mse']:.4g} vs data mean "
                  f"{rows[-1]['data_mean']['x0_mse']:.4g}")
        checks.append({"mode": mode, "check": "denoising beats predicting the data mean at every t",
                       "status": "fail" if worse else "pass", "detail": detail})
        low = rows[0]
        ratio = _ratio(low["unet"]["eps_mse"], low["gaussian"]["eps_mse"])
        status = "pass" if ratio < 1.0 - margin else "warn" if ratio <= 1.0 + margin else "fail"
        checks.append({"mode": mode, "check": f"at t = {low['t']} denoising beats the per-channel Gaussian predictor",
                       "status": status, "detail": f"eps-MSE {low['unet']['eps_mse']:.4g} vs Gaussian "
                       f"{low['gaussian']['eps_mse']:.4g} (ratio {ratio:.3g})"})
    for mode, stats in terminal.items():
        if "against_training" not in stats:
            continue
        comparison = stats["against_training"]
        for measure, failing in (("std_ratio", True), ("mean_offset_in_std", True), ("range_ratio", False)):
            flagged = [f for f in comparison["flags"] if f["measure"] == measure]
            status = "pass" if not flagged else "fail" if failing else "warn"
            where = ", ".join(f"{f['where']} {f['value']:.3g}" for f in flagged)
            label = {"std_ratio": "terminal latent std / training std", "range_ratio":
                     "terminal latent range / training range", "mean_offset_in_std":
                     "terminal latent mean - training mean, in training std"}[measure]
            checks.append({"mode": mode, "check": label, "status": status,
                           "detail": f"overall {comparison[measure]:.3g}" + (f"; outside: {where}" if where else "")})
    overall = _worst([c["status"] for c in checks])
    summary = {"pass": "healthy: the U-Net denoises better than the closed-form references and samples latents "
                       "spread like its training latents",
               "warn": "inconclusive: see the checks marked warn",
               "fail": "undertrained (or sampled with the wrong latent scale / VAE): see the checks marked fail"}
    if non_finite:
        summary["fail"] = ("diverged: the U-Net returns NaN or inf; go back to an earlier checkpoint or lower the "
                           "learning rate")
    return {"overall": overall, "summary": summary[overall], "checks": checks}


# ----------------------------------------------------------------------------------------------------------
# Model directory + latent split -> report


@dataclasses.dataclass(frozen=True)
class DiagnosisInputs:
    """What `check_inputs` found: the model index, the latent dataset's builder and card, the checked timesteps
    and warnings for the report (e.g. a VAE uid that could not be checked)."""

    model_dir: Path
    index: Any
    builder: Any
    card: dict[str, Any]
    split: str
    timesteps: tuple[int, ...]
    warnings: tuple[str, ...]


def check_inputs(model_dir: str | os.PathLike, latents: str | os.PathLike, split: str,
                 timesteps: Sequence[int]) -> DiagnosisInputs:
    """Everything a user can get wrong, checked before any weights or data are read; one ValueError or
    FileNotFoundError line each: the U-Net, its recorded diffusion and conditioning, the timesteps, the latent
    dataset and split, the VAE that encoded the latents (refused when it is not the U-Net's) and their text
    embeddings (refused when not the U-Net's embedder's)."""
    from diffusets_jax.data import pipeline
    from diffusets_jax.data.card import check_embeddings_fit, read_card
    from diffusets_jax.models import model_dir as model_dirs

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model-dir {model_dir} does not exist (train a U-Net into it with `diffusets-jax "
                                "train unet ... --model-dir DIR` or convert one with `diffusets-jax convert`)")
    index = model_dirs.read_index(model_dir)
    model_dirs.require(index, model_dir, "unet")
    if index.conditioning is None or index.diffusion is None:
        raise ValueError(f"{model_dir}: model_index.json records no conditioning/diffusion for its U-Net: write the "
                         "U-Net again with `diffusets-jax train unet --model-dir` or `convert --unet`")
    timesteps = check_timesteps(timesteps, index.diffusion.schedule.num_timesteps)

    latents = Path(latents)
    if not latents.is_dir():
        raise FileNotFoundError(f"--latents {latents} does not exist (write a latent dataset with `diffusets-jax "
                                "encode`)")
    if not (latents / "dataset_info.json").is_file():
        raise ValueError(f"--latents {latents} is not a dataset directory (no dataset_info.json): give the folder "
                         "`diffusets-jax encode --out` wrote")
    builder = pipeline.load_builder(latents)
    if "latent_mean" not in builder.info.features.keys():
        raise ValueError(f"--latents {latents} holds no latent_mean: it is not a latent dataset; encode it with "
                         "`diffusets-jax encode` and the U-Net's VAE")
    splits = builder.info.splits
    if split not in splits:
        raise ValueError(f"--latents {latents} has no split {split!r} (it has {', '.join(sorted(splits))})")
    if int(splits[split].num_examples) < 1:
        raise ValueError(f"--latents {latents}: split {split!r} is empty")
    card = read_card(builder)

    warnings = []
    unet_entry = index.components["unet"]
    wanted = unet_entry.get("vae_uid") or index.components.get("vae", {}).get("uid")
    encoded_by = ((card.get("derived_from") or {}).get("vae") or {}).get("uid")
    if wanted and encoded_by and wanted != encoded_by:
        raise ValueError(f"--latents {latents} were encoded by VAE {encoded_by[:8]}, but the U-Net of {model_dir} was "
                         f"trained on latents of VAE {wanted[:8]}: encode the split with that VAE (`diffusets-jax "
                         "encode --model-dir` of the U-Net's directory) or diagnose the U-Net trained on these latents")
    if not (wanted and encoded_by):
        unknown = "the U-Net's" if not wanted else "the latents'"
        warnings.append(f"{unknown} VAE uid is not recorded, so it cannot be checked that the latents come from the "
                        "VAE the U-Net was trained on; the numbers mean something only if they do")

    text_dim = int(unet_entry.get("text_dim") or index.conditioning.embedder.dim)
    width = int(builder.info.features["text_embedding"].shape[0])
    if width != text_dim:
        raise ValueError(f"--latents {latents} hold {width}-d text embeddings but the U-Net takes {text_dim}-d ones: "
                         "they were not made for this U-Net")
    check_embeddings_fit(index.conditioning, card, model=f"the U-Net of {model_dir}", data=f"--latents {latents}",
                         remedy="diagnose it on latents with its own embeddings")
    return DiagnosisInputs(model_dir, index, builder, card, split, timesteps, tuple(warnings))


def load_latent_split(builder: Any, split: str, n: int, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The first `n` examples of a latent split in stored order (fewer when the split is smaller), through the
    input pipeline's ordered reader: `latent_mean`, `latent_logvar` `(n, 128, C)`, `text_embedding` `(n, D)`,
    `sex`, `age`, `heart_rate` `(n,)`. Held as read (`io.run_dir.reading`) while they are read, so that an `encode
    --overwrite` of them cannot move them away mid-read; one under way now is a ValueError."""
    from diffusets_jax.io.run_dir import reading

    with reading(builder.data_dir):
        return _read_latents(builder, split, n, batch_size)


def _read_latents(builder: Any, split: str, n: int, batch_size: int) -> dict[str, np.ndarray]:
    """`load_latent_split`'s reading."""
    from diffusets_jax.data import pipeline

    columns: dict[str, list[np.ndarray]] = {k: [] for k in pipeline.LATENT_FIELDS}
    have = 0
    dataset = pipeline.eval_dataset(builder, split, host_batch_size=min(batch_size, n), fields=pipeline.LATENT_FIELDS)
    for batch in dataset.as_numpy_iterator():
        keep = np.flatnonzero(batch[pipeline.MASK_FIELD])[: n - have]
        for key in columns:
            columns[key].append(np.asarray(batch[key])[keep])
        have += len(keep)
        if have >= n or len(keep) == 0:
            break
    return {k: np.concatenate(v) for k, v in columns.items()}


def diagnose(model_dir: str | os.PathLike, latents: str | os.PathLike, out_dir: str | os.PathLike, *,
             split: str = "validation", n: int = 256, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0,
             batch_size: int = 64, sampler: SamplerConfig | None = None, tolerance: float = DEFAULT_TOLERANCE,
             overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Diagnose the U-Net of `model_dir` on the first `n` examples of `split` of the latent dataset `latents`;
    write report.json, report.md and diagnose.png into `out_dir` (claimed with `io.run_dir.output_dir`: rerunning
    the same diagnosis returns the finished report). Returns the report."""
    from diffusets_jax.data.card import card_fingerprint, dataset_reference
    from diffusets_jax.io.run_dir import output_dir
    from diffusets_jax.models import model_dir as model_dirs
    from diffusets_jax.provenance import stamp

    if n < 1:
        raise ValueError(f"--n must be a positive number of examples, got {n}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of latents, got {batch_size}")
    if not tolerance > 1.0:
        raise ValueError(f"--tolerance must be a ratio above 1 (e.g. 1.5), got {tolerance}")
    inputs = check_inputs(model_dir, latents, split, timesteps)
    index = inputs.index
    sampler = resolve_for_model(sampler if sampler is not None else SamplerConfig(), index.diffusion)
    # Settings the model's schedule cannot run (more steps than it has timesteps) are known from the index alone,
    # as `sample` checks them: refused now, not after the denoising pass with the output folder claimed.
    sampler_timesteps(sampler, make_schedule(index.diffusion.schedule))
    with_unconditional = model_dirs.trained_with_condition_dropout(index)
    guidance_warning = model_dirs.untrained_guidance_warning(index, sampler.guidance_scale)
    components = {name: {k: entry.get(k) for k in ("uid", "vae_uid") if k in entry}
                  for name, entry in index.components.items()}
    settings = {"model_dir": os.path.abspath(model_dir), "components": components,
                "latents": os.path.abspath(latents), "latents_card": card_fingerprint(inputs.builder), "split": split,
                "n": n, "timesteps": list(inputs.timesteps),
                "seed": seed, "batch_size": batch_size, "sampler": sampler.record(), "tolerance": tolerance}
    reads = [("--model-dir", model_dir), ("--latents", inputs.builder.data_dir)]
    with output_dir(out_dir, command="diagnose", settings=settings, overwrite=overwrite, reads=reads) as run:
        if run.complete and (run.path / REPORT_JSON).is_file():
            return read_json(run.path / REPORT_JSON, "diagnosis report")
        # The latents first: latents being replaced now (`encode --overwrite`) are refused before the weights load.
        data = load_latent_split(inputs.builder, split, n)
        # The U-Net whose uid the settings record and whose index entry (diffusion, conditioning) is used with it.
        unet, variables = model_dirs.load_component_as_read(model_dir, "unet", index.components["unet"].get("uid"))
        results, arrays = diagnose_unet(unet, variables, data, diffusion=index.diffusion,
                                        patient_features=index.conditioning.patient_features,
                                        timesteps=inputs.timesteps, sampler=sampler, seed=seed,
                                        batch_size=batch_size, with_unconditional=with_unconditional,
                                        tolerance=tolerance, progress=progress)
        unet_entry = index.components["unet"]
        report = {
            "settings": settings,
            "model": {"model_dir": os.path.abspath(model_dir), "unet": {k: v for k, v in unet_entry.items()
                                                                        if k != "provenance"},
                      "unet_training": {k: v for k, v in (unet_entry.get("provenance") or {}).items()
                                        if k != "config"},
                      "diffusion": index.diffusion.to_json(), "conditioning": index.conditioning.to_json(),
                      "trained_with_condition_dropout": with_unconditional},
            "latents": {**dataset_reference(inputs.builder, split), "n_used": results["n"]},
            "warnings": [*inputs.warnings, *([guidance_warning] if guidance_warning else [])],
            **results,
            "figures": {"diagnosis": PLOT_PNG},
            **stamp(),
        }
        write_report(report, arrays, run.path)
        run.mark_complete(verdict=report["verdict"]["overall"])
    return report


def write_report(report: Mapping[str, Any], latents: Mapping[str, np.ndarray], out_dir: str | os.PathLike) -> None:
    """report.json, report.md and diagnose.png (MSE vs t on a log scale; latents per channel) in `out_dir`."""
    from diffusets_jax.io.plot import plot_diagnosis

    out = Path(out_dir)
    rows = report["denoising"]
    timesteps = [r["t"] for r in next(iter(rows.values()))]
    x0, eps = {}, {}
    for mode, mode_rows in rows.items():
        x0[f"U-Net ({mode})"] = [r["unet"]["x0_mse"] for r in mode_rows]
        eps[f"U-Net ({mode})"] = [r["unet"]["eps_mse"] for r in mode_rows]
    first = next(iter(rows.values()))
    references = {"data_mean": "data-mean predictor", "gaussian": "per-channel Gaussian predictor"}
    for name, label in references.items():
        x0[label] = [r[name]["x0_mse"] for r in first]
        eps[label] = [r[name]["eps_mse"] for r in first]
    boxes = {"training latents": latents["training"],
             **{f"generated ({k.split('/', 1)[1]})": v for k, v in latents.items() if k.startswith("generated/")}}
    plot_diagnosis(timesteps, x0, eps, boxes, references=list(references.values()), path=out / PLOT_PNG,
                   title=f"{report['model']['model_dir']}  on  {report['latents']['path']} [{report['latents']['split']}]"
                         f"  n = {report['n']}")
    write_json_atomic(out / REPORT_JSON, report)
    write_text_atomic(out / REPORT_MD, render_markdown(report))


def _g(value: float) -> str:
    return f"{value:.4g}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The verdict table, the MSE per timestep and the terminal statistics as a Markdown page."""
    v = report["verdict"]
    lines = ["# U-Net diagnosis", "",
             f"Model: `{report['model']['model_dir']}` (U-Net {str(report['model']['unet'].get('uid'))[:8]}, "
             f"{report['model']['diffusion']['schedule']['prediction_type']} prediction, latent scale "
             f"{report['model']['diffusion']['latent_scale']:.4g}); latents: `{report['latents']['path']}` split "
             f"{report['latents']['split']!r}, {report['n']} examples; sampler {report['sampler']['sampler']} "
             f"{report['sampler']['steps']} steps.", ""]
    lines += [f"**Verdict: {v['overall'].upper()}** ({v['summary']})", ""]
    lines += [f"> warning: {w}" for w in report.get("warnings", [])]
    lines += ["| condition | check | status | numbers |", "|---|---|---|---|"]
    lines += [f"| {c['mode']} | {c['check']} | {c['status']} | {c['detail']} |" for c in v["checks"]]
    lines += ["", "## Fixed-noise denoising error (mean squared error per element)", "",
              "x0 = posterior mean x latent scale; the same noise for every predictor and t. Data mean: predicts "
              "the per-channel mean; Gaussian: the optimal predictor if latents were independent per-channel "
              "Gaussians. A trained U-Net is below both; an undertrained one is above the data mean at high t.", ""]
    for mode, rows in report["denoising"].items():
        lines += [f"### {mode}", "",
                  "| t | alpha_bar | U-Net x0 | data mean x0 | Gaussian x0 | U-Net eps | data mean eps | Gaussian eps |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['t']} | {_g(r['alpha_bar'])} | {_g(r['unet']['x0_mse'])} | {_g(r['data_mean']['x0_mse'])} | "
                  f"{_g(r['gaussian']['x0_mse'])} | {_g(r['unet']['eps_mse'])} | {_g(r['data_mean']['eps_mse'])} | "
                  f"{_g(r['gaussian']['eps_mse'])} |" for r in rows]
        lines.append("")
    terminal = report["terminal"]
    lines += ["## Terminal latents (sampler output before the VAE decode) vs training latents", "",
              "| latents | channel | mean | std | min | max | std ratio | mean offset (std) | range ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    stats_rows = [("training (posterior draws)", terminal["training"], None),
                  ("training (posterior means)", terminal["training_posterior_mean"], None)]
    stats_rows += [(f"generated ({mode})", s, s["against_training"]) for mode, s in terminal.items()
                   if "against_training" in s]
    for label, s, cmp in stats_rows:
        ratios = (f"{_g(cmp['std_ratio'])} | {_g(cmp['mean_offset_in_std'])} | {_g(cmp['range_ratio'])}" if cmp
                  else " | | ")
        lines.append(f"| {label} | all | {_g(s['mean'])} | {_g(s['std'])} | {_g(s['min'])} | {_g(s['max'])} | {ratios} |")
        pc = s["per_channel"]
        for c in range(len(pc["std"])):
            ratios = (f"{_g(cmp['per_channel']['std_ratio'][c])} | {_g(cmp['per_channel']['mean_offset_in_std'][c])} | "
                      f"{_g(cmp['per_channel']['range_ratio'][c])}" if cmp else " | | ")
            lines.append(f"| | {c} | {_g(pc['mean'][c])} | {_g(pc['std'][c])} | {_g(pc['min'][c])} | "
                         f"{_g(pc['max'][c])} | {ratios} |")
    lines += ["", f"![diagnosis]({report['figures']['diagnosis']})", ""]
    return "\n".join(lines)
