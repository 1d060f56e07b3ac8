"""Output directories owned by one command: never touch a user's files, resume only our own identical run.

Every command that writes a folder (sample, sample --corpus, evaluate, demo, the experiments) opens it with
`output_dir(path, command=..., settings=...)`:

- a missing or empty folder is created and claimed: `.diffusets-run.json` records the command, the settings
  and their fingerprint (a SHA-256 of the canonical JSON of everything that determines the outputs);
- a folder holding that record with the same fingerprint is this run's own earlier work: the command resumes
  (or reports that it is complete); with another fingerprint, or without a record (a user's folder), it is
  refused with one line, before any expensive work, unless `overwrite=True`;
- `overwrite=True` replaces the folder as a whole, but only at the end: the new outputs are written into a
  hidden sibling (`.NAME.new-<fingerprint>`) and swapped in when the command succeeds, so a failed run leaves
  the old folder untouched; the sibling keeps what the failed run wrote, which the same command resumes. A
  folder that is, or holds, one of the run's own inputs (`reads`: a model directory, a dataset, a conditions file)
  is refused even then: replacing it would delete what the run was made from;
- an exclusive lock refuses a second run into the same folder while one is writing;
- a run resumed by another code version than last wrote into it still resumes (the fingerprint is of settings
  and inputs), but the record lists each version (`resumed_by`, `code_history`) and a line says so, so its
  outputs never mix two versions silently.

An existing file where a folder should be, or a folder we cannot write, is refused the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from diffusets_jax.io.files import read_json, replace_folder, write_json_atomic
from diffusets_jax.provenance import stamp

RUN_FILE = ".diffusets-run.json"
# A generating run's prompt vectors when no --embedding-cache is given (`pipeline.ECGGenerator.prompt_embeddings`):
# an output of the run, in sight, so that a run killed mid-way keeps what it paid for and its resume reads them.
RUN_EMBEDDINGS = "embeddings.sqlite"
_OURS_PREFIX = ".diffusets-run"  # the run record and the per-process lock files


def fingerprint(settings: Any) -> str:
    """SHA-256 of the canonical JSON of `settings` (sorted keys, no whitespace): equal settings, equal print."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclasses.dataclass
class RunDir:
    """The claimed output folder. Write into `path`; `resumed` says whether earlier work of this same run is there;
    `complete` whether that earlier run had finished."""

    path: Path
    final: Path
    resumed: bool
    complete: bool
    record: dict[str, Any]
    shared: bool = True  # whether this process writes on process 0's disk (always so on one host)

    def mark_complete(self, **summary: Any) -> None:
        """Record that the run finished (process 0 of a multi-host run writes it, and every host whose --out is on a
        disk of its own writes its own)."""
        import jax

        self.record.update(status="complete", summary=summary)
        if jax.process_index() == 0 or not self.shared:
            write_json_atomic(self.path / RUN_FILE, self.record)


Reads = Sequence[tuple[str, str | os.PathLike | None]]
Resolve = Callable[[dict[str, Any]], dict[str, Any]]


def check_output_path(path: str | os.PathLike, flag: str = "--out", *, command: str | None = None,
                      overwrite: bool = False, reads: Reads = ()) -> Path:
    """Refuse at once an output folder path that is an existing file, sits under one, or cannot be written.

    With `command`, also refuse (unless `overwrite`) a non-empty folder that is not an earlier run of `command`:
    what `output_dir` would refuse, found before a model is loaded. Whether an earlier run of `command` had the
    same settings is for `output_dir` to say. Refuse a folder that is, or is inside, a folder of `reads`, the run's
    inputs as `(flag, path)`, and with `overwrite` one that holds one of them (see `check_reads_apart`).
    """
    _check_not_empty(path, flag)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file: give a directory path")
    if path.is_symlink() and not path.exists():  # creating the folder would fail with a bare "File exists"
        raise ValueError(f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist: create "
                         f"that folder first, or give {flag} another path")
    _check_parents(path, flag)
    if overwrite:
        _check_replaceable(path, flag)
        _check_no_run_inside(path, flag)
    check_reads_apart(path, reads, flag, overwrite=overwrite)
    if command is not None:
        _check_not_in_another_run(path, flag)
    if command is not None and not overwrite and path.is_dir() and _user_entries(path):
        record = path / RUN_FILE
        existing = read_json(record, "run record") if record.is_file() else None
        if existing is None or existing.get("command") != command:
            raise ValueError(_not_ours_message(path, flag, command, existing))
    return path


