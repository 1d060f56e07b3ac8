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


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prepare",
        help="turn a PhysioNet ECG download into sharded TFRecords (TFDS)",
        description=(
            "Build a source's TFDS dataset once: every record resampled to (1024, 12) mV in standard lead order, "
            "report lines, ordered prompt, text embedding, age, sex, heart rate; patient-disjoint train/validation/"
            "test splits (read split='all' for the union). Bad records are skipped and counted in "
            "DATA_DIR/<name>/<config>/<version>/prepare_report.json. Rerunning after an interruption reuses every "
            "decoded chunk; a complete dataset is not rebuilt."
        ),
    )
    parser.add_argument("source", choices=["mimic-iv-ecg", "ptbxl", "physionet-challenge"], help="which download")
    parser.add_argument("--manual-dir", required=True, help="folder of the PhysioNet download (see the builder's README)")
    parser.add_argument("--data-dir", required=True, help="TFDS data dir to write the dataset into")
    parser.add_argument(
        "--config", default="local",
        help="builder config: 'local' (MiniLM 384-d embeddings, default) or 'openai' (ada-002 1536-d, as published); "
        "ptbxl also has '<embedder>_subject_hash_ordered'",
    )
    parser.add_argument("--embedding-cache", default=None, help="embedding cache file (default DATA_DIR/embedding_cache/<embedder>.sqlite)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores; 0 = in-process)")
    parser.add_argument("--chunk-size", type=int, default=0, help="records per decode chunk (default: automatic)")
    parser.add_argument(
        "--beam-pipeline-options", default=None,
        help="decode with Apache Beam instead, e.g. 'runner=DirectRunner,direct_num_workers=16' (needs apache-beam)",
    )
    parser.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from diffusets_jax.data.sources import prepare

    overrides = {"workers": args.workers, "chunk_size": args.chunk_size}
    if args.embedding_cache:
        overrides["embedding_cache_path"] = args.embedding_cache
    report = prepare(
        args.source, args.manual_dir, args.data_dir, config=args.config,
        beam_pipeline_options=args.beam_pipeline_options, **overrides,
    )
    return 0 if report["examples_written"] > 0 else 1


# Subcommand registrations, in the order a user meets them. Each takes the subparsers object.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_prepare]


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
