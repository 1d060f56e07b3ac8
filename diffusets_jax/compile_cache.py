"""The command's persistent XLA compilation cache: a rerun loads its compiled programs instead of compiling them.

Every command compiles the same few programs for a given model and batch size (a train step, a sampler, an
encoder), and on a CPU that takes longer than the work of a short run: `demo --quick` into a new folder took
117-125 s on 2 cores with an empty cache and 50-52 s with a warm one (2026-12-02, README).
JAX keeps such a cache only when told where; the command tells it
`$XDG_CACHE_HOME/diffusets-jax/xla` (`~/.cache/...` by default), capped at `DEFAULT_MAX_BYTES` with
least-recently-used eviction of its own entries.

The user's own settings win: `JAX_COMPILATION_CACHE_DIR` names another folder, `JAX_ENABLE_COMPILATION_CACHE=false`
turns it off, `JAX_COMPILATION_CACHE_MAX_SIZE` sets the cap. A cache that cannot be written (a read-only home)
leaves the command compiling as before. Loading is safe: JAX keys each entry by the program, the compile options
and the jax / jaxlib / backend versions, and in a multi-process run only process 0 writes.
Only the command line turns it on; the library and `benchmarks/` (whose compile times must be real) never do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

DIR_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
MAX_SIZE_VARIABLE = "JAX_COMPILATION_CACHE_MAX_SIZE"
ENABLE_VARIABLE = "JAX_ENABLE_COMPILATION_CACHE"
# A published-size U-Net's train step is tens of MB compiled; 4 GiB holds many models' programs. A size limit also
# makes JAX lock each entry while reading or writing it, so concurrent commands never read a half-written one.
DEFAULT_MAX_BYTES = 4 * 2**30
_OFF = ("0", "false", "no", "off")


def cache_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that turn the cache on, given the current environment; {} when the user chose a
    folder (`JAX_COMPILATION_CACHE_DIR`, even empty) or turned it off (`JAX_ENABLE_COMPILATION_CACHE=false`)."""
    if DIR_VARIABLE in environ or environ.get(ENABLE_VARIABLE, "").strip().lower() in _OFF:
        return {}
    xdg = environ.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative XDG_CACHE_HOME is invalid and ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path(environ.get("HOME") or Path.home()) / ".cache"
    max_size = environ.get(MAX_SIZE_VARIABLE, str(DEFAULT_MAX_BYTES)).strip()
    try:
        int(max_size)
    except ValueError:
        raise ValueError(f"{MAX_SIZE_VARIABLE} must be a whole number of bytes (-1 for no limit), got {max_size!r}: "
                         "set it to one or unset it") from None
    return {DIR_VARIABLE: str(base / "diffusets-jax" / "xla"), MAX_SIZE_VARIABLE: max_size}


def enable(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Turn the cache on for this process and the processes it starts, unless the user chose otherwise.

    Returns the cache folder, or None when the user's settings apply or the folder cannot be written.
    """
    settings = cache_settings(environ)
    if not settings:
        return None
    folder = Path(settings[DIR_VARIABLE])
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        return None
    # JAX reads these when it is imported: by this process's command later, and by any worker process it starts.
    environ.update(settings)
    # A caller that imported jax already (a script calling `cli.main`) missed them. Commands that never use jax
    # (plot, turing-score) are not made to import it (1.4 s) just to be told.
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_compilation_cache_max_size", int(settings[MAX_SIZE_VARIABLE]))
    return folder