# The output folders the running command has claimed and writes now (`output_dir`, resolved): a run may nest its
# own outputs' folders in them (the demo's samples/, evaluation/ and training workdirs), which another run may not.
# A context variable set for the `output_dir` block only, not a module-level set: nothing outlives the block.
_CLAIMED: contextvars.ContextVar[frozenset[Path]] = contextvars.ContextVar("claimed_output_folders",
                                                                           default=frozenset())


@contextlib.contextmanager
def _claimed(*folders: Path) -> Iterator[None]:
    token = _CLAIMED.set(_CLAIMED.get() | {folder.resolve() for folder in folders})
    try:
        yield
    finally:
        _CLAIMED.reset(token)


def _check_not_in_another_run(path: Path, flag: str) -> None:
    """Refuse an output folder inside another run's output folder (`--out A/sub`, A holding a run record), whether
    or not `--overwrite`: its files mix with that run's own, that run's rerun takes the folder for a user's file, and
    its `--overwrite` deletes them with it. Folders the run claiming A nests itself (the demo's) are allowed."""
    out = path.resolve()
    for parent in out.parents:
        if (parent / RUN_FILE).is_file() and parent not in _CLAIMED.get():
            try:
                command = read_json(parent / RUN_FILE, "run record").get("command", "unknown")
            except (OSError, ValueError):  # a damaged record still marks another run's folder
                command = "unknown"
            raise ValueError(f"{flag} {path} is inside {parent}, the output folder of a diffusets-jax {command} run: "
                             f"its files would mix with that run's own (and its --overwrite would delete them); "
                             f"choose {flag} outside it")


def check_reads_apart(path: str | os.PathLike, reads: Reads, flag: str = "--out", *, overwrite: bool = True) -> None:
    """Refuse an output (folder or file) that is, or is inside, a folder the run reads, and one that `overwrite`
    would replace while it holds one of the run's inputs.

    `reads`: `(flag, path)` of each input, a file or folder (a WFDB record's `dir/NAME` too; a None path is
    skipped; a dataset given by name, not path, is not one). Outputs inside an input folder (`sample --out
    MODEL/samples`) mix with a model's or a dataset's own files, which whatever replaces that folder (a `convert`
    or `prepare --overwrite`) then takes with it. A TFDS data dir (`DATA_DIR_FLAGS`) is not read as a whole, only
    the dataset under it: an output beside its datasets is not refused. A mistyped `--out` (the folder above the
    dataset), then `--overwrite` because the first try was refused, would delete the dataset or model this very
    run read, once the run finished. Paths are compared resolved (links, `..`).
    """
    out = Path(path).resolve()
    for input_flag, input_path, source in _with_run_folders(reads):
        if input_flag.endswith(_RUN_FOLDER):  # only nesting in it: the run itself may write beside its input
            if source in out.parents:
                raise ValueError(f"{flag} {path} is inside {source}, the run folder of {input_flag[:-len(_RUN_FOLDER)]}"
                                 f" {input_path}, which this run reads: its outputs would mix with that run's own "
                                 f"files; choose {flag} outside it")
            continue
        if overwrite and (source == out or out in source.parents):
            what = "is" if source == out else "holds"
            raise ValueError(f"{flag} {path} {what} {input_flag} {input_path}, which this run reads: --overwrite "
                             f"would replace it with this run's outputs; choose another {flag}")
        if input_flag not in DATA_DIR_FLAGS and source.is_dir() and (source == out or source in out.parents):
            what = "is" if source == out else "is inside"
            raise ValueError(f"{flag} {path} {what} {input_flag} {input_path}, which this run reads: its outputs "
                             f"would mix with that folder's own files; choose {flag} outside it")


