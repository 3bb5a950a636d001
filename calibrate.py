"""Choose a threshold per tag from validation counts, and write them as a calibration CSV for inference.

The validation data (`data/jtp-3-hydra-val.csv`, ~42 MB) is downloaded from RedRocket/JTP-3 on first use.
Extensions in `extensions/jtp-3-hydra` are calibrated too, from the counts stored in each file. For Hydra 3.5
(`-M hydra-3.5`) the counts come from the model file itself (and its extensions), with upstream's defaults
(`f1.0@0.1`, no recall floor).
`--from-dataset DIR` counts on your own tagged images instead (see hydra/calibration/sidecars.py for the rules).

    python calibrate.py                                  # CTI, default filters -> calibration.csv
    python calibrate.py -m f0.5 -p 0.3 -o precise.csv    # favour precision
    python calibrate.py -R 0.2 0.9 -x "3d_(artwork)" -o -  # limit the range, drop a tag, print to stdout
    python calibrate.py --plot canine feline             # also draw calibration-plots/canine.png, ...
    python calibrate.py --from-dataset my_images/ -b 8   # your images + .txt/.json tags -> calibration.csv
    python calibrate.py -M hydra-3.5 -m f0.5 -o cal.csv  # Hydra 3.5's embedded counts, another metric
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import urllib.parse
from typing import TYPE_CHECKING

from hydra import cli
from hydra.calibration import thresholds as calibration
from hydra.calibration import validation_csv
from hydra.cli import positive_int
from hydra.common import atomic_write
from hydra.hub import DownloadError
from hydra.models import get as get_family
from hydra.models.family import Family
from hydra.models.resources import (
    DEFAULT_METADATA,
    DEFAULT_VALIDATION,
    VALIDATION_SHA256,
    VALIDATION_SIZE,
    project_path,
)

if TYPE_CHECKING:
    from hydra.calibration.dataset import Provenance

# flags that only mean something with --from-dataset (dest -> flag, for the error message)
DATASET_ONLY = {"data_out": "--data-out", "recursive": "--recursive", "metadata": "--metadata",
                "min_positives": "--min-positives", "refresh": "--refresh", "vocab": "--vocab",
                "seqlen": "-S", "device": "-d", "dtype": "--dtype", "batch": "-b", "workers": "-w",
                "no_shm": "--no-shm", "max_size": "--max-size", "exif": "--exif",
                "white_background": "--white-background", "compile": "-c"}


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
    sel.add_argument("-m", "--metric",
                     help="Score to maximise: cti (= ts, csi), csi<w>, j (= bmi), p4, f<beta> (e.g. f1, f0.5, f2), "
                          "or custom (write it in hydra/calibration/thresholds.py first); METRIC@P adds a precision "
                          "floor, as Hydra 3.5 writes it (f1.0@0.1). (Default: cti; f1.0@0.1 for a model that "
                          "carries its validation counts, such as Hydra 3.5)")
    sel.add_argument("-s", "--min-score", metavar="SCORE", type=float,
                     help="Only consider thresholds whose score is at least SCORE. (Default: none)")
    sel.add_argument("-R", "--range", metavar=("MIN", "MAX"), type=float, nargs=2,
                     help="Only consider thresholds with MIN <= threshold <= MAX (probabilities 0..1). "
                          "(Default: none)")
    sel.add_argument("-p", "--min-precision", metavar="P", type=float,
                     help="Only consider thresholds with precision >= P. "
                          f"(Default: {calibration.DEFAULT_MIN_PRECISION}, or the metric's @P; with a model's "
                          "embedded counts, the metric's @P or none)")
    sel.add_argument("-r", "--min-recall", metavar="R", type=float,
                     help="Only consider thresholds with recall >= R. "
                          f"(Default: {calibration.DEFAULT_MIN_RECALL}; none with a model's embedded counts)")
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

    # the same flags as inference.py; defaults None so that we can tell they were given without --from-dataset
    model = parser.add_argument_group("model (with --from-dataset; as in inference.py)")
    cli.add_model_flag(model)
    cli.add_dinov3_flags(model, unset=True)
    cli.add_size_flags(model, unset=True)
    cli.add_device_flags(model, unset=True)
    cli.add_loader_flags(model, unset=True)
    return parser


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
    return validation_csv.read_validation_csv(path)


def load_curves(args: argparse.Namespace, family: Family, model_path: str | None) -> dict[str, calibration.Curve]:
    """The validation curves to calibrate from, as the family keeps them: RedRocket's validation CSV (the default
    one is downloaded if missing) plus extensions for JTP-3, the counts inside the model file for Hydra 3.5."""
    extensions = cli.find_extensions(args, family)
    if family.calibration == "embedded" and not args.data:
        curves = family.validation_curves(model_path, family.read_extensions(extensions))
        print(f"Calibrating from the validation counts inside '{model_path}'.", file=sys.stderr)
        return curves
    if family.calibration == "none" and not args.data:
        raise ValueError(f"{family.title} models come with no validation data: calibrate on your own images with "
                         "--from-dataset DIR, or give --data PATH")
    curves = read_data(args.data)
    if extensions:
        curves = calibration.add_extensions(curves, family.read_extensions(extensions), rename=family.rename(False))
    return curves


def calibration_family(args: argparse.Namespace) -> tuple[Family, str | None]:
    """The family (and model file) whose validation data is used: -M's, else the default model's, which is not
    downloaded for this (its validation CSV is all that is needed)."""
    if args.model is None and args.from_dataset is None:
        return get_family("jtp3"), None  # the default model's family: RedRocket's validation CSV is JTP-3's
    path, family = cli.resolve_model(args.model)
    return family, path


def dataset_curves(args: argparse.Namespace) -> tuple[dict[str, calibration.Curve], Provenance]:
    """--from-dataset: run the model over DIR (cached), write its validation CSV, fill in the absent tags."""
    from hydra.calibration import dataset
    from hydra.common import atomic_write, log
    from hydra.models.family import ModelOptions
    from hydra.models.resources import resolve_metadata
    from hydra.tagger import TaggerSpec
    from hydra.tags.rules import load_metadata

    checkpoint, family = cli.resolve_model(args.model)
    cli.check_family_options(args, family, checkpoint)
    extensions = cli.find_extensions(args, family)
    options = ModelOptions(extensions=extensions, vocab=args.vocab, exif=bool(args.exif),
                           white_background=bool(args.white_background))
    size = getattr(args, family.size.name) or family.size.default
    spec = TaggerSpec(checkpoint, options, size, args.device, args.dtype, bool(args.compile))
    implies = None
    if metadata_path := resolve_metadata(args.metadata, family.metadata_file):
        implies = load_metadata(metadata_path, rewrite=lambda t: t).implies
        log(f"True tags are completed with the implications in '{metadata_path}'.")
    result = dataset.evaluate_dataset(
        args.from_dataset, spec, recursive=args.recursive, implies=implies, refresh=bool(args.refresh),
        batch_size=args.batch or 1, workers=cli.worker_count(args.workers, 1 << 30), share_memory=not args.no_shm)
    data, positives = result.curves()
    out = args.data_out or os.path.join(args.from_dataset, "validation.csv")
    with atomic_write(out, "w", newline="") as f:
        validation_csv.write_validation_csv(f, data)
    log(f"Wrote '{out}': {len(data)} tags occurring in {len(result.truth.images)} images.")

    fallbacks = []
    if extension_curves := calibration.add_extensions({}, family.read_extensions(extensions), log=lambda _: None):
        fallbacks.append(("extension validation data", extension_curves))
    if family.calibration == "embedded":
        fallbacks.append(("the model's validation data", family.validation_curves(checkpoint, family.read_extensions(
            extensions))))
    if family.calibration == "csv" or args.data:
        if (default := read_data(args.data, optional=args.data is None)) is not None:
            fallbacks.append(("the default validation data" if args.data is None else f"'{args.data}'", default))
    elif family.calibration == "none":
        log(f"Note: the {family.title} has no default validation data; tags absent from the dataset are omitted "
            "(--data PATH fills them in).")
    curves, provenance = dataset.merge_curves(result.labels, data, positives, fallbacks, args.min_positives or 1)
    provenance.failed = result.failed
    log(provenance.data_line())
    return curves, provenance


def check_options(args: argparse.Namespace) -> None:
    """Refuse options that cannot combine and note the ones this run ignores, before any data or model is read.

    Raises:
        ValueError: one line naming the options.
    """
    check_dataset_flags(args)
    given = cli.given_options(build_parser(), args)
    if args.metric and "@" in args.metric:  # upstream's METRIC@P: the precision floor -p also sets
        given["metric_floor"] = f"-m {args.metric}"
    cli.refuse_clashes(given, {("metric_floor", "min_precision"): "both set the minimum precision "
                                                                    "(METRIC@P is -p P); give one"})
    if note := cli.unused_options(given, {} if args.plot else {"plot_dir": "without --plot"}):
        print(f"Note: {note}.", file=sys.stderr)


def check_dataset_flags(args: argparse.Namespace) -> None:
    if args.from_dataset is None:
        # unset flags are None, or False for switches (`in (None, False)` would also match -w 0)
        given = [flag for dest, flag in DATASET_ONLY.items() if getattr(args, dest) is not None
                 and getattr(args, dest) is not False]
        if given:
            raise ValueError(f"{', '.join(given)}: only meaningful with --from-dataset DIR")


def selection_options(args: argparse.Namespace, family: Family) -> tuple[str, dict]:
    """(metric as written, keyword arguments of `select_thresholds`): flags left unset use the defaults, which
    for a model with embedded counts are upstream's (f1.0@0.1, no recall floor)."""
    from hydra.calibration.embedded import DEFAULT_METRIC as EMBEDDED_METRIC

    embedded = family.calibration == "embedded" and not args.data
    metric = args.metric or (EMBEDDED_METRIC if embedded else calibration.DEFAULT_METRIC)
    name, floor = calibration.split_floor(metric)
    min_precision = args.min_precision if args.min_precision is not None else floor
    if embedded:
        min_precision = 0.0 if min_precision is None else min_precision
    options = {"min_score": args.min_score, "threshold_range": args.range, "min_precision": min_precision,
               "min_recall": args.min_recall if args.min_recall is not None else 0.0 if embedded else None,
               "epsilon": args.epsilon, "exclude": args.exclude_tags}
    options["metric"] = name
    return metric, {k: v for k, v in options.items() if v is not None}


