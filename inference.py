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

from hydra.bulk import distributed, interactive
from hydra.bulk.run import EXISTING, FORMATS, CaptionSink, CsvSink, PrintSink, caption_path, iter_images, run_bulk
from hydra.common import log, positive_int
from hydra.hub import DownloadError
from hydra.images.naflex import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIZE, DEFAULT_SEQLEN, MAX_SEQLEN, MIN_SEQLEN, is_url
from hydra.models.checkpoint import CheckpointError
from hydra.models.extensions import load_extensions
from hydra.models.resources import DEFAULT_CALIBRATION, DEFAULT_METADATA, DEFAULT_MODEL, resolve_metadata, resolve_model
from hydra.tagger import JTP3, Tagger, detect_family
from hydra.tags.implications import MODE_HELP, MODES
from hydra.tags.rules import (
    CATEGORIES,
    UNKNOWN_CATEGORY,
    DataFileError,
    TagMetadata,
    TagSettings,
    load_metadata,
    parse_categories,
    parse_threshold,
    tag_rewriter,
)

DINOV3_TOPK = 30  # the DINOv3 card's CLI default: its probabilities are uncalibrated

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
    g.add_argument("--topk", metavar="K", type=positive_int,
                   help="Output the K most probable tags instead of thresholding. "
                        f"(Default: threshold; {DINOV3_TOPK} for the DINOv3 tagger unless -t is given)")
    g = p.add_argument_group("output")
    g.add_argument("-p", "--prefix", default="",
                   help="Prefix all .txt caption files with the specified text. If the prefix matches a tag, "
                        "the tag will not be repeated.")
    g.add_argument("-o", "--output", metavar="PATH",
                   help="Path for CSV output, or '-' for standard output. If not specified, individual .txt "
                        "caption files are written.")
    g.add_argument("-O", "--original-tags", action="store_true",
                   help="Do not rewrite tags for compatibility with diffusion models.")
    g.add_argument("--format", choices=FORMATS,
                   help="Print each image's tags to standard output in this format instead of writing .txt "
                        "captions (json: one array at the end; jsonl: one object per line).")
    g.add_argument("--existing", choices=EXISTING,
                   help="What to do with a .txt caption that already exists: overwrite it (the original's "
                        "behaviour), skip the image (so rerunning a stopped run finishes it), or append the new "
                        "tags it lacks. (Default: overwrite; skip with --ray, whose jobs are made to be resumed)")
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
    g = p.add_argument_group("DINOv3 tagger (-M tagger_proto.safetensors)")
    g.add_argument("--vocab", metavar="PATH",
                   help="Vocabulary JSON of the DINOv3 tagger. (Default: tagger_vocab_with_categories.json or "
                        "tagger_vocab.json next to the checkpoint)")
    g.add_argument("--max-size", metavar="PX", type=_max_size, default=DEFAULT_MAX_SIZE,
                   help=f"Cap on the long image edge, never upscaled. (Default: {DEFAULT_MAX_SIZE})")
    g.add_argument("--exif", action="store_true",
                   help="Apply EXIF orientation (the published script does not; off for parity).")
    g.add_argument("--white-background", action="store_true",
                   help="Composite transparency on white (the published script drops alpha; off for parity).")
    g = p.add_argument_group("execution")
    g.add_argument("-b", "--batch", metavar="BATCH_SIZE", type=positive_int, default=1, help="Batch size.")
    g.add_argument("-w", "--workers", metavar="N_WORKERS", type=int, default=-1,
                   help="Number of dataloader workers. (Default: number of cores; 0 = load in this process)")
    g.add_argument("--no-shm", action="store_true", help="Disable shared memory between workers.")
    g.add_argument("--max-pixels", metavar="N", type=_pixels, default=DEFAULT_MAX_PIXELS,
                   help="Refuse images with more pixels than this, before decoding them; suffixes K, M, G "
                        f"(Default: {DEFAULT_MAX_PIXELS // 2**20}M; 0 = no limit)")
    g.add_argument("-S", "--seqlen", type=_seqlen, default=DEFAULT_SEQLEN,
                   help=f"NaFlex sequence length. (Default: {DEFAULT_SEQLEN}; {MIN_SEQLEN} to {MAX_SEQLEN})")
    g.add_argument("-d", "--device", metavar="TORCH_DEVICE",
                   help="Torch device. (Default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="Compute dtype. (Default: auto = bf16 on GPUs and on CPUs with native bf16, else fp32)")
    distributed.add_arguments(p)  # --ray and its options (hydra/distributed.py)
    # Added last so the usage line lists flags in the original's order; shown under "options".
    p.add_argument("-r", "--recursive", action="store_true",
                   help="Classify directories recursively. Dotfiles will be ignored.")
    return p


def _pixels(text: str) -> int | None:
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    try:
        n = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pixel count: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return n or None


def _max_size(text: str) -> int:
    n = int(text)
    if not 16 <= n <= 8192:
        raise argparse.ArgumentTypeError("must be between 16 and 8192")
    return n


def _seqlen(text: str) -> int:
    n = int(text)
    if not MIN_SEQLEN <= n <= MAX_SEQLEN:
        raise argparse.ArgumentTypeError(f"must be between {MIN_SEQLEN} and {MAX_SEQLEN}")
    return n


def load(args: argparse.Namespace) -> tuple[Tagger, TagSettings]:
    """The model and the tag settings of a run, from the command line. Logs what it loads to stderr."""
    model_path = resolve_model(args.model)
    jtp3 = detect_family(model_path, args.vocab) == JTP3
    # The vulva -> pussy rename is JTP-3's convention; the DINOv3 vocabulary has both tags, keep it as is.
    rewrite = tag_rewriter(args.original_tags or not jtp3)
    metadata = None
    if metadata_path := (resolve_metadata(args.metadata) if jtp3 else args.metadata or None):
        log(f"Loading '{metadata_path}' ...", end="")
        metadata = load_metadata(metadata_path, rewrite)
        log(f" {len(metadata.category)} tags")
    threshold_arg = args.threshold
    if threshold_arg is None:
        threshold_arg = DEFAULT_CALIBRATION if jtp3 and os.path.isfile(DEFAULT_CALIBRATION) else "0.5"
    threshold = parse_threshold(threshold_arg, rewrite)
    if isinstance(threshold, dict):
        log(f"Loading '{threshold_arg}' ... {len(threshold)} tags")
    exclude = parse_categories(args.exclude)
    if jtp3:
        _check_metadata_needs(args, metadata, exclude)

    extensions = load_extensions(args.extension, jtp3 and not args.no_default_extensions)
    log(f"Loading '{model_path}' ...", end="")
    tagger = Tagger(model_path, args.vocab, device=args.device, dtype=args.dtype, seqlen=args.seqlen,
                    max_size=args.max_size, extensions=extensions, max_pixels=args.max_pixels, exif=args.exif,
                    white_background=args.white_background)
    log(f" {len(tagger.labels)} tags ({tagger.device}, {tagger.dtype_reason})")
    if metadata is None and tagger.categories:  # DINOv3 vocabularies may carry e621 categories
        metadata = TagMetadata(category=dict(tagger.categories), implies={})
    if not jtp3:
        _check_metadata_needs(args, metadata, exclude)
    for ext in extensions:
        label = rewrite(ext.label)
        if metadata is not None:
            metadata.add(label, CATEGORIES.get(ext.category, UNKNOWN_CATEGORY), (rewrite(t) for t in ext.implies))
        if not isinstance(threshold, dict) or label in threshold:
            log(f"Using tag '{label}' ({ext.category}) from extension '{ext.path}'.")
        else:
            log(f"Ignoring tag '{label}' from uncalibrated extension '{ext.path}'.")
    mode = args.implications or ("inherit" if jtp3 and metadata else "off")
    topk = args.topk if args.topk is not None else (DINOV3_TOPK if not jtp3 and args.threshold is None else None)
    labels = [rewrite(t) for t in tagger.labels]
    return tagger, TagSettings(labels, metadata, rewrite, threshold, mode, exclude, topk)


def _check_metadata_needs(args: argparse.Namespace, metadata: TagMetadata | None, exclude: list[int]) -> None:
    """Implications need implication data and -x needs categories: say so before any work is done."""
    if args.implications not in (None, "off") and not (metadata and any(metadata.implies.values())):
        raise ValueError(f"implications mode '{args.implications}' needs tag metadata with implications "
                         "(-m PATH); this model has none loaded")
    if exclude and metadata is None:
        raise ValueError("category exclusion requires tag metadata (-m PATH, or a vocabulary with categories)")


def main(args: argparse.Namespace) -> int:
    try:
        tagger, settings = load(args)
    except (CheckpointError, DataFileError, DownloadError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    if not args.paths:
        interactive.run(tagger, settings)
        return 0

    scan_errors: list[str] = []
    paths = list(iter_images(args.paths, args.recursive, scan_errors))
    skipped = 0
    captions = not (args.output or args.format)
    if args.existing not in (None, "overwrite") and not captions:
        log(f"note: --existing {args.existing} applies to .txt captions; -o/--format output is written in full")
    args.existing = args.existing or ("skip" if args.ray is not None else "overwrite")
    if args.existing == "skip" and captions:
        todo = [p for p in paths if not os.path.exists(caption_path(p))]
        skipped, paths = len(paths) - len(todo), todo
    if args.ray is not None:  # the same run on Ray Data; exits 2 with an install hint when Ray is missing
        return distributed.run(args, paths, tagger, settings, load, skipped=skipped, failed=len(scan_errors))
    if args.output:
        sink = CsvSink(args.output, settings.labels)
    elif args.format:
        sink = PrintSink(args.format, settings.rules())
    elif any(is_url(p) for p in paths):
        log("error: URLs have no folder to write a caption into; use --format or -o with URL inputs")
        return 2
    else:
        sink = CaptionSink(settings.rules(), args.prefix, args.shuffle, append=args.existing == "append")
    cores = (os.process_cpu_count() if hasattr(os, "process_cpu_count") else os.cpu_count()) or 1
    workers = cores if args.workers < 0 else args.workers
    summary = run_bulk(tagger.predict_samples, tagger.preprocess, paths, sink, batch_size=args.batch,
                       workers=min(workers, len(paths)), share_memory=not args.no_shm)
    summary.skipped += skipped
    summary.failed += len(scan_errors)
    log(summary.line())
    return 1 if summary.failed else 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # run `finally` blocks (no temporary files left behind) on `kill`, too


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    # File names that are not valid UTF-8 reach us as surrogate escapes; print them back as their bytes.
    sys.stdout.reconfigure(errors="surrogateescape")
    try:
        sys.exit(main(build_parser().parse_args()))
    except KeyboardInterrupt:
        log("Interrupted.")
        sys.exit(130)