def _with_run_folders(reads: Reads) -> Iterator[tuple[str, str | os.PathLike, Path]]:
    """`(flag, path, resolved path)` of each input, and after a file or a `wfdb/` folder of another run's output
    folder (a `sample` run's `samples.npz` or `wfdb/`, a kit's `key.json`: a run record beside it) that folder too,
    its flag marked with `_RUN_FOLDER`. The run reads it as well (its run record, its manifest), and an output
    put inside it (`turing-kit --generated GEN/samples.npz --out GEN/kit`) mixes with that run's files, which its
    own `--overwrite` then deletes."""
    for input_flag, input_path in reads:
        if input_path is None:
            continue
        source = Path(input_path).resolve()
        yield input_flag, input_path, source
        # The run record first: the folder-name check imports io.outputs (and JAX), which a model directory or a
        # dataset given as input need not pay for in a check made before any work.
        if (source.parent / RUN_FILE).is_file() and (not source.is_dir() or _is_wfdb_folder(source)):
            yield input_flag + _RUN_FOLDER, input_path, source.parent


_RUN_FOLDER = " (its run folder)"  # marks the entries `_with_run_folders` adds


def _is_wfdb_folder(path: Path) -> bool:
    from diffusets_jax.io.outputs import WFDB_FOLDER  # imported here: io.outputs imports JAX

    return path.name == WFDB_FOLDER


# The flags naming a TFDS data dir: a folder of datasets, of which a run reads only the one it names.
DATA_DIR_FLAGS = ("--data-dir", "--config.data.data_dir")


def _check_replaceable(path: Path, flag: str) -> None:
    """`--overwrite` replaces the folder as a whole: never the working directory, the home directory or a folder
    holding one (`--out .` given --overwrite after the first refusal)."""
    out = path.resolve()
    for what, place in (("the current directory", Path.cwd()), ("your home directory", Path.home())):
        place = place.resolve()
        if place == out or out in place.parents:
            raise ValueError(f"{flag} {path} {'is' if place == out else 'holds'} {what} ({place}): --overwrite "
                             f"replaces the folder as a whole; give {flag} a folder of its own")


def _check_no_run_inside(path: Path, flag: str, then: str = "") -> None:
    """`--overwrite` deletes the folder as a whole: refuse one holding, in a subfolder, the output folder of a
    diffusets-jax run writing now (`--out A --overwrite` while a `--out A/sub` runs). That run went on writing
    into the folder being deleted and ended with exit 0, its outputs gone. `then`: what to add to the line."""
    if not path.is_dir():
        return
    for folder, _, files in os.walk(path):
        if Path(folder) == path:  # its own lock is `output_dir`'s to take
            continue
        for name in files:
            if name.startswith(f"{_OURS_PREFIX}-p") and name.endswith(".lock") and _held(Path(folder) / name):
                raise ValueError(f"{flag} {path} holds {folder}, where another diffusets-jax run is writing now: "
                                 f"--overwrite would delete its outputs; wait for it to finish, or choose another "
                                 f"{flag}{then}")


