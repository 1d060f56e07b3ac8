"""A durable embedding cache: (embedder id, prompt) -> float32 vector, in SQLite.

MIMIC-IV-ECG's ~800k records share far fewer distinct reports, and OpenAI embeddings cost money, so
`embed_with_cache` embeds each distinct uncached prompt once and commits every answered batch in its own
transaction before asking for the next: a run killed at any point loses nothing it already received, and
a rerun requests only what is missing. WAL journaling lets readers (data preparation on other processes)
read while an embedding run writes; keep the file on a local disk (WAL needs shared memory, which network
file systems such as NFS do not provide) and copy it to other machines when the run is done. A cache that
only its own run opens, in an output folder that may be on a shared disk (`sample`'s), is opened with
`wal=False`: SQLite's rollback journal, which needs no shared memory.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from diffusets_jax.conditioning.embedders import Embedder

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    embedder_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,              -- little-endian float32, dim values
    PRIMARY KEY (embedder_id, prompt)
) WITHOUT ROWID
"""
_LOOKUP_CHUNK = 500  # well under SQLite's host-parameter limit


class EmbeddingCache:
    """SQLite store of embeddings keyed by (embedder_id, prompt). Use as a context manager or call close().

    `path` is a file (created with its directory if needed) or ":memory:". An existing file that is not an
    embedding cache (an empty file, another file, another SQLite database) is refused and left as it is:
    ValueError naming it as `flag` (the command-line flag that gave it, e.g. "--cache"), if given. `wal`: WAL
    journaling (readers while a writer writes; a local disk), else SQLite's rollback journal (one process).
    """

    def __init__(self, path: str | os.PathLike, *, flag: str | None = None, wal: bool = True) -> None:
        self.path = os.fspath(path)
        if self.path != ":memory:":
            _check_not_empty(self.path, flag)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if not os.path.exists(self.path):
                _create(self.path, wal=wal)
        try:
            # check_same_thread=False: a cache opened on one thread may be used from another (e.g. a data
            # loader's worker); calls are serialised by the sqlite3 module.
            self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False)
            try:
                _check_tables(self._db, self.path, flag)
            except ValueError:
                self._db.close()
                raise
            if wal:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable against process kills
            else:
                self._db.execute("PRAGMA journal_mode=DELETE")  # and SQLite's default synchronous=FULL
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as err:
            raise ValueError(_unusable(self.path, err, flag)) from err

    def get_many(self, embedder_id: str, prompts: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached vectors among `prompts`, as {prompt: (dim,) float32}; absent prompts are left out."""
        prompts = list(prompts)
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(prompts), _LOOKUP_CHUNK):
            chunk = prompts[start : start + _LOOKUP_CHUNK]
            rows = self._db.execute(
                f"SELECT prompt, dim, vector FROM embeddings WHERE embedder_id = ? AND prompt IN ({','.join('?' * len(chunk))})",
                [embedder_id, *chunk],
            )
            for prompt, dim, blob in rows:
                vector = np.frombuffer(blob, dtype="<f4")
                if vector.shape != (dim,):
                    raise ValueError(f"embedding cache {self.path!r}: corrupt entry for {prompt[:60]!r} ({vector.size} values, dim {dim})")
                found[prompt] = vector.astype(np.float32)
        return found

    def put_many(self, embedder_id: str, prompts: Sequence[str], vectors: np.ndarray) -> None:
        """Store `vectors` (len(prompts), dim) for `prompts` in one transaction (all or nothing)."""
        vectors = np.asarray(vectors, dtype="<f4")
        if vectors.ndim != 2 or vectors.shape[0] != len(prompts):
            raise ValueError(f"expected ({len(prompts)}, dim) vectors, got shape {vectors.shape}")
        if not np.all(np.isfinite(vectors)):
            raise ValueError("refusing to cache non-finite embeddings")
        with self._db:  # commits on success, rolls back on error
            self._db.executemany(
                "INSERT OR REPLACE INTO embeddings (embedder_id, prompt, dim, vector) VALUES (?, ?, ?, ?)",
                [(embedder_id, p, vectors.shape[1], v.tobytes()) for p, v in zip(prompts, vectors, strict=True)],
            )

    def count(self, embedder_id: str | None = None) -> int:
        """Number of stored vectors, for one embedder or all."""
        if embedder_id is None:
            return self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM embeddings WHERE embedder_id = ?", (embedder_id,)).fetchone()[0]

    def embedder_ids(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT embedder_id FROM embeddings ORDER BY 1")]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _create(path: str, *, wal: bool) -> None:
    """Create a new, empty cache at `path`, whole: its table is written under a temporary name and the file linked
    into place (`io.files.create_new`); a cache another process created first is kept. SQLite creates its file
    empty and writes it only at the first commit, so a second run starting on the same new cache (a job array's
    `embed` or `prepare`) in between took the empty file for a user's and refused it (`_check_not_empty`). Made in
    the journal mode it is opened in (`wal`), so runs opening it at once do not race to convert it."""
    from diffusets_jax.io.files import create_new

    def fill(temporary: Path) -> None:
        db = sqlite3.connect(temporary)
        try:
            if wal:  # recorded in the file; closing the last connection removes the -wal and -shm files
                db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            db.commit()
        finally:
            db.close()

    create_new(path, fill)


def check_embedding_cache(path: str | os.PathLike, flag: str) -> None:
    """Refuse at once, in one line naming `flag`, what `EmbeddingCache(path)` would refuse, creating and changing
    nothing (the file is opened read-only): a command that writes elsewhere too (prepare) checks its cache before
    it creates anything. A missing path is left for the run to create."""
    from diffusets_jax.io.run_dir import check_output_file

    path = os.fspath(path)
    if path == ":memory:":
        return
    check_output_file(path, flag)
    if not os.path.exists(path):
        return
    _check_not_empty(path, flag)
    try:
        db = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, timeout=60.0)
        try:
            _check_tables(db, path, flag)
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        raise ValueError(_unusable(path, err, flag)) from err


def _named(path: str, flag: str | None) -> tuple[str, str]:
    """How a refusal names the file, and what it tells the user to do."""
    if flag:
        return f"{flag} {path}", f"point {flag} at a new file (it is created) or an existing cache"
    return f"embedding cache {path!r}", "use a new file"


def _check_not_empty(path: str, flag: str | None) -> None:
    # SQLite would take an empty file as an empty database and write its own into it: a user's file, changed.
    # Our own cache is never empty: it is created whole (`_create`).
    if os.path.isfile(path) and os.path.getsize(path) == 0 and not os.path.exists(path + "-wal"):
        named, remedy = _named(path, flag)
        raise ValueError(f"{named} is an empty file, not an embedding cache; it was left as it is: {remedy}")


def _check_tables(db: sqlite3.Connection, path: str, flag: str | None) -> None:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "embeddings" not in tables:  # someone's own database: never add our table to it
        named, remedy = _named(path, flag)
        raise ValueError(f"{named} is a SQLite database of something else (tables {', '.join(sorted(tables)[:5])}): "
                         f"{remedy}")


def _unusable(path: str, err: sqlite3.DatabaseError, flag: str | None) -> str:
    named, remedy = _named(path, flag)
    return f"{named} is not a usable SQLite database ({err}): {remedy}, or delete it if it is a damaged cache"


@dataclasses.dataclass
class EmbeddingRunStats:
    """What one `embed_with_cache` call did."""

    texts: int = 0  # inputs, duplicates included
    unique: int = 0  # distinct inputs
    cached: int = 0  # distinct inputs found in the cache
    embedded: int = 0  # distinct inputs sent to the embedder (and now cached)


def embed_with_cache(
    texts: Sequence[str],
    embedder: Embedder,
    cache: EmbeddingCache,
    *,
    batch_size: int | None = None,
    progress: bool = False,
    stats: EmbeddingRunStats | None = None,
) -> np.ndarray:
    """Embeddings of `texts`, (len(texts), embedder.dim) float32, one row per input in input order.

    Each distinct text missing from the cache under `embedder.embedder_id` is embedded exactly once, in
    batches of `batch_size` (first-seen order); each batch is committed to `cache` before the next is
    requested. `batch_size` defaults to the embedder's `preferred_batch_size` (for OpenAI: one request, so
    every paid request is committed on its own), else 1024. `progress` shows a tqdm bar over the texts to embed; `stats`, if given, is filled in.
    """
    if batch_size is None:
        batch_size = getattr(embedder, "preferred_batch_size", None) or 1024
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text #{i} is a {type(text).__name__}, expected a string")
    unique = list(dict.fromkeys(texts))
    vectors = cache.get_many(embedder.embedder_id, unique)
    for prompt, vector in vectors.items():
        if vector.shape != (embedder.dim,):
            raise ValueError(
                f"cache {cache.path!r} holds {vector.size}-d vectors under {embedder.embedder_id!r}, but the embedder "
                f"returns {embedder.dim}-d ones (first: {prompt[:60]!r}): use another cache file"
            )
    missing = [text for text in unique if text not in vectors]
    if stats is not None:
        stats.texts, stats.unique, stats.cached, stats.embedded = len(texts), len(unique), len(vectors), 0

    bar = None
    if progress and missing:
        from diffusets_jax.io.progress import progress_bar

        bar = progress_bar(len(missing), unit="prompt", desc=f"embedding ({embedder.embedder_id})")
    try:
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            embedded = np.asarray(embedder.embed(batch), dtype=np.float32)
            if embedded.shape != (len(batch), embedder.dim):
                raise ValueError(
                    f"embedder {embedder.embedder_id!r} returned shape {embedded.shape} for {len(batch)} texts, "
                    f"expected ({len(batch)}, {embedder.dim})"
                )
            cache.put_many(embedder.embedder_id, batch, embedded)
            vectors.update(zip(batch, embedded, strict=True))
            if stats is not None:
                stats.embedded += len(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()

    out = np.empty((len(texts), embedder.dim), np.float32)
    for row, text in enumerate(texts):
        out[row] = vectors[text]
    return out
