"""Reports files -> prompts -> cached embeddings: what `diffusets-jax embed` runs.

Accepted inputs (one record per row / line):
- CSV with MIMIC-IV-ECG's `report_0` ... `report_17` columns (e.g. `machine_measurements.csv` itself): the
  non-empty fields, in order, are the report's statements.
- CSV with a `report` column (or the column named by `column`): statements joined by `|`.
- JSON Lines: objects with `report_lines` (a list of statements) or `report` (a list, or a `|`-joined string),
  or the key named by `column`; a bare JSON string or list per line also works.

`template` turns statements into the embedded text: "ordered" (DiffuSETS' ordered prompt, the default),
"free_text" (PTB-XL's "The report of the ECG is that {report}.") or "none" (the field as is, e.g. a
`prompt` column that already holds built prompts). Records with no usable report are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from diffusets_jax.conditioning.cache import EmbeddingCache, EmbeddingRunStats, embed_with_cache
from diffusets_jax.conditioning.embedders import Embedder
from diffusets_jax.conditioning.prompts import LINE_SEPARATOR, PROMPT_STYLES, make_prompt
from diffusets_jax.io.files import atomic_path, check_input_file
from diffusets_jax.io.tables import LINE_COLUMN, read_csv_table

Template = Literal["ordered", "free_text", "none"]
TEMPLATES = (*PROMPT_STYLES, "none")
_MIMIC_REPORT_COLUMN = re.compile(r"report_(\d+)$")
_MAX_EXAMPLES = 5


@dataclasses.dataclass
class ReportPrompts:
    """Prompts read from a reports file, one per usable record, in file order."""

    prompts: list[str]
    skipped: int = 0
    skipped_examples: list[str] = dataclasses.field(default_factory=list)  # "line N: why", the first few

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < _MAX_EXAMPLES:
            self.skipped_examples.append(f"{where}: {why}")


def _to_prompt(value: object, template: Template) -> str:
    if template in PROMPT_STYLES:
        return make_prompt(value, template)  # type: ignore[arg-type]
    if not isinstance(value, str):
        raise ValueError(f"template 'none' needs a text field, got a {type(value).__name__}")
    if not value.strip():
        raise ValueError("empty text")
    return value


def read_report_prompts(path: str | os.PathLike, *, column: str | None = None, template: Template = "ordered") -> ReportPrompts:
    """Read a `.csv` or `.jsonl` reports file (see the module docstring) into prompts."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    path = check_input_file(path, "reports file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise ValueError(f"{path}: unknown reports format {suffix!r}; expected .csv or .jsonl")
    return _read_csv(path, column, template) if suffix == ".csv" else _read_jsonl(path, column, template)


def _read_csv(path: Path, column: str | None, template: Template) -> ReportPrompts:
    out = ReportPrompts([])
    # The reader `prepare` reads its tables with: a BOM, rows that are not UTF-8 or malformed (skipped and named
    # by the line they start on), an unclosed quote (refused, naming its line), fields of any length.
    table = read_csv_table(os.fspath(path), what="reports file", skip=lambda line, why: out.skip(f"line {line}", why),
                           na_filter=False)  # report text as written: a statement "NA" stays a statement
    header = [str(name) for name in table.columns if name != LINE_COLUMN]
    if column is not None:
        if column not in header:
            raise ValueError(f"{path}: no column {column!r}; columns are {', '.join(header)}")
        fields = [column]
    else:
        numbered = sorted((int(m.group(1)), name) for name in header if (m := _MIMIC_REPORT_COLUMN.match(name)))
        fields = [name for _, name in numbered] or (["report"] if "report" in header else [])
        if not fields:
            raise ValueError(
                f"{path}: no report columns (report_0..report_17 or report); columns are {', '.join(header)}. "
                "Name the column with --column."
            )
    for line, *cells in table[[LINE_COLUMN, *fields]].itertuples(index=False, name=None):
        value: object = cells[0] if len(fields) == 1 else list(cells)
        if len(fields) == 1 and template == "ordered":
            value = str(value).split(LINE_SEPARATOR)
        try:
            out.prompts.append(_to_prompt(value, template))
        except ValueError as err:
            out.skip(f"line {line}" if isinstance(line, int | np.integer) else str(line), str(err))
    return out


