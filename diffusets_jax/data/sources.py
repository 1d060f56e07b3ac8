"""The ECG sources we can prepare, their TFDS builders, and one call that prepares one.

Location convention (what `prepare` writes and the input pipeline reads):
`tfds.builder(dataset_name(source), data_dir=DATA_DIR, config=CONFIG)` after `import data_prep.<name>`
(done by `builder_class`), i.e. `DATA_DIR/<name>/<config>/<version>/` holding the TFRecord shards, TFDS's
metadata and `prepare_report.json`. Splits: train / validation / test; `split="all"` is their union (the
published all-data recipe).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from diffusets_jax.data.card import CARD_FILE

# CLI source name -> TFDS dataset name (= the `data_prep` package holding its builder).
SOURCES: dict[str, str] = {
    "mimic-iv-ecg": "mimic_iv_ecg",
    "ptbxl": "ptbxl",
    "physionet-challenge": "physionet_challenge",
}


def dataset_name(source: str) -> str:
    """TFDS name of a source given by its CLI name ('mimic-iv-ecg') or TFDS name ('mimic_iv_ecg')."""
    if source in SOURCES:
        return SOURCES[source]
    if source in SOURCES.values():
        return source
    raise ValueError(f"unknown ECG source {source!r}; choose one of {', '.join(SOURCES)}")


def builder_class(source: str) -> type:
    """The TFDS builder class of a source; importing it registers the dataset name with TFDS."""
    name = dataset_name(source)
    try:
        module = importlib.import_module(f"data_prep.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("data_prep", f"data_prep.{name}"):
            raise  # a dependency of the builder is missing: Python's message names it
        raise ModuleNotFoundError(_builders_not_found(name)) from err
    return module.Builder


def _builders_not_found(name: str) -> str:
    """Why `data_prep.<name>` cannot be imported, and what to do.

    `data_prep` is a top-level package, installed next to `diffusets_jax` (site-packages, or the checkout), so a
    user's own `data_prep.py` or `data_prep/` in the current folder (first on sys.path for `python -m` and
    notebooks) hides it."""
    ours = Path(__file__).resolve().parents[2] / "data_prep"
    found = sys.modules.get("data_prep")
    where = getattr(found, "__file__", None) or next(iter(getattr(found, "__path__", [])), None)
    if where is not None and not Path(where).resolve().is_relative_to(ours):
        return (f"cannot import the dataset builders (data_prep.{name}): Python found another `data_prep`, {where}, "
                f"before diffusets-jax's ({ours}); run from a folder without it, or rename it")
    return (f"cannot import the dataset builders (data_prep.{name}): diffusets-jax's `data_prep` package is missing "
            "or incomplete; reinstall diffusets-jax, or run from its checkout")


def make_builder(
    source: str,
    data_dir: str,
    config: str = "local",
    *,
    workers: int | None = None,
    chunk_size: int = 0,
    embedding_cache_path: str | None = None,
    embedder: Any = None,
    **config_overrides: Any,
):  # noqa: ANN201 (a tfds.core.DatasetBuilder)
    """A builder for `source` in `data_dir` with a named config ("local", "openai", ...).

    `workers`, `chunk_size`, `embedding_cache_path` and `embedder` (a constructed embedder to reuse, see
    `EcgDatasetBuilder`) change only how the dataset is built.
    `config_overrides` change what it contains (split_fractions, embedder_options, ...) and need a new config
    `name=` (TFDS keeps each config in its own folder), e.g. `name="local_70_15_15", split_fractions=(...)`.
    """
    cls = builder_class(source)
    configs = {c.name: c for c in cls.BUILDER_CONFIGS}
    if config not in configs:
        raise ValueError(f"{dataset_name(source)} has no config {config!r}; choose one of {', '.join(configs)}")
    chosen = configs[config]
    if config_overrides:
        if config_overrides.get("name", config) == config:
            raise ValueError(
                f"options {', '.join(sorted(config_overrides))} change the dataset's content: give this variant its "
                "own config name (name=...)"
            )
        unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(chosen)})
        if unknown:
            raise ValueError(f"unknown builder config option(s) {', '.join(unknown)}")
        chosen = dataclasses.replace(chosen, **config_overrides)
    return cls(
        config=chosen, data_dir=data_dir, workers=workers, chunk_size=chunk_size,
        embedding_cache_path=embedding_cache_path, embedder=embedder,
    )


def prepare(
    source: str,
    manual_dir: str,
    data_dir: str,
    config: str = "local",
    beam_pipeline_options: str | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Build (or finish building) a source's dataset; returns the build report (see `prepare_report.json`).

    `beam_pipeline_options` ("--runner=DirectRunner,--direct_num_workers=8" style, as `tfds build`) runs the
    decoding through Apache Beam instead of local worker processes.

    A complete dataset built from the same records (its card's `records_fingerprint`: every record's path,
    metadata and files' size and modification time, whatever folder they are in now) is not rebuilt. One built
    from other records is refused unless `overwrite`, which rebuilds it and replaces the old one once the new one
    is complete (a failed rebuild puts the old one back, as does a rebuild that writes no example: RunFailed). A
    second prepare of the same dataset while one runs is refused (a lock). A temporary folder TFDS left behind for
    this dataset and version (a killed build's, or a `tfds build` running now, which takes no lock) is named on
    stderr and left alone: it is not this run's to delete. The dataset a killed `overwrite` had moved aside is
    restored when none is in place, else named (`_recover_replaced`).
    """
    import tensorflow_datasets as tfds

    from diffusets_jax.data.builder import REPORT_FILENAME
    from diffusets_jax.errors import RunFailed
    from diffusets_jax.io.files import read_json
    from diffusets_jax.io.run_dir import READERS_LOCK, add_readers_lock, check_output_path, exclusive_lock

    if os.path.isfile(manual_dir):
        raise NotADirectoryError(f"--manual-dir {manual_dir} is a file: give the folder of the download")
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"--manual-dir {manual_dir} does not exist")
    check_output_path(data_dir, "--data-dir")
    builder = make_builder(source, data_dir, config, **overrides)
    if not sys.stderr.isatty():  # TFDS's own bars print a line per update in a log file; ours report progress
        tfds.disable_progress_bar()
    origin = builder.records_fingerprint(manual_dir)  # lists the records (reads the source tables) once, and
    # refuses an unusable table, before anything is created under the data dir
    dataset_dir = Path(os.fspath(builder.data_dir))
    if not _built_from(builder, _recorded_origin(builder, dataset_dir), origin, manual_dir, note=False):
        # A build is needed (judged again under the lock): a missing OpenAI key or a damaged embedding cache is
        # refused now, before the data dir's folders exist. A complete dataset needs no embedder, nor its key.
        builder.check_embedding()
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    where = f"{builder.name}/{builder.builder_config.name} {builder.version}"
    busy = f"--data-dir {data_dir}: another prepare of {where} is running there now; wait for it to finish"
    with exclusive_lock(dataset_dir.parent, busy, name=f".diffusets-prepare-{builder.version}.lock"), \
            contextlib.ExitStack() as guards:
        for folder in _interrupted_builds(dataset_dir):
            print(f"note: {folder} is a temporary folder TFDS left for {where} (a killed build's, or a `tfds build` "
                  "running now); it is left as it is: remove it once no build of this dataset is running",
                  file=sys.stderr)
        _recover_replaced(dataset_dir, where)
        retired = None
        if builder.is_prepared():
            recorded = _recorded_origin(builder, dataset_dir)
            if _built_from(builder, recorded, origin, manual_dir, note=True):
                return read_json(dataset_dir / REPORT_FILENAME, "prepare report")
            if not overwrite:
                raise ValueError(_other_source_message(dataset_dir, where, recorded, origin, manual_dir))
            # Not while a run reads it (`io.run_dir.reading`): held until the new build has replaced it.
            guards.enter_context(exclusive_lock(
                dataset_dir, f"--overwrite: {dataset_dir} is being read by a run now (a training or an encode): wait "
                "for it to finish, or prepare into another --data-dir", name=READERS_LOCK))
            # Kept beside the new build until it is complete: a failed rebuild puts it back.
            retired = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.replaced-", dir=dataset_dir.parent))
            os.replace(dataset_dir, retired / dataset_dir.name)
        beam_options = None
        if beam_pipeline_options:
            beam = tfds.core.lazy_imports.apache_beam
            beam_options = beam.options.pipeline_options.PipelineOptions(flags=[
                f"--{option.lstrip('-')}" for option in beam_pipeline_options.split(",") if option.strip()
            ])
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, beam_options=beam_options)
            )
        except BaseException:
            if retired is not None:
                _put_back(retired, dataset_dir)
            raise
        report = read_json(dataset_dir / REPORT_FILENAME, "prepare report")
        add_readers_lock(dataset_dir)
        if retired is not None:
            if not report["examples_written"]:  # TFDS calls a build that skipped every record complete; we do not
                _put_back(retired, dataset_dir)
                raise RunFailed(
                    f"the rebuild from --manual-dir {manual_dir} wrote no example (all {report['records_listed']} "
                    f"records skipped, counted above), so {dataset_dir} is kept as it was "
                    f"(built from {recorded.get('manual_dir', 'an earlier download')}): fix the records, or pass "
                    "another --manual-dir"
                )
            shutil.rmtree(retired, ignore_errors=True)  # the dataset --overwrite asked us to replace
        return report