def no_tags_reason(curves: dict[str, calibration.Curve], metric: str, options: dict) -> str:
    """Why `select_thresholds` chose no tag (a calibration of 0 tags would make inference output nothing)."""
    if not any(len(curve.thresholds) for curve in curves.values()):
        return "the validation data holds no thresholds for any tag"
    if not set(curves) - set(options.get("exclude", ())):
        return "-x/--exclude-tags leaves out every tag of the validation data"
    defaults = {"min_precision": calibration.DEFAULT_MIN_PRECISION, "min_recall": calibration.DEFAULT_MIN_RECALL}
    limits = [f"{flag} {value:g}" for key, flag in (("min_precision", "precision >="), ("min_recall", "recall >="),
                                                     ("min_score", f"{metric} score >="))
              if (value := options.get(key, defaults.get(key))) is not None]
    if options.get("threshold_range") is not None:
        low, high = options["threshold_range"]
        limits.append(f"threshold in [{low:g}, {high:g}]")
    return (f"no threshold of any of the {len(curves)} tags meets the minimums "
            f"({', '.join(limits) or 'none given'}): they are too strict for this data; loosen -p/-r/-s/-R")


def plot_file(plot_dir: str, tag: str) -> str:
    # percent-encode characters that are unsafe in file names (e621 has tags like ':3' and '</3')
    return os.path.join(plot_dir, urllib.parse.quote(tag, safe="()_-.,'!+=@") + ".png")


