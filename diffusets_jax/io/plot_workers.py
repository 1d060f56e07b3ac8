"""How many worker processes (`worker_processes`) draw a run's PNG sheets, so that its pictures keep up with its
sampling.

A sheet takes about 0.16-0.19 s of one core (0.08 s drawing, the rest zlib), while an accelerator samples thousands
of ECGs a second; drawing holds the GIL (two threads gained 1.4x on 2 cores), so the sheets go to processes, one per
core up to `MAX_WORKERS`. Each PNG is still written under a temporary name and renamed (`io.plot.save_png`), so a
run killed mid-sheet leaves no torn picture under a real name.
"""

from __future__ import annotations

from diffusets_jax.worker_processes import WorkerProcesses, usable_cores

# Below this many sheets a run draws them in its own process: starting two workers (fresh interpreters importing
# matplotlib) and drawing their first sheets took 1.3 s on 2 cores, about eight sheets' time, so 16 sheets take
# as long either way.
MIN_SHEETS_FOR_WORKERS = 16
# Each worker holds about 200 MB (an interpreter with numpy and matplotlib), so a 128-core host would give 25 GB to
# drawing; two drew 12 sheets a second on 2 cores, so eight should draw about 50.
MAX_WORKERS = 8
_DIED = ("a process drawing PNGs died (killed, or out of memory?); rerun the same command to resume, or leave PNGs "
         "out with --formats npz,wfdb")


def worker_count(sheets: int) -> int:
    """Worker processes for a run that draws `sheets` PNGs: one per core this process may use, up to `MAX_WORKERS`,
    none for a few."""
    if sheets < MIN_SHEETS_FOR_WORKERS:
        return 0
    return max(1, min(usable_cores(), sheets, MAX_WORKERS))


def plot_workers(sheets: int) -> WorkerProcesses:
    """The worker processes (a `with` block) that draw `sheets` PNGs; none (drawn in this process) for a few."""
    return WorkerProcesses(worker_count(sheets), died=_DIED)