def _built_from(builder: Any, recorded: dict[str, Any], origin: dict[str, Any], manual_dir: str,  # noqa: ANN401
                note: bool) -> bool:
    """Whether the complete dataset whose card recorded `recorded` was built from the records of `origin`. A card
    written before record files were stamped (until 2026-12-06) matches by the fingerprint it recorded then, so
    datasets prepared before are still complete; `note` says once that a record file changed since cannot be
    noticed for them."""
    fingerprint = recorded.get("records_fingerprint")
    if fingerprint is None:
        return False
    if fingerprint == origin["records_fingerprint"]:
        return True
    if fingerprint != builder.legacy_records_fingerprint(manual_dir):
        return False
    if note:
        print(f"note: {builder.data_dir} was prepared before diffusets-jax recorded its record files' sizes and times, "
              "so a record file changed since cannot be noticed: pass --overwrite to rebuild it if you changed any",
              file=sys.stderr)
    return True


def _recorded_origin(builder: Any, dataset_dir: Path) -> dict[str, Any]:  # noqa: ANN401 (a builder)
    """What the complete dataset in place was built from (its card's `derived_from`); {} when none is complete or
    an earlier diffusets-jax did not record it."""
    from diffusets_jax.io.files import read_json

    if not builder.is_prepared() or not (dataset_dir / CARD_FILE).is_file():
        return {}
    return read_json(dataset_dir / CARD_FILE, "dataset card").get("derived_from", {})