def _read_jsonl(path: Path, column: str | None, template: Template) -> ReportPrompts:
    out = ReportPrompts([])
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                # Line by line, so one line that is not UTF-8 is skipped and counted, not the end of the run; a
                # BOM (a file saved as "UTF-8 with BOM") is not part of the first record.
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError:
                out.skip(f"line {line_number}", "not UTF-8 text")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if isinstance(record, dict):
                    keys = [column] if column else ["report_lines", "report"]
                    key = next((k for k in keys if k in record), None)
                    if key is None:
                        raise ValueError(f"no {' or '.join(repr(k) for k in keys)} field")
                    record = record[key]
                if not isinstance(record, str | list):
                    raise ValueError(f"report is a {type(record).__name__}, expected a string or a list of strings")
                out.prompts.append(_to_prompt(record, template))
            except ValueError as err:  # json.JSONDecodeError is a ValueError too
                out.skip(f"line {line_number}", str(err))
    return out


def embed_report_file(
    path: str | os.PathLike,
    embedder: Embedder,
    cache_path: str | os.PathLike,
    *,
    column: str | None = None,
    template: Template = "ordered",
    reports: ReportPrompts | None = None,
    output: str | os.PathLike | None = None,
    output_fingerprint: str = "",
    new_output: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Embed every distinct prompt of a reports file into the cache at `cache_path`; returns a summary.

    With `output` (`.npz`), also writes `prompts` (U,) and `embeddings` (U, dim) float32 for the U distinct
    prompts in first-seen order, plus `embedder_id` and `run_fingerprint` (`output_fingerprint`, see
    `check_output_npz`), atomically (a temporary file, then a rename). `new_output`: `output` did not exist when the
    run began and is not to be replaced: it is created only if it still does not (`io.files.create_new`), and one
    another run wrote meanwhile is kept unless it holds this same run's output (RunFailed; the vectors stay in the
    cache). `reports`: the file already read with `read_report_prompts` (the CLI reads it before loading the
    embedder).
    """
    if reports is None:
        reports = read_report_prompts(path, column=column, template=template)
    unique = list(dict.fromkeys(reports.prompts))
    log(f"{path}: {len(reports.prompts)} records with a report, {reports.skipped} skipped, {len(unique)} unique prompts")
    for example in reports.skipped_examples:
        log(f"  skipped {example}")
    stats = EmbeddingRunStats()
    with EmbeddingCache(cache_path) as cache:
        log(f"embedder {embedder.embedder_id}; cache {cache_path} ({cache.count(embedder.embedder_id)} vectors for it)")
        embeddings = embed_with_cache(unique, embedder, cache, batch_size=batch_size, progress=progress, stats=stats)
        total_cached = cache.count(embedder.embedder_id)
    if output is not None:
        arrays = dict(prompts=np.asarray(unique, dtype=str), embeddings=embeddings,
                      embedder_id=np.array(embedder.embedder_id), run_fingerprint=np.array(output_fingerprint))
        if not new_output:
            _save_npz_atomically(output, **arrays)
        elif not _save_new_npz(output, **arrays) and _recorded_fingerprint(output) != output_fingerprint:
            # Checked when the run began, but a second embed run started with the same --output (a job array)
            # found it absent too: the last to finish replaced the other's file, both exiting 0.
            from diffusets_jax.errors import RunFailed

            raise RunFailed(f"--output {output} was written by another run while this one ran, and is kept; this "
                            f"run's {len(unique)} embeddings are in the cache {cache_path}: rerun with another "
                            "--output (nothing is embedded again)")
    summary = {
        "records": len(reports.prompts), "skipped": reports.skipped, "unique_prompts": stats.unique,
        "already_cached": stats.cached, "embedded": stats.embedded, "cache_vectors": total_cached,
        "embedder_id": embedder.embedder_id, "output": os.fspath(output) if output is not None else None,
    }
    log(f"done: {stats.embedded} prompts embedded, {stats.cached} already cached; cache now holds {total_cached}")
    return summary


def output_fingerprint(path: str | os.PathLike, *, column: str | None, template: Template, embedder_id: str) -> str:
    """What an `--output` file of this run holds, as a hex digest: the input's bytes (not its name: an edited
    file is another input, a moved one the same), the column and template, and the embedder by the id its vectors
    are cached under (`Embedder.embedder_id`: kind, model, width, max length, dtype and, for a local encoder, a
    digest of its weights, so new weights at the same path are another run; not the server's address or the
    batch size)."""
    return _fingerprint(path, column, template, {"embedder_id": embedder_id})


def legacy_output_fingerprint(path: str | os.PathLike, *, column: str | None, template: Template,
                              embedder: dict[str, object]) -> str:
    """`output_fingerprint` as it was before 2026-12-06, with `embedder` the embedder's settings (a local encoder
    by its folder's path, not its weights): an `--output` file written then holds it, and is this run's output
    when its recorded `embedder_id` is this run's too (`check_output_npz`)."""
    return _fingerprint(path, column, template, {"embedder": embedder})


