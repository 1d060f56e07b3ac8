"""The argparse pieces every benchmark shares: a parser whose errors are one line, and the types of its counts.

Why: the benchmarks are user-facing (the README tells users to run them), and a bad count used to surface as a
Python traceback, some only after minutes of compiling (`--batch 0`, `--repeats 0`), or not at all (`--batches 0`
printed figures of 0 ECG/s with exit code 0). Every bad input gets what the package's own command gives it: one
line on stderr that says what is wrong with which flag (exit code 2), before JAX is imported or anything
compiles. A script that imports JAX at its top therefore parses in a `__main__` block above those imports.

Standard library only: `reference_worker.py` uses it too, under a separate Python environment that has PyTorch and
not this project. Float flags take the package's `diffusets_jax.cli.finite_float` (which refuses "nan" and "inf"),
imported by the script that has one.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (exit 2): argparse's own `error` prints the usage block first,
    burying the line that says what is wrong."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split("\n"))  # one line, whatever a caller's message holds
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str) -> NoReturn:
    """A flag that turns out wrong only once the devices are known (after parsing): the same one line, exit 2."""
    OneLineParser().error(message)


def parser(description: str, raw: bool = False) -> argparse.ArgumentParser:
    """A benchmark's parser; `raw` keeps the description's own line breaks (a docstring with example commands)."""
    return OneLineParser(description=description,
                         formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def count(text: str) -> int:
    """The type of a count (a batch size, repeats, steps, a number of examples): a whole number >= 1. Python's
    `int` takes 0 and negatives, which only surface later as a traceback or as meaningless figures."""
    return _whole_number(text, 1)


def non_negative(text: str) -> int:
    """The type of a whole number where 0 has a meaning of its own (e.g. `--workers 0`: in this process)."""
    return _whole_number(text, 0)


def counts(text: str) -> list[int]:
    """The type of a comma-separated list of counts such as "1,16,128": each one a whole number >= 1, none empty."""
    items = text.split(",")
    try:
        return [count(item) for item in items]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers >= 1 such as 1,16,128, got {text!r}") from None


def parse_batch_and_repeats(description: str, batch: int, repeats: int) -> argparse.Namespace:
    """`--batch` and `--repeats` alone, for the benchmarks that time one batch size a few times."""
    parser_ = parser(description)
    parser_.add_argument("--batch", type=count, default=batch)
    parser_.add_argument("--repeats", type=count, default=repeats)
    return parser_.parse_args()