def _put_back(retired: Path, dataset_dir: Path) -> None:
    """Undo an --overwrite whose rebuild did not succeed: this run's own (partial or empty) rebuild is removed and
    the dataset it was to replace goes back in place."""
    shutil.rmtree(dataset_dir, ignore_errors=True)
    os.replace(retired / dataset_dir.name, dataset_dir)
    retired.rmdir()


def _recover_replaced(dataset_dir: Path, where: str) -> None:
    """Deal with the datasets a killed `prepare --overwrite` left moved aside (`.<version>.replaced-*`, made only
    by `prepare`, and we hold its lock, so none is in use): with no dataset in place, the newest goes back (it
    was complete when it was moved); beside one, each is named, never deleted: it is the user's old dataset."""
    retired = sorted((folder for folder in dataset_dir.parent.glob(f".{dataset_dir.name}.replaced-*")
                      if (folder / dataset_dir.name).is_dir()), key=lambda folder: folder.stat().st_mtime_ns)
    if retired and not dataset_dir.exists():
        newest = retired.pop()
        os.replace(newest / dataset_dir.name, dataset_dir)
        newest.rmdir()
        print(f"note: {newest / dataset_dir.name} is the {where} an interrupted `prepare --overwrite` moved aside, "
              f"and no dataset was in place: it is restored to {dataset_dir}", file=sys.stderr)
    for folder in retired:
        print(f"note: {folder / dataset_dir.name} is an older {where} an interrupted `prepare --overwrite` moved "
              f"aside; {dataset_dir} has replaced it, so it is left as it is: remove it once you no longer need it",
              file=sys.stderr)


def _interrupted_builds(dataset_dir: Path) -> list[Path]:
    """The temporary folders TFDS names `incomplete.<random>_<version>` beside `dataset_dir` for this dataset and
    version (TFDS renames its folder into place only when the build is complete). Our lock does not tell a killed
    build's from that of a `tfds build` running now, so they are reported, never removed; a new build writes a
    folder of its own and is not disturbed by them."""
    return sorted(folder for folder in dataset_dir.parent.glob(f"incomplete.??????_{dataset_dir.name}")  # 6 A-Z0-9
                  if folder.is_dir())


def _other_source_message(dataset_dir: Path, where: str, recorded: dict[str, Any], origin: dict[str, Any],
                          manual_dir: str) -> str:
    if "records_fingerprint" not in recorded:
        return (f"{dataset_dir} already holds a complete {where}, prepared by an earlier diffusets-jax that did not "
                f"record which records it was built from, so it cannot be told from --manual-dir {manual_dir}: use it "
                "as it is (it is complete), or pass --overwrite to rebuild it from this download")
    return (f"{dataset_dir} already holds a complete {where} built from {recorded.get('manual_dir')} "
            f"({recorded.get('records')} records, fingerprint {recorded['records_fingerprint'][:12]}), not from "
            f"--manual-dir {manual_dir} ({origin['records']} records, fingerprint "
            f"{origin['records_fingerprint'][:12]}; records, their metadata or their files' size or modification time "
            "differ): pass another --data-dir, or --overwrite to rebuild it from this download")
