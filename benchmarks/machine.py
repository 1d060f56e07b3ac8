"""What a benchmark figure was measured on: date, CPU, cores, load, JAX backend and devices (a dict for the JSON).

Figures are only comparable on the same machine under the same load, so every benchmark records this
beside its numbers: it calls `describe()` before its run and prints its one JSON object through
`print_report`, which adds the load average after the run, so a figure taken while other processes
competed for the cores says so. JAX is imported only when `describe()` runs, so a benchmark's `--help`
stays quick.
"""

from __future__ import annotations

import datetime
import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe() -> dict:
    """Date (UTC), host CPU, core count, load average, JAX version, backend and device kind/count."""
    import jax

    device = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "load_average": load_average(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
    }


def print_report(report: dict, machine: dict, indent: int | None = None) -> None:
    """Print a benchmark's one JSON object on stdout: `report`, the `machine` that `describe()` gave before the
    run, and the load average after it. Strict JSON, like the package's own outputs: a figure that could not be
    measured is null, not NaN."""
    from diffusets_jax.io.files import json_text

    print(json_text({**report, "machine": machine, "load_average_after": load_average()}, indent=indent))
