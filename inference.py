"""JTP-3 Hydra bulk tagger and interactive classifier.

Examples:
    python inference.py -r pictures/                 # .txt captions beside every image, recursively
    python inference.py -t 0.2 -x meta -r pictures/  # lower threshold, no meta tags
    python inference.py -o probs.csv pictures/       # raw probabilities of every tag as CSV
    python inference.py                              # interactive mode
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from hydra import interactive
from hydra.bulk import CaptionSink, CsvSink, iter_images, run_bulk
from hydra.checkpoint import CheckpointError
from hydra.common import log
from hydra.extensions import load_extensions
from hydra.hub import DownloadError
from hydra.image import DEFAULT_SEQLEN, MAX_SEQLEN, MIN_SEQLEN
from hydra.implications import MODE_HELP, MODES
from hydra.resources import DEFAULT_CALIBRATION, DEFAULT_METADATA, DEFAULT_MODEL, resolve_metadata, resolve_model
from hydra.tagger import Tagger
from hydra.tags import (
    CATEGORIES,
    UNKNOWN_CATEGORY,
    DataFileError,
    TagSettings,
    load_metadata,
    parse_categories,
    parse_threshold,
    tag_rewriter,
)

EPILOG = "\n".join([
    "MODE:", *(f"  {m:<18}{MODE_HELP[m]}" for m in MODES), "",
    "CATEGORY:", "  " + " ".join(CATEGORIES), "",
    "Visit https://huggingface.co/spaces/RedRocket/JTP-3 for more information.",
])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="JTP-3 Hydra Classifier by Project RedRocket", epilog=EPILOG, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", metavar="PATH", nargs="*",
                   help="Paths to files and directories to classify. If none are specified, run interactively.")
    g = p.add_argument_group("classification")
    g.add_argument("-t", "--threshold", metavar="THRESHOLD_OR_PATH",
                   help="Classification threshold -1.0 to 1.0. Or, a path to a CSV calibration file. "
                        "(Default: calibration.csv if it exists, else 0.5)")
    g.add_argument("-i", "--implications", metavar="MODE", choices=MODES,
                   help="Automatically apply implications. Requires tag metadata. (Default: inherit)")
    g.add_argument("-x", "--exclude", metavar="CATEGORY", action="append", default=[],
                   help="Exclude the specified category of tags. May be specified multiple times. "
                        "Requires tag metadata.")
    g = p.add_argument_group("output")
    g.add_argument("-p", "--prefix", default="",
                   help="Prefix all .txt caption files with the specified text. If the prefix matches a tag, "
                        "the tag will not be repeated.")
    g.add_argument("-o", "--output", metavar="PATH",
                   help="Path for CSV output, or '-' for standard output. If not specified, individual .txt "
                        "caption files are written.")
    g.add_argument("-O", "--original-tags", action="store_true",
                   help="Do not rewrite tags for compatibility with diffusion models.")
    g.add_argument("--shuffle", action="store_true",
                   help="Shuffle the tags of each caption randomly, as the original does. "
                        "(Default: most probable first)")
    g = p.add_argument_group("model")
    g.add_argument("-M", "--model", metavar="PATH",
                   help=f"Path to model file. (Default: {DEFAULT_MODEL})")
    g.add_argument("-m", "--metadata", metavar="PATH",
                   help=f"Path to CSV file with additional tag metadata. (Default: {DEFAULT_METADATA}; "
                        "'' = none)")
    g.add_argument("-e", "--extension", metavar="PATH", action="append", default=[],
                   help="Path to extension. May be specified multiple times. If a directory is specified, all "
                        "extensions in the specified directory are loaded. (Default: extensions/jtp-3-hydra)")
    g.add_argument("-E", "--no-default-extensions", action="store_true",
                   help="Do not load extensions by default.")
    g = p.add_argument_group("execution")
    g.add_argument("-b", "--batch", metavar="BATCH_SIZE", type=_positive, default=1, help="Batch size.")
    g.add_argument("-w", "--workers", metavar="N_WORKERS", type=int, default=-1,
                   help="Number of dataloader workers. (Default: number of cores; 0 = load in this process)")
    g.add_argument("--no-shm", action="store_true", help="Disable shared memory between workers.")
    g.add_argument("-S", "--seqlen", type=_seqlen, default=DEFAULT_SEQLEN,
                   help=f"NaFlex sequence length. (Default: {DEFAULT_SEQLEN}; {MIN_SEQLEN} to {MAX_SEQLEN})")
    g.add_argument("-d", "--device", metavar="TORCH_DEVICE",
                   help="Torch device. (Default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="Compute dtype. (Default: auto = bf16 on GPUs and on CPUs with native bf16, else fp32)")
    # Added last so the usage line lists flags in the original's order; shown under "options".
    p.add_argument("-r", "--recursive", action="store_true",
                   help="Classify directories recursively. Dotfiles will be ignored.")
    return p


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _seqlen(text: str) -> int:
    n = int(text)
    if not MIN_SEQLEN <= n <= MAX_SEQLEN:
        raise argparse.ArgumentTypeError(f"must be between {MIN_SEQLEN} and {MAX_SEQLEN}")
    return n


def load(args: argparse.Namespace) -> tuple[Tagger, TagSettings]:
    """The model and the tag settings of a run, from the command line. Logs what it loads to stderr."""
    rewrite = tag_rewriter(args.original_tags)
    metadata = None
    if metadata_path := resolve_metadata(args.metadata):
        log(f"Loading '{metadata_path}' ...", end="")
        metadata = load_metadata(metadata_path, rewrite)
        log(f" {len(metadata.category)} tags")
    threshold_arg = args.threshold
    if threshold_arg is None:
        threshold_arg = DEFAULT_CALIBRATION if os.path.isfile(DEFAULT_CALIBRATION) else "0.5"
    threshold = parse_threshold(threshold_arg, rewrite)
    if isinstance(threshold, dict):
        log(f"Loading '{threshold_arg}' ... {len(threshold)} tags")
    mode = args.implications or ("inherit" if metadata else "off")
    if mode != "off" and metadata is None:
        raise ValueError(f"implications mode '{mode}' requires tag metadata (-m PATH)")
    exclude = parse_categories(args.exclude)
    if exclude and metadata is None:
        raise ValueError("category exclusion requires tag metadata (-m PATH)")

    extensions = load_extensions(args.extension, not args.no_default_extensions)
    model_path = resolve_model(args.model)
    log(f"Loading '{model_path}' ...", end="")
    tagger = Tagger(model_path, device=args.device, dtype=args.dtype, seqlen=args.seqlen, extensions=extensions)
    log(f" {len(tagger.labels)} tags ({tagger.device}, {tagger.dtype_reason})")
    for ext in extensions:
        label = rewrite(ext.label)
        if metadata is not None:
            metadata.add(label, CATEGORIES.get(ext.category, UNKNOWN_CATEGORY), (rewrite(t) for t in ext.implies))
        if not isinstance(threshold, dict) or label in threshold:
            log(f"Using tag '{label}' ({ext.category}) from extension '{ext.path}'.")
        else:
            log(f"Ignoring tag '{label}' from uncalibrated extension '{ext.path}'.")
    labels = [rewrite(t) for t in tagger.labels]
    return tagger, TagSettings(labels, metadata, rewrite, threshold, mode, exclude)


def main(args: argparse.Namespace) -> int:
    try:
        tagger, settings = load(args)
    except (CheckpointError, DataFileError, DownloadError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    if not args.paths:
        interactive.run(tagger, settings)
        return 0

    paths = list(iter_images(args.paths, args.recursive))
    if args.output:
        sink = CsvSink(args.output, settings.labels)
    else:
        sink = CaptionSink(settings.rules(), args.prefix, args.shuffle)
    cores = (os.process_cpu_count() if hasattr(os, "process_cpu_count") else os.cpu_count()) or 1
    workers = cores if args.workers < 0 else args.workers
    summary = run_bulk(tagger.predict_samples, tagger.preprocess, paths, sink, batch_size=args.batch,
                       workers=min(workers, len(paths)), share_memory=not args.no_shm)
    log(summary.line())
    return 1 if summary.failed else 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # run `finally` blocks (no temporary files left behind) on `kill`, too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main(build_parser().parse_args()))
    except KeyboardInterrupt:
        log("Interrupted.")
        sys.exit(130)
