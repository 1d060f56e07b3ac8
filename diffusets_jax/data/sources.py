"""The ECG sources we can prepare, their TFDS builders, and one call that prepares one.

Location convention (what `prepare` writes and the input pipeline reads):
`tfds.builder(dataset_name(source), data_dir=DATA_DIR, config=CONFIG)` after `import data_prep.<name>`
(done by `builder_class`), i.e. `DATA_DIR/<name>/<config>/<version>/` holding the TFRecord shards, TFDS's
metadata and `prepare_report.json`. Splits: train / validation / test; `split="all"` is their union (the
published all-data recipe).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any

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
        raise ModuleNotFoundError(
            f"cannot import the dataset builders (data_prep.{name}): run from the diffusets-jax checkout or put "
            "it on PYTHONPATH"
        ) from err
    return module.Builder


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
    **overrides: Any,
) -> dict[str, Any]:
    """Build (or finish building) a source's dataset; returns the build report (see `prepare_report.json`).

    `beam_pipeline_options` ("--runner=DirectRunner,--direct_num_workers=8" style, as `tfds build`) runs the
    decoding through Apache Beam instead of local worker processes. An already complete dataset is not rebuilt.
    """
    import tensorflow_datasets as tfds

    from diffusets_jax.data.builder import REPORT_FILENAME

    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"manual dir {manual_dir!r} does not exist")
    builder = make_builder(source, data_dir, config, **overrides)
    beam_options = None
    if beam_pipeline_options:
        beam = tfds.core.lazy_imports.apache_beam
        beam_options = beam.options.pipeline_options.PipelineOptions(flags=[
            f"--{option.lstrip('-')}" for option in beam_pipeline_options.split(",") if option.strip()
        ])
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, beam_options=beam_options)
    )
    with open(os.path.join(os.fspath(builder.data_dir), REPORT_FILENAME)) as handle:
        return json.load(handle)