def _fingerprint(path: str | os.PathLike, column: str | None, template: Template, embedder: dict[str, object]) -> str:
    from diffusets_jax.io.files import file_sha256
    from diffusets_jax.io.run_dir import fingerprint

    return fingerprint({"input_sha256": file_sha256(path), "column": column, "template": template, **embedder})


def check_output_npz(path: str | os.PathLike, fingerprint: str, *, embedder_id: str, legacy_fingerprint: str = "",
                     overwrite: bool = False) -> None:
    """Refuse to replace an existing `--output` file unless it holds this same embedding run's output (its
    `run_fingerprint`, see `output_fingerprint`; or, written before the fingerprint held the embedder's id,
    `legacy_fingerprint` and this run's `embedder_id`) or `overwrite`. Where the file's embedder differs, the
    line names both ids."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    recorded_id = ""
    try:
        with np.load(path, allow_pickle=False) as existing:
            recorded = str(existing["run_fingerprint"]) if "run_fingerprint" in existing.files else None
            recorded_id = str(existing["embedder_id"]) if "embedder_id" in existing.files else ""
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        recorded = None
    if recorded is None:
        raise ValueError(f"--output {path} exists and was not written by diffusets-jax embed: choose another path, or "
                         "pass --overwrite to replace it")
    if recorded == fingerprint or (legacy_fingerprint and recorded == legacy_fingerprint and recorded_id == embedder_id):
        return
    if recorded_id and recorded_id != embedder_id:
        raise ValueError(f"--output {path} holds the output of another embed run (embedder {recorded_id}, this run's "
                         f"is {embedder_id}: another model, setting or weights): choose another path, or pass "
                         "--overwrite to replace it")
    raise ValueError(f"--output {path} holds the output of another embed run (another input file or content, "
                     "column, template or embedder setting): choose another path, or pass --overwrite to replace "
                     "it")


def _save_npz_atomically(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as temporary:
        np.savez(temporary, **arrays)


def _save_new_npz(path: str | os.PathLike, **arrays: np.ndarray) -> bool:
    """Write `arrays` to the new file `path`, whole; False (nothing written) when `path` exists by now."""
    from diffusets_jax.io.files import create_new

    def fill(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a handle: np.savez would add .npz to the temporary's name
            np.savez(handle, **arrays)

    return create_new(path, fill)


def _recorded_fingerprint(path: str | os.PathLike) -> str | None:
    """The `run_fingerprint` an `--output` file records; None for a file without one or not an NPZ."""
    try:
        with np.load(path, allow_pickle=False) as existing:
            return str(existing["run_fingerprint"]) if "run_fingerprint" in existing.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
