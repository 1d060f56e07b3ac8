"""Jobs for `worker_processes`' tests: module-level, so that a worker process imports them by name."""


class Unrebuildable(ValueError):
    """An exception that pickles but cannot be rebuilt: unpickling calls it with its one message, not the two
    arguments it takes (a common shape for a library's own errors)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")


def raise_unrebuildable() -> None:
    raise Unrebuildable("a.png", "odd")


def return_unpicklable():  # noqa: ANN201
    """A result that cannot go back to the parent (a lambda)."""
    return lambda: 0
