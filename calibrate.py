"""Choose a threshold per tag from validation counts, and write them as a calibration CSV for inference.

The validation data (`data/jtp-3-hydra-val.csv`, ~42 MB) is downloaded from RedRocket/JTP-3 on first use.
Extensions in `extensions/jtp-3-hydra` are calibrated too, from the counts stored in each file.

    python calibrate.py                                  # CTI, default filters -> calibration.csv
    python calibrate.py -m f0.5 -p 0.3 -o precise.csv    # favour precision
    python calibrate.py -R 0.2 0.9 -x "3d_(artwork)" -o -  # limit the range, drop a tag, print to stdout
    python calibrate.py --plot canine feline             # also draw calibration-plots/canine.png, ...
"""

import argparse
import os
import sys
import urllib.parse

from hydra import calibration
from hydra.resources import (
    DEFAULT_EXTENSIONS,
    DEFAULT_VALIDATION,
    VALIDATION_SHA256,
    VALIDATION_SIZE,
    project_path,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="PATH",
                      help="Validation CSV with columns tag,threshold,tp,fp,tn,fn. "
                           f"(Default: {DEFAULT_VALIDATION} in the project folder, downloaded on first use)")
    # (calibrating on your own labelled images, --from-dataset, will be another source in this group)
    data.add_argument("-e", "--extension", metavar="PATH", action="append", default=[],
                      help="Also calibrate this extension; a directory means every *.safetensors in it. "
                           "May be given several times. (Default: extensions/jtp-3-hydra, if it exists)")
    data.add_argument("-E", "--no-default-extensions", action="store_true",
                      help="Do not load the extensions in extensions/jtp-3-hydra.")

    sel = parser.add_argument_group("selection")
    sel.add_argument("-m", "--metric", default=calibration.DEFAULT_METRIC,
                     help="Score to maximise: cti (= ts, csi), j (= bmi), p4, f<beta> (e.g. f1, f0.5, f2), "
                          "or custom (write it in hydra/calibration.py first). (Default: cti)")
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
    return parser


def load_curves(args: argparse.Namespace) -> dict[str, calibration.Curve]:
    """Validation curves from the CSV (the default one is downloaded if missing), plus extensions."""
    path = args.data
    if path is None:  # only the default file is ever fetched
        path = project_path(DEFAULT_VALIDATION)
        if not os.path.exists(path):
            from hydra import hub

            try:
                hub.ensure_file(path, DEFAULT_VALIDATION, sha256=VALIDATION_SHA256, size=VALIDATION_SIZE,
                                what="validation data")
            except hub.DownloadError as e:
                raise FileNotFoundError(str(e)) from None
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"validation data '{path}' not found")
    curves = calibration.read_validation_csv(path)
    default_dir = project_path(DEFAULT_EXTENSIONS)
    if args.extension or (not args.no_default_extensions and os.path.isdir(default_dir)):
        from hydra import extensions

        paths = extensions.find_extensions(args.extension, use_default=not args.no_default_extensions,
                                           default_dir=default_dir)
        curves = calibration.add_extensions(curves, [extensions.read_extension(p) for p in paths])
    return curves


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
    except (ValueError, OSError, NotImplementedError) as e:
        print(f"calibrate.py: error: {e}", file=sys.stderr)
        return 2
    print(f"Calibrated {len(choices)} tags.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
