"""Sampler quality at every latent scale: std ratio and mean error on Gaussian latents (issue 16).

For each row (data std, data mean) and each column (sampler settings: the old uniform-in-t grids for
comparison, then the noise-level grids and second-order final step) runs
`diffusion.sampler_validation.validate_sampler`: the closed-form optimal predictor for N(mean, std^2)
latents, the chain started from the exact noised data, `--samples` x (128, 4) values. std_ratio is the
samples' std over the data std (1 is right), mean_error the mean's error in data stds. from_prior_mean_error
is the same run started from N(0, I) as generation does (the schedule's own mean bias, see the module).
Prints one JSON object on stdout; progress on stderr.

    PYTHONPATH=$PWD python benchmarks/sampler_quality.py                       # epsilon prediction, ~5 min on 2 CPUs
    PYTHONPATH=$PWD python benchmarks/sampler_quality.py --prediction-type v_prediction --samples 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import arguments

ROWS: tuple[tuple[float, float], ...] = (  # (data std, data mean); 0.18 is the published latents' scale
    (0.1, 0.0), (0.18, 0.0), (0.21, 0.0), (0.5, 0.0), (1.0, 0.0), (0.1, 0.2), (0.18, -0.36), (1.0, 1.0),
)


def _config(sampler: str, steps: int, spacing: str, order: int, eta: float = 0.0) -> Callable[[float], SamplerConfig]:
    """A column: the settings for a row's data std (only the "data_std" grid reads it). `SamplerConfig` is imported
    below, after the flags are checked; a column builds its settings only when it runs."""
    return lambda std: SamplerConfig(sampler=sampler, steps=steps, timestep_spacing=spacing, final_step_order=order,
                                     eta=eta, clip_sample=False, data_std=std if spacing == "data_std" else None)


COLUMNS: dict[str, Callable[[float], SamplerConfig]] = {
    "ddpm-1000 (faithful chain, unclipped)": _config("ddpm", 1000, "trailing", 1),
    "ddim-50 trailing o1 (old)": _config("ddim", 50, "trailing", 1),
    "ddim-200 trailing o1 (old)": _config("ddim", 200, "trailing", 1),
    "ddim-1000 trailing o1 (old)": _config("ddim", 1000, "trailing", 1),
    "dpmpp_2m-20 trailing o1 (old default)": _config("dpmpp_2m", 20, "trailing", 1),
    "dpmpp_2m-50 trailing o1 (old)": _config("dpmpp_2m", 50, "trailing", 1),
    "ddim-50 logsnr o2 (default without a data std)": _config("ddim", 50, "logsnr", 2),
    "ddim-50 data_std o2 (default)": _config("ddim", 50, "data_std", 2),
    "ddim-50 data_std o2 eta=1": _config("ddim", 50, "data_std", 2, eta=1.0),
    "dpmpp_2m-20 logsnr o1": _config("dpmpp_2m", 20, "logsnr", 1),
    "dpmpp_2m-20 logsnr o2 (default)": _config("dpmpp_2m", 20, "logsnr", 2),
    "dpmpp_2m-20 karras o2": _config("dpmpp_2m", 20, "karras", 2),
    "dpmpp_2m-10 logsnr o2": _config("dpmpp_2m", 10, "logsnr", 2),
}


def parse_args() -> argparse.Namespace:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--samples", type=arguments.count, default=1024, help="latents (x 128 x 4 values) per run")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    parser.add_argument("--columns", default=None, help="comma-separated subset of the column names")
    args = parser.parse_args()
    unknown = [] if args.columns is None else [name for name in args.columns.split(",") if name not in COLUMNS]
    if unknown:
        parser.error(f"--columns: unknown {unknown}; choose from {list(COLUMNS)}")
    return args


# Checked before the imports below load JAX (seconds): a bad flag is one line at once, not a traceback after
# compiling (arguments.py). main() parses again, which costs nothing.
if __name__ == "__main__":
    parse_args()

from machine import describe, print_report  # noqa: E402

from diffusets_jax.diffusion.sampler_validation import (  # noqa: E402
    MEAN_ERROR_TOLERANCE,
    STD_RATIO_TOLERANCE,
    validate_sampler,
)
from diffusets_jax.diffusion.samplers import SamplerConfig  # noqa: E402
from diffusets_jax.diffusion.schedule import ScheduleConfig, make_schedule  # noqa: E402


def main() -> None:
    args = parse_args()
    columns = COLUMNS if args.columns is None else {name: COLUMNS[name] for name in args.columns.split(",")}
    schedule = make_schedule(ScheduleConfig(prediction_type=args.prediction_type))
    machine = describe()

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for std, mean in ROWS:
        row: dict[str, Any] = {"data_std": std, "data_mean": mean, "std_ratio": {}, "mean_error": {}, "passed": {},
                               "from_prior_mean_error": {}}
        for name, make_config in columns.items():
            result = validate_sampler(make_config(std), schedule, mean, std, samples=args.samples)
            row["std_ratio"][name] = round(result["std_ratio"], 4)
            row["mean_error"][name] = round(result["mean_error"], 4)
            row["passed"][name] = result["passed"]
            row["from_prior_mean_error"][name] = round(result["from_prior"]["mean_error"], 4)
            print(json.dumps({"data_std": std, "data_mean": mean, "column": name, "std_ratio": row["std_ratio"][name]}),
                  file=sys.stderr, flush=True)
        rows.append(row)

    settings = {}
    for name, make_config in columns.items():
        config = make_config(1.0)
        settings[name] = {"sampler": config.sampler, "steps": config.steps, "timestep_spacing": config.timestep_spacing,
                          "final_step_order": config.final_step_order, "eta": config.eta,
                          "data_std": "the row's" if config.timestep_spacing == "data_std" else None}
    print_report({
        "benchmark": "sampler quality on Gaussian latents (closed-form optimal predictor)",
        "prediction_type": args.prediction_type,
        "values_per_run": args.samples * 128 * 4,
        "tolerances": {"std_ratio": STD_RATIO_TOLERANCE, "mean_error": MEAN_ERROR_TOLERANCE},
        "columns": settings,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }, machine, indent=1)


if __name__ == "__main__":
    main()