def main(args: argparse.Namespace) -> int:
    try:
        calibration.get_metric(calibration.split_floor(args.metric or "cti")[0])  # a typo fails before any reading
        if args.range is not None and not args.range[0] <= args.range[1]:
            raise ValueError(f"-R/--range: MIN {args.range[0]} is greater than MAX {args.range[1]}")
        check_options(args)
        family, model_path = calibration_family(args)
        provenance = None
        if args.from_dataset is not None:
            curves, provenance = dataset_curves(args)
        else:
            curves = load_curves(args, family, model_path)
        unknown = [tag for tag in args.plot if tag not in curves]
        if unknown:
            raise ValueError(f"--plot: no validation data for {', '.join(map(repr, unknown))}")
        for tag in args.exclude_tags:
            if tag not in curves:
                print(f"Note: excluded tag {tag!r} is not in the validation data.", file=sys.stderr)
        metric, options = selection_options(args, family)
        choices = calibration.select_thresholds(curves, **options)
        if not choices:
            raise ValueError(no_tags_reason(curves, metric, options) + "; no calibration written")
        if args.output == "-":
            calibration.write_calibration(sys.stdout, choices, metric)
        else:
            with atomic_write(args.output, "w", newline="") as f:  # never half a calibration
                calibration.write_calibration(f, choices, metric)
        if args.plot:
            os.makedirs(args.plot_dir, exist_ok=True)
        for tag in args.plot:
            path = plot_file(args.plot_dir, tag)
            with atomic_write(path, "wb") as f:
                calibration.plot_curve(f, tag, curves[tag], options["metric"], choices.get(tag))
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
