"""Progress bars for long batch jobs: live on a terminal, a few lines a minute in a log file.

tqdm redraws several times a second; written to a file (a cluster job's log) every redraw is a new line. Away
from a terminal the bar updates at most every `LOG_INTERVAL_S` seconds instead.
"""

from __future__ import annotations

import sys
from typing import Any

LOG_INTERVAL_S = 20.0  # three lines a minute in a log file


def progress_bar(total: int | None = None, *, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
                 **kwargs: Any):  # noqa: ANN201 (a tqdm bar)
    """A tqdm bar on stderr that is log-friendly when stderr is not a terminal."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=sys.stderr,
                mininterval=0.1 if interactive else LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S * 3,
                dynamic_ncols=interactive, **kwargs)
