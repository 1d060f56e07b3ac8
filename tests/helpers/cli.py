"""Running the command line in-process: the exit code whether the command returned it or argparse exited with it."""

from __future__ import annotations

from collections.abc import Sequence

from diffusets_jax.cli import main


def exit_code(argv: Sequence[str]) -> int:
    """`main(argv)`'s exit code. A flag that fails its type (`--steps 0`, `--guidance-scale nan`) is refused while
    argparse reads it, which exits (SystemExit 2) rather than returning; both are one line on stderr."""
    try:
        return main(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
