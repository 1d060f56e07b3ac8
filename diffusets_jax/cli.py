"""The `diffusets-jax` command: parse arguments and call the library; no logic of its own.

Each subcommand is registered by one `_add_<name>` function below (parser + handler). Handlers import
their library modules lazily so `diffusets-jax --help` stays fast and TensorFlow is only loaded by the
commands that read or write TFRecords.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int | None]


# Subcommand registrations, in the order a user meets them. Each takes the subparsers object.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusets-jax",
        description=(
            "DiffuSETS in JAX: generate 10-second 12-lead ECGs from clinical text reports plus sex, "
            "age and heart rate. Commands: prepare data, embed reports, train, sample, evaluate, "
            "convert the published PyTorch checkpoints, run the demo."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line naming it, no traceback
        print(f"diffusets-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
