"""Choose a threshold per tag from validation counts, and write them as a calibration CSV for inference.

The validation data (`data/jtp-3-hydra-val.csv`, ~42 MB) is downloaded from RedRocket/JTP-3 on first use.
Extensions in `extensions/jtp-3-hydra` are calibrated too, from the counts stored in each file.
`--from-dataset DIR` counts on your own tagged images instead (see hydra/dataset.py for the rules).

    python calibrate.py                                  # CTI, default filters -> calibration.csv
    python calibrate.py -m f0.5 -p 0.3 -o precise.csv    # favour precision
    python calibrate.py -R 0.2 0.9 -x "3d_(artwork)" -o -  # limit the range, drop a tag, print to stdout
    python calibrate.py --plot canine feline             # also draw calibration-plots/canine.png, ...
    python calibrate.py --from-dataset my_images/ -b 8   # your images + .txt/.json tags -> calibration.csv
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import urllib.parse
from typing import TYPE_CHECKING

from hydra.calibration import thresholds as calibration
from hydra.common import positive_int
from hydra.hub import DownloadError
from hydra.images.naflex import DEFAULT_MAX_SIZE, DEFAULT_SEQLEN, MAX_SEQLEN, MIN_SEQLEN
from hydra.models.resources import (
    DEFAULT_EXTENSIONS,
    DEFAULT_METADATA,
    DEFAULT_MODEL,
    DEFAULT_VALIDATION,
    VALIDATION_SHA256,
    VALIDATION_SIZE,
    project_path,
)

if TYPE_CHECKING:
    from hydra.calibration.dataset import Provenance

# flags that only mean something with --from-dataset (dest -> flag, for the error message)
DATASET_ONLY = {"data_out": "--data-out", "recursive": "--recursive", "metadata": "--metadata",
                "min_positives": "--min-positives", "refresh": "--refresh", "model": "-M", "vocab": "--vocab",
                "seqlen": "-S", "device": "-d", "dtype": "--dtype", "batch": "-b", "workers": "-w",
                "no_shm": "--no-shm", "max_size": "--max-size", "exif": "--exif",
                "white_background": "--white-background"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="PATH",
                      help="Validation CSV with columns tag,threshold,tp,fp,tn,fn; with --from-dataset, the counts "
                           "for tags the dataset lacks. "
                           f"(Default: {DEFAULT_VALIDATION} in the project folder, downloaded on first use; "
                           "with --from-dataset it is skipped if it cannot be had, and never used for DINOv3)")
    data.add_argument("--from-dataset", metavar="DIR",
                      help="Calibrate on your own images: DIR holds images with their true tags in NAME.txt "
                           "(comma-separated, e621 or caption spelling) or NAME.json sidecars. The model runs once "
                           "(probabilities are cached in DIR/.hydra-calibration), the counts are written to "
                           "--data-out, and tags that never occur in DIR keep --data's counts. Exit code 1 if "
                           "a file failed.")
    data.add_argument("--data-out", metavar="PATH",
                      help="Where --from-dataset writes the dataset's validation CSV. (Default: DIR/validation.csv)")
    data.add_argument("--recursive", action="store_true", help="--from-dataset: include sub-folders of DIR.")
    data.add_argument("--metadata", metavar="PATH",
                      help="--from-dataset: tag metadata whose implications complete each image's true tags "
                           f"(red_fox also makes fox and canine true). (Default: {DEFAULT_METADATA} for JTP-3, "
                           "none for DINOv3; '' = use the tags as written)")
    data.add_argument("--min-positives", metavar="N", type=positive_int,
                      help="--from-dataset: a tag needs at least N images showing it to be calibrated from the "
                           "dataset; rarer tags keep --data's counts. (Default: 1)")
    data.add_argument("--refresh", action="store_true",
                      help="--from-dataset: delete the cached probabilities and run the model on every image.")
    data.add_argument("-e", "--extension", metavar="PATH", action="append", default=[],
                      help="Also calibrate this extension; a directory means every *.safetensors in it. "
                           "May be given several times; with --from-dataset it is also loaded into the model. "
                           "(Default: extensions/jtp-3-hydra, if it exists)")
    data.add_argument("-E", "--no-default-extensions", action="store_true",
                      help="Do not load the extensions in extensions/jtp-3-hydra.")

    sel = parser.add_argument_group("selection")
    sel.add_argument("-m", "--metric", default=calibration.DEFAULT_METRIC,
                     help="Score to maximise: cti (= ts, csi), j (= bmi), p4, f<beta> (e.g. f1, f0.5, f2), "
                          "or custom (write it in hydra/calibration/thresholds.py first). (Default: cti)")
    sel.add_argument("-s", "--min-score", metavar="SCORE", type=float,
                     help="Only consider thresholds whose score is at least SCORE. (Default: none)")
    sel.add_argument("-R", "--range", metavar=("MIN", "MAX"), type=float, nargs=2,
                     help="Only consider thresholds with MIN <= threshold <= MAX (probabilities 0..1). "
                          "(Default: none)")
    sel.add_argument("-p", "--min-precision", metavar="P", type=float,
                     help="Only consider thresholds with precision >= P. "
                          f"(Default: {calibration.DEFAULT_MIN_PRECISION})")
    sel.add_argument("-r", "--min-recall", metavar="R", type=float,
                     help="Only consider thresholds with recall >= R. "
                          f"(Default: {calibration.DEFAULT_MIN_RECALL})")
    sel.add_argument("-x", "--exclude-tags", metavar="TAG", nargs="+", action="extend", default=[],
                     help="Leave these tags out (e621 spelling, e.g. 3d_(artwork); vulva, not pussy).")
    sel.add_argument("--epsilon", metavar="EPS", type=float,
                     help=f"Added to every chosen threshold, which is then clamped to [0, 1]. "
                          f"(Default: {calibration.DEFAULT_EPSILON})")

    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", metavar="PATH", default="calibration.csv",
                     help="Calibration CSV to write, or '-' for standard output. (Default: calibration.csv)")
    out.add_argument("--plot", metavar="TAG", nargs="+", action="extend", default=[],
                     help="Also save a PNG per tag: precision, recall and the metric against the threshold.")
    out.add_argument("--plot-dir", metavar="DIR", default="calibration-plots",
                     help="Folder for --plot images. (Default: calibration-plots)")

    # the same names as inference.py; defaults None so that we can tell they were given without --from-dataset
    model = parser.add_argument_group("model (with --from-dataset; as in inference.py)")
    model.add_argument("-M", "--model", metavar="PATH", help=f"Model file. (Default: {DEFAULT_MODEL})")
    model.add_argument("--vocab", metavar="PATH",
                       help="Vocabulary JSON of the DINOv3 tagger. (Default: tagger_vocab*.json next to the model)")
    model.add_argument("-S", "--seqlen", type=_seqlen,
                       help=f"NaFlex sequence length. (Default: {DEFAULT_SEQLEN}; {MIN_SEQLEN} to {MAX_SEQLEN})")
    model.add_argument("--max-size", metavar="PX", type=_max_size,
                       help=f"DINOv3: cap on the long image edge. (Default: {DEFAULT_MAX_SIZE})")
    model.add_argument("--exif", action="store_true", default=None, help="DINOv3: apply EXIF orientation.")
    model.add_argument("--white-background", action="store_true", default=None,
                       help="DINOv3: composite transparency on white.")
    model.add_argument("-d", "--device", metavar="TORCH_DEVICE",
                       help="Torch device. (Default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=("auto", "bf16", "fp32"),
                       help="Compute dtype. (Default: auto = bf16 on GPUs and on CPUs with native bf16, else fp32)")
    model.add_argument("-b", "--batch", metavar="BATCH_SIZE", type=positive_int, help="Batch size. (Default: 1)")
    model.add_argument("-w", "--workers", metavar="N_WORKERS", type=int,
                       help="Image loader processes. (Default: number of cores; 0 = load in this process)")
    model.add_argument("--no-shm", action="store_true", default=None,
                       help="Pass decoded images through pipes instead of shared memory.")
    return parser


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


def read_data(path: str | None, optional: bool = False) -> dict[str, calibration.Curve] | None:
    """The validation CSV's curves; the default file is downloaded if missing. With `optional`, a default
    file that cannot be had gives None (and one line saying so) instead of an error."""
    if path is None:  # only the default file is ever fetched
        path = project_path(DEFAULT_VALIDATION)
        if not os.path.exists(path):
            from hydra import hub

            try:
                hub.ensure_file(path, DEFAULT_VALIDATION, sha256=VALIDATION_SHA256, size=VALIDATION_SIZE,
                                what="validation data")
            except hub.DownloadError as e:
                if optional:
                    print(f"Note: {e} Continuing with only the dataset's tags.", file=sys.stderr)
                    return None
                raise FileNotFoundError(str(e)) from None
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"validation data '{path}' not found")
    return calibration.read_validation_csv(path)


def load_curves(args: argparse.Namespace) -> dict[str, calibration.Curve]:
    """Validation curves from the CSV (the default one is downloaded if missing), plus extensions."""
    curves = read_data(args.data)
    default_dir = project_path(DEFAULT_EXTENSIONS)
    if args.extension or (not args.no_default_extensions and os.path.isdir(default_dir)):
        from hydra.models import extensions

        paths = extensions.find_extensions(args.extension, use_default=not args.no_default_extensions,
                                           default_dir=default_dir)
        curves = calibration.add_extensions(curves, [extensions.read_extension(p) for p in paths])
    return curves


def dataset_curves(args: argparse.Namespace) -> tuple[dict[str, calibration.Curve], Provenance]:
    """--from-dataset: run the model over DIR (cached), write its validation CSV, fill in the absent tags."""
    from hydra.calibration import dataset
    from hydra.common import atomic_write, log
    from hydra.models.extensions import load_extensions
    from hydra.models.resources import resolve_metadata, resolve_model
    from hydra.tagger import JTP3, detect_family
    from hydra.tags.rules import load_metadata

    checkpoint = resolve_model(args.model)
    jtp3 = detect_family(checkpoint, args.vocab) == JTP3
    extensions = load_extensions(args.extension, jtp3 and not args.no_default_extensions)
    model = dataset.ModelSpec(checkpoint, args.vocab, extensions, device=args.device, dtype=args.dtype,
                              seqlen=args.seqlen or DEFAULT_SEQLEN, max_size=args.max_size or DEFAULT_MAX_SIZE,
                              exif=bool(args.exif), white_background=bool(args.white_background))
    implies = None
    if metadata_path := (resolve_metadata(args.metadata) if jtp3 else args.metadata or None):
        implies = load_metadata(metadata_path, rewrite=lambda t: t).implies
        log(f"True tags are completed with the implications in '{metadata_path}'.")
    cores = (os.process_cpu_count() if hasattr(os, "process_cpu_count") else os.cpu_count()) or 1
    result = dataset.evaluate_dataset(
        args.from_dataset, model, recursive=args.recursive, implies=implies, refresh=bool(args.refresh),
        batch_size=args.batch or 1, workers=cores if args.workers is None or args.workers < 0 else args.workers,
        share_memory=not args.no_shm)
    data, positives = result.curves()
    out = args.data_out or os.path.join(args.from_dataset, "validation.csv")
    with atomic_write(out, "w", newline="") as f:
        calibration.write_validation_csv(f, data)
    log(f"Wrote '{out}': {len(data)} tags occurring in {len(result.truth.images)} images.")

    fallbacks = []
    if extension_curves := calibration.add_extensions({}, extensions, log=lambda _: None):
        fallbacks.append(("extension validation data", extension_curves))
    if jtp3 or args.data:
        if (default := read_data(args.data, optional=args.data is None)) is not None:
            fallbacks.append(("the default validation data" if args.data is None else f"'{args.data}'", default))
    else:
        log("Note: the DINOv3 tagger has no default validation data; tags absent from the dataset are omitted "
            "(--data PATH fills them in).")
    curves, provenance = dataset.merge_curves(result.labels, data, positives, fallbacks, args.min_positives or 1)
    provenance.failed = result.failed
    log(provenance.data_line())
    return curves, provenance


def check_dataset_flags(args: argparse.Namespace) -> None:
    if args.from_dataset is None:
        # unset flags are None, or False for switches (`in (None, False)` would also match -w 0)
        given = [flag for dest, flag in DATASET_ONLY.items() if getattr(args, dest) is not None
                 and getattr(args, dest) is not False]
        if given:
            raise ValueError(f"{', '.join(given)}: only meaningful with --from-dataset DIR")


def selection_options(args: argparse.Namespace) -> dict:
    """Filter flags as keyword arguments of `select_thresholds`; flags left unset use its defaults."""
    options = {"min_score": args.min_score, "threshold_range": args.range,
               "min_precision": args.min_precision, "min_recall": args.min_recall,
               "epsilon": args.epsilon, "exclude": args.exclude_tags}
    return {k: v for k, v in options.items() if v is not None}


def plot_file(plot_dir: str, tag: str) -> str:
    # percent-encode characters that are unsafe in file names (e621 has tags like ':3' and '</3')
    return os.path.join(plot_dir, urllib.parse.quote(tag, safe="()_-.,'!+=@") + ".png")


def main(args: argparse.Namespace) -> int:
    try:
        calibration.get_metric(args.metric)  # a typo fails before reading 42 MB
        if args.range is not None and not args.range[0] <= args.range[1]:
            raise ValueError(f"-R/--range: MIN {args.range[0]} is greater than MAX {args.range[1]}")
        check_dataset_flags(args)
        provenance = None
        if args.from_dataset is not None:
            curves, provenance = dataset_curves(args)
        else:
            curves = load_curves(args)
        unknown = [tag for tag in args.plot if tag not in curves]
        if unknown:
            raise ValueError(f"--plot: no validation data for {', '.join(map(repr, unknown))}")
        for tag in args.exclude_tags:
            if tag not in curves:
                print(f"Note: excluded tag {tag!r} is not in the validation data.", file=sys.stderr)
        choices = calibration.select_thresholds(curves, args.metric, **selection_options(args))
        if args.output == "-":
            calibration.write_calibration(sys.stdout, choices, args.metric)
        else:
            with open(args.output, "w", newline="", encoding="utf-8") as f:
                calibration.write_calibration(f, choices, args.metric)
        if args.plot:
            os.makedirs(args.plot_dir, exist_ok=True)
        for tag in args.plot:
            path = plot_file(args.plot_dir, tag)
            calibration.plot_curve(path, tag, curves[tag], args.metric, choices.get(tag))
            print(f"Saved plot '{path}'.", file=sys.stderr)
    except (ValueError, OSError, NotImplementedError, DownloadError) as e:
        print(f"calibrate.py: error: {e}", file=sys.stderr)
        return 2
    if provenance is None:
        print(f"Calibrated {len(choices)} tags.", file=sys.stderr)
        return 0
    print(provenance.summary_line(choices), file=sys.stderr)
    return 1 if provenance.failed else 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # `kill` saves the probabilities computed so far, as Ctrl-C does


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main(build_parser().parse_args()))
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