def _held(lock: Path) -> bool:
    """Whether another process holds the run lock file `lock` (`exclusive_lock`): a live run, not a finished one's
    file. Only looked at, shared and at once, never waited for."""
    try:
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    return True
                raise
            fcntl.flock(handle, fcntl.LOCK_UN)
    except (FileNotFoundError, PermissionError):  # gone meanwhile, or not ours to read
        return False
    return False


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Refuse at once an output file path that is a directory, sits under a file, or cannot be written."""
    _check_not_empty(path, flag)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory: give a file path")
    _check_parents(path, flag)
    return path


def _check_not_empty(path: str | os.PathLike, flag: str) -> None:
    """Refuse an empty path (`--out "$OUT"` with OUT unset): Path("") is the current directory, which an empty one
    was then claimed and written into."""
    if isinstance(path, str) and not path.strip():
        raise ValueError(f"{flag} is empty: give a path (was a shell variable unset?)")


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"{flag} {path}: cannot write in {parent} (permission denied)")
            break


def _not_ours_message(path: Path, flag: str, command: str, existing: dict[str, Any] | None) -> str:
    if existing is None:
        return (f"{flag} {path} is not empty and was not written by diffusets-jax {command}: choose a new "
                "directory, or pass --overwrite to replace it as a whole")
    return (f"{flag} {path} holds a diffusets-jax {existing.get('command', 'unknown')} run, not {command}: choose a "
            "new directory, or pass --overwrite to replace it as a whole")


def _user_entries(path: Path) -> list[str]:
    return sorted(name for name in os.listdir(path) if not name.startswith(_OURS_PREFIX))


def _process() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, message: str, name: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (a lock file in it) or raise ValueError(`message`) at once when
    another process holds it. The one lock behind every "refuse a concurrent run" of this project. `name`
    names the lock file (default: one per process of a multi-host run, which share the folder on a shared disk).
    """
    directory = Path(directory)
    with open(directory / (name or f"{_OURS_PREFIX}-p{_process()[0]}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise ValueError(message) from None
            raise
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


READERS_LOCK = f"{_OURS_PREFIX}-readers.lock"  # in a dataset folder: held shared by every run reading it


def add_readers_lock(dataset_dir: str | os.PathLike) -> None:
    """Give a dataset folder this run has just written (`prepare`, `encode`) its `READERS_LOCK` file, which `reading`
    locks. Written by the dataset's maker, so that reading a dataset never writes into it."""
    (Path(dataset_dir) / READERS_LOCK).touch()


@contextlib.contextmanager
def reading(dataset_dir: str | os.PathLike) -> Iterator[None]:
    """Hold a shared lock on the dataset folder `dataset_dir` while a run reads it (a training, for days), so that a
    `prepare` or `encode` with --overwrite, which take it exclusively (`exclusive_lock(..., name=READERS_LOCK)`)
    before they move the folder, refuse to replace it under the reader instead of crashing it mid-run. Raises
    ValueError at once when one is replacing it now. A dataset without the lock file (made before it existed, or
    by other tools) is read without one."""
    path = Path(dataset_dir) / READERS_LOCK
    if not path.is_file():
        yield
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise ValueError(f"{dataset_dir} is being replaced now (a prepare or encode with --overwrite): wait "
                                 "for it to finish, then start again") from None
            raise
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, *, command: str, settings: dict[str, Any], overwrite: bool = False,
               flag: str = "--out", reads: Reads = (), resolve: Resolve | None = None) -> Iterator[RunDir]:
    """Claim `path` for one run of `command` with `settings` (see the module docstring); yields a `RunDir`.
    `reads`: the run's inputs as `(flag, path)`, which `overwrite` may not replace (`check_reads_apart`).
    `resolve`: settings -> the same with what the run reads from its inputs filled in (a training's dataset size);
    a record of another fingerprint whose settings resolve to what `settings` resolve to is this same run, given
    once as written and once resolved (a run's own saved config.json). The record keeps its fingerprint.

    On a clean exit with `overwrite`, the new folder replaces the old one; on an exception the old one is kept,
    and the partial new one too when it holds outputs (a training's checkpoints), for the same command to resume;
    one holding nothing but the run record is removed. A new run that fails having written nothing but its run record
    takes the record and its lock back out and removes the folders it created (`_undo_claim`): a command that
    produced nothing leaves no empty folder behind, and a user's empty folder as it found it.
    """
    from diffusets_jax import parallel

    # A user's folder is refused before anything (even a lock file) is created in it.
    final = check_output_path(path, flag, command=command, overwrite=overwrite, reads=reads)
    digest = fingerprint({"command": command, **settings})
    index, count = _process()
    _check_same_settings(digest, settings, flag, final)  # before anything is created: one line on every host
    created = [folder for folder in (final, *final.absolute().parents) if not folder.exists()]
    new_lock = not (final / f"{_OURS_PREFIX}-p{index}.lock").exists()  # the lock file `exclusive_lock` opens
    final.mkdir(parents=True, exist_ok=True)
    busy = f"{flag} {final}: another diffusets-jax run is writing there now; wait for it or choose another directory"
    with contextlib.ExitStack() as held:
        # A refusal here may be one host's alone (its own disk holds another run, another run holds its lock): it
        # stops every host, not only that one, while the others wait for it. Every host looked before any writes.
        with parallel.failing_together():
            try:
                held.enter_context(exclusive_lock(final, busy))
            except FileNotFoundError:  # its lock file's folder is gone since the mkdir above
                raise ValueError(f"{flag} {final}: another diffusets-jax run that was starting there failed and removed "
                                 "the folder it had created while this run started: run the command again") from None
            existing = read_json(final / RUN_FILE, "run record") if (final / RUN_FILE).exists() else None
            entries = _user_entries(final)
            same = existing is not None and existing.get("fingerprint") == digest
            ours = existing is not None and existing.get("command") == command
            if not same and ours and resolve is not None:
                old_settings, new_settings = resolve(existing.get("settings", {})), resolve(settings)
                same = fingerprint(old_settings) == fingerprint(new_settings)
            else:
                old_settings, new_settings = (existing or {}).get("settings", {}), settings
            if entries and not same and not overwrite:
                if not ours:
                    raise ValueError(_not_ours_message(final, flag, command, existing))
                raise ValueError(
                    f"{flag} {final} holds an earlier {existing.get('command', 'different')} run with other "
                    f"settings ({differences(old_settings, new_settings)}): choose a new directory, rerun with the "
                    "same settings to resume, or pass --overwrite to replace it")
        record = {"command": command, "fingerprint": digest, "settings": settings, "status": "running", **stamp()}
        if entries and overwrite and not same:
            # What is replaced is the folder `final` names: for a symbolic link (--out on a scratch disk, linked from
            # home), the folder it points to. Renaming over the link itself replaced the link with a new folder on
            # the link's disk and left the old outputs where it pointed.
            replaced = Path(os.path.realpath(final)) if final.is_symlink() else final
            # The same hidden sibling on every host; swapped in by process 0 once every host is done.
            staging = replaced.parent / f".{replaced.name}.new-{digest[:12]}"
            staging.mkdir(exist_ok=True)
            # What a killed or failed run of this same command left there is resumed as in `final` without
            # --overwrite: said so (`resumed`, `complete`), and its record kept. Told it was a new run, a command
            # redid the work it had (each model of an evaluation, a finished run killed before the swap), and the
            # rewritten record lost the code versions that had written the outputs.
            earlier = read_json(staging / RUN_FILE, "run record") if (staging / RUN_FILE).is_file() else None
            resumed = earlier is not None and earlier.get("fingerprint") == digest and bool(_user_entries(staging))
            if resumed:
                record = _record_other_code(earlier, staging, flag, index)
            elif index == 0:
                write_json_atomic(staging / RUN_FILE, record)
            shared, complete = _record_on_every_disk(final, staging, record, digest,
                                                     complete=resumed and record.get("status") == "complete")
            try:
                with _claimed(staging, final):
                    yield RunDir(staging, final, resumed=resumed, complete=complete, record=record, shared=shared)
            except BaseException:
                if count == 1:
                    if not _user_entries(staging):  # nothing but our record: no trace of the failed run is left
                        shutil.rmtree(staging, ignore_errors=True)
                    # Otherwise its outputs stay, as a failed run's do without overwrite (`_undo_claim`): a
                    # training's checkpoints (its NaN-loss line names the last good one there), an encoding's
                    # shards. The same command again finds them (the sibling's name is of its fingerprint) and
                    # resumes.
                    if new_lock:  # the folder it was to replace is left as it was found, without our lock file
                        with contextlib.suppress(OSError):
                            os.remove(final / f"{_OURS_PREFIX}-p{index}.lock")
                raise
            parallel.barrier(f"output-dir-done-{digest[:12]}")
            with parallel.failing_together():  # also the barrier before the others look for their own staging
                if index == 0:
                    # One started in a subfolder since this run began: this run's outputs stay where they are.
                    _check_no_run_inside(final, flag, f" (this run's outputs are left in {staging}: run the same "
                                                      "command again once it has finished)")
                    replace_folder(staging, replaced)  # the folder the user asked us to replace goes once ours is in
            with parallel.failing_together():
                # A host on a disk of its own still has its staging folder, which process 0 could not swap in: left
                # there, its outputs stayed hidden and its --out kept the old run's files.
                if index != 0 and staging.exists():
                    replace_folder(staging, replaced)
            return
        if same:
            existing = _record_other_code(existing, final, flag, index)
            shared, complete = _record_on_every_disk(final, final, existing, digest,
                                                     complete=existing.get("status") == "complete")
            with _claimed(final):
                yield RunDir(final, final, resumed=True, complete=complete, record=existing, shared=shared)
            return
        if index == 0:
            write_json_atomic(final / RUN_FILE, record)
        shared, _ = _record_on_every_disk(final, final, record, digest, complete=False)
        try:
            with _claimed(final):
                yield RunDir(final, final, resumed=False, complete=False, record=record, shared=shared)
        except BaseException:
            if count == 1:  # hosts of a multi-host run may still be writing there
                _undo_claim(final, created)
            raise


def _record_on_every_disk(final: Path, folder: Path, record: dict[str, Any], digest: str, *,
                          complete: bool) -> tuple[bool, bool]:
    """After process 0 has written (or found) `record` in `folder` (`final` or its staging sibling): write it on every
    other host that does not see it there, a host whose `--out` is on a disk of its own. Returns whether this host
    shares process 0's disk (it sees the lock file process 0 has just opened in `final`) and whether the run is
    complete as process 0's record says (`complete`, this host's view). One host: `(True, complete)`.

    Every host of a multi-host run calls this once per `output_dir`, whichever way it claimed its folder. Without a
    record of its own, a host on its own disk held outputs (its shards, records, NPZ) that a rerun of the same
    command took for a user's folder and refused, so a crashed run could not resume; and with hosts reading
    `complete` each from its own disk, one returned at once while another generated, waiting at a collective."""
    from diffusets_jax import parallel

    index, count = _process()
    if count == 1:
        return True, complete
    parallel.barrier(f"run-record-{digest[:12]}")  # process 0's record and lock are on its disk (`digest`: every host's)
    shared = index == 0 or (final / f"{_OURS_PREFIX}-p0.lock").exists()
    with parallel.failing_together():  # a host whose disk refuses the record stops every host
        path = folder / RUN_FILE
        if index != 0 and not (path.is_file() and
                               read_json(path, "run record").get("fingerprint") == record.get("fingerprint")):
            write_json_atomic(path, record)
    return shared, bool(parallel.allgather_objects(complete)[0])


def _undo_claim(final: Path, created: Sequence[Path]) -> None:
    """After a new run into `final` failed: if it holds nothing but the run's own record and lock files, remove
    those, then each folder of `created` (the folder and the parents this run made, innermost first) with
    `os.rmdir`, which removes only an empty folder, so nothing the run did not make is ever removed. A folder that
    holds outputs keeps them, to be inspected or resumed."""
    if _user_entries(final):
        return
    for name in os.listdir(final):  # ours only: what _user_entries leaves out
        with contextlib.suppress(OSError):  # the error being raised is the one to report, not this
            os.remove(final / name)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # no longer empty (someone wrote there meanwhile), or not ours to remove
            return


def _check_same_settings(digest: str, settings: dict[str, Any], flag: str, final: Path) -> None:
    """Refuse, on every process of a multi-host run (a no-op on one host), hosts given other settings: another
    --seed or config on one host would mix two runs' outputs in one folder. One line naming the difference."""
    from diffusets_jax import parallel

    if _process()[1] == 1:
        return
    digests = parallel.allgather_objects(digest)
    if any(d != digests[0] for d in digests):
        everyone = parallel.allgather_objects(settings)  # only now: a conditions file's settings can be large
        other = next(i for i, d in enumerate(digests) if d != digests[0])
        raise ValueError(f"{flag} {final}: the processes of this multi-host run were given other settings "
                         f"(process 0 -> process {other}: {differences(everyone[0], everyone[other])}): run the "
                         "same command on every host")


def code_history(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every code version that wrote into the run of `record`, in order: the one that began it, then each other
    version that resumed it (`resumed_by`)."""
    return [record.get("code"), *(entry.get("code") for entry in record.get("resumed_by", []))]


def _record_other_code(existing: dict[str, Any], final: Path, flag: str, index: int) -> dict[str, Any]:
    """A run resumed by other code than last wrote into it (an upgrade between a crash and the rerun): its outputs
    would mix two versions without a trace. The fingerprint cannot refuse this, since it is of the settings and
    inputs, and refusing would cost days of a corpus; instead the record lists each version with when it took over
    (`resumed_by`), a line says so now, and the outputs' summaries report the mixture (`code_history`)."""
    current = stamp()
    last = code_history(existing)[-1]
    if last == current["code"] or existing.get("status") == "complete":  # a finished run gets nothing new
        return existing
    record = {**existing, "resumed_by": [*existing.get("resumed_by", []), current]}
    if index == 0:
        write_json_atomic(final / RUN_FILE, record)
        print(f"diffusets-jax: note: {flag} {final} was last written by {_describe_code(last)} and is resumed by "
              f"{_describe_code(current['code'])}: what this run adds comes from this version; {RUN_FILE} lists "
              "both (resumed_by)", file=sys.stderr)
    return record


def _describe_code(code: dict[str, Any] | None) -> str:
    code = code or {}
    commit = code.get("git_commit")
    where = f" (commit {commit[:12]}{', uncommitted changes' if code.get('git_dirty') else ''})" if commit else ""
    return f"diffusets-jax {code.get('package_version') or 'of unknown version'}{where}"


def differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What changed from settings `old` to `new`, by dotted key (`config.optimizer.learning_rate: 0.001 -> 0.002`),
    for the one line that refuses a run or an export with other settings.

    Leaves are compared as the fingerprint sees them, as canonical JSON text: 32.0 and 32 differ there (and in
    what they train), so they differ here, and a recorded tuple (now a JSON list) equals the same tuple given
    again."""
    old_leaves, new_leaves = _leaves(_as_json(old)), _leaves(_as_json(new))
    keys = sorted(k for k in set(old_leaves) | set(new_leaves)
                  if old_leaves.get(k, _ABSENT) != new_leaves.get(k, _ABSENT))
    if not keys:
        return "same settings, other version"
    shown = ", ".join(f"{k}: {_short(old_leaves.get(k, _ABSENT))} -> {_short(new_leaves.get(k, _ABSENT))}"
                      for k in keys[:_SHOWN])
    rest = keys[_SHOWN:]
    return shown + (f" and {len(rest)} more ({', '.join(rest)})" if rest else "")


_SHOWN = 4  # changed keys shown with their values; any further ones are only named
_ABSENT = "(absent)"  # a key one side does not have (not valid JSON text, so never a leaf's own)


def _as_json(value: Any) -> Any:
    # As the fingerprint serialises it (`default=str`): the recorded settings went through JSON, the new ones not.
    return json.loads(json.dumps(value, default=str))


def _leaves(value: Any, prefix: str = "") -> dict[str, str]:
    """Every leaf of a JSON value by dotted key, as canonical JSON text (the fingerprint's form). Lists are leaves:
    a tuple setting is one value (`model.widths`)."""
    if isinstance(value, dict) and (value or not prefix):  # an empty section is a leaf, empty settings none
        leaves: dict[str, str] = {}
        for key, item in value.items():
            leaves.update(_leaves(item, f"{prefix}{key}."))
        return leaves
    return {prefix[:-1]: json.dumps(value, sort_keys=True, separators=(", ", ": "))}


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."
