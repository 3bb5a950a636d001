"""JTP-3 Hydra bulk tagger and interactive classifier.

Examples:
    python inference.py -r pictures/                 # .txt captions beside every image, recursively
    python inference.py -t 0.2 -x meta -r pictures/  # lower threshold, no meta tags
    python inference.py -o probs.csv pictures/       # raw probabilities of every tag as CSV
    python inference.py -r --trigger-from-folder --undesired-tags "text, signature" --max-tags 40 \\
        --output-dir captions/ train/                # kohya-style dataset captions in another folder tree
    python inference.py                              # interactive mode
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys

from hydra import cli
from hydra.bulk import distributed, interactive
from hydra.bulk.report import DatasetReport
from hydra.bulk.run import EXISTING, FORMATS, CaptionSink, CsvSink, PrintSink, iter_images, run_bulk
from hydra.common import exit_quietly_on_broken_pipe, log
from hydra.hub import DownloadError
from hydra.images.decode import is_url
from hydra.models.checkpoint import CheckpointError
from hydra.tags import modes
from hydra.tags.implications import MODE_HELP, MODES
from hydra.tags.rules import CATEGORIES, SUBCATEGORIES, DataFileError


def epilog() -> str:
    from hydra.calibration.embedded import METRIC_EXAMPLES, METRIC_SYNTAX
    from hydra.tags import modes

    jtp3 = [f"  {m:<18}{MODE_HELP[m]}" for m in MODES]
    rare = ("contributor", "invalid")
    hydra35 = [f"  {m:<18}{modes.MODE_HELP[m]}" for m in modes.MODES]
    return "\n".join([
        "MODE (JTP-3 Hydra and the DINOv3 tagger: implications adjust probabilities before thresholds):", *jtp3,
        "", "MODE (Hydra 3.5, as upstream: implications act on the tags that pass):", *hydra35, "",
        "CATEGORY:", "  " + " ".join(c for c in CATEGORIES if c not in rare),
        f"  also {' '.join(rare)} (e621 categories JTP-3 Hydra has no tags in), and the subcategories "
        f"{' '.join(SUBCATEGORIES)}", "",
        f"METRIC (--metric, Hydra 3.5): {METRIC_SYNTAX}, e.g. {', '.join(METRIC_EXAMPLES)}", "",
        "Short flags that upstream Hydra 3.5 gives another meaning keep this toolkit's: -m is the tag metadata CSV",
        "(upstream's metric is --metric) and -x a category (upstream's -x TAG is --exclude-tag).", "",
        "Visit https://huggingface.co/spaces/RedRocket/JTP-3 for more information.",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="JTP-3 Hydra Classifier by Project RedRocket", epilog=epilog(), allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", metavar="PATH", nargs="*",
                   help="Paths to files and directories to classify. If none are specified, run interactively.")
    g = p.add_argument_group("classification")
    g.add_argument("-t", "--threshold", metavar="THRESHOLD_OR_PATH",
                   help="Classification threshold -1.0 to 1.0. Or, a path to a CSV calibration file. "
                        "(Default: calibration.csv if it exists, else 0.5)")
    g.add_argument("-i", "--implications", metavar="MODE", choices=list(dict.fromkeys([*MODES, *modes.MODES])),
                   help="Automatically apply implications. Requires tag metadata. (Default: inherit)")
    g.add_argument("-x", "--exclude", metavar="CATEGORY", action="append", default=[],
                   help="Exclude the specified category of tags. May be specified multiple times. "
                        "Requires tag metadata.")
    g.add_argument("-C", "--exclude-category", metavar="CATEGORY", action="append", default=[],
                   help="The same as -x (upstream Hydra 3.5's spelling); also the subcategories color and rating.")
    g.add_argument("--exclude-tag", metavar="TAG", action="append", default=[],
                   help="Exclude a tag (upstream Hydra 3.5's -x). May be specified multiple times.")
    g.add_argument("-X", "--exclude-tags", metavar="PATH", action="append", default=[],
                   help="File of tags to exclude (whitespace-separated; '#' starts a comment).")
    g.add_argument("-g", "--exclusive-group", metavar="ITEM", nargs="+", action="append", default=[],
                   help="An exclusive group: only its most probable member is kept, e.g. '-g male female', or "
                        "'-g anthro: male female' (only when anthro passes; '!TAG:' = unless TAG passes).")
    g.add_argument("-G", "--exclusive-groups", metavar="PATH", action="append", default=[],
                   help="File with one exclusive group per line.")
    g.add_argument("--metric", metavar="METRIC",
                   help="Models that carry validation counts (Hydra 3.5): the calibration metric that chooses each "
                        "tag's threshold (see METRIC below). (Default: f1.0@0.1, as upstream)")
    g.add_argument("--topk", metavar="K", type=cli.positive_int,
                   help="Output the K most probable tags instead of thresholding. "
                        "(Default: threshold; 30 for models with uncalibrated scores, such as the DINOv3 tagger, "
                        "unless -t is given)")
    g = p.add_argument_group("output")
    g.add_argument("-p", "--prefix", default="",
                   help="Prefix all .txt caption files with the specified text: tags or trigger words separated by "
                        "commas (or the separator), e.g. -p 'my_style, anthro'. A tag it names (in any spelling) "
                        "is written in caption spelling and not repeated.")
    g.add_argument("-o", "--output", metavar="PATH",
                   help="Path for CSV output, or '-' for standard output. If not specified, individual .txt "
                        "caption files are written.")
    g.add_argument("--report", metavar="NAME",
                   help="Also write a dataset report: NAME.csv (tag frequencies), NAME-review.csv (the images with "
                        "the fewest tags and the most borderline tags) and NAME.html (a page with a chart and "
                        "thumbnails). A .html or .csv suffix on NAME is dropped first.")
    g.add_argument("-O", "--original-tags", action="store_true",
                   help="Do not rewrite tags for compatibility with diffusion models.")
    g.add_argument("--format", choices=FORMATS,
                   help="Print each image's tags to standard output in this format instead of writing .txt "
                        "captions (tags: the caption the .txt file would hold; names: the tag names, most "
                        "probable first; json: one array at the end; jsonl: one object per line).")
    g.add_argument("--existing", choices=EXISTING,
                   help="What to do with a .txt caption that already exists: overwrite it (the original's "
                        "behaviour), skip the image (so rerunning a stopped run finishes it), or append the new "
                        "tags it lacks. (Default: overwrite; skip with --ray, whose jobs are made to be resumed)")
    g.add_argument("-s", "--shuffle", action="store_true",
                   help="Shuffle the tags of each caption randomly, as the original JTP-3 does. "
                        "(Default: most probable first for JTP-3 and the DINOv3 tagger, model order for Hydra 3.5)")
    g.add_argument("-u", "--underscores", action="store_true",
                   help="Keep underscores in caption tags (tags are then separated by a space).")
    g.add_argument("-P", "--prompt", action="store_true",
                   help="Escape '(', ')' and ':' in caption tags with a backslash (prompt syntax).")
    g.add_argument("-a", "--alias", metavar=("OLD", "NEW"), nargs=2, action="append", default=[],
                   help="Write tag OLD as NEW in captions. May be specified multiple times.")
    g.add_argument("-A", "--aliases", metavar="PATH", action="append", default=[],
                   help="File of aliases, one 'OLD NEW' per line ('#' starts a comment).")
    g.add_argument("-B", "--category-prefix", metavar=("CATEGORY", "PREFIX"), nargs=2, action="append", default=[],
                   help="Prepend PREFIX to every caption tag of CATEGORY (e.g. -B artist 'by ').")
    cli.add_caption_flags(g)
    g = p.add_argument_group("model")
    cli.add_model_flag(g)
    cli.add_metadata_flag(g)
    cli.add_extension_flags(g)
    cli.add_dinov3_flags(p.add_argument_group("DINOv3 tagger (-M tagger_proto.safetensors)"))
    g = p.add_argument_group("execution")
    cli.add_loader_flags(g)
    cli.add_max_pixels_flag(g)
    cli.add_size_flags(g, unset=True)  # None unless given, so a size flag the model does not use is refused
    cli.add_device_flags(g)
    g.add_argument("--interactive", action="store_true",
                   help="Run the interactive classifier even when standard input is not a terminal (commands "
                        "and image paths are then read from it). Without paths on a terminal it runs anyway.")
    distributed.add_arguments(p)  # --ray and its options (hydra/bulk/distributed.py)
    # Added last so the usage line lists flags in the original's order; shown under "options".
    p.add_argument("-r", "--recursive", action="store_true",
                   help="Classify directories recursively. Dotfiles will be ignored.")
    return p


def main(args: argparse.Namespace) -> int:
    if args.report is not None and (error := report_error(args)):
        log(f"error: --report {args.report}: {error}")
        return 2
    try:
        preflight(args)  # every usage mistake is found before the model loads
        scan_errors: list[str] = []
        paths = scan(args.paths, args.recursive, scan_errors) if args.paths else []
        if args.paths and not paths:
            return 1  # nothing to tag: said why
        tagger, settings = cli.load_run(args)
    except (CheckpointError, DataFileError, DownloadError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    if not args.paths:
        interactive.run(tagger, settings)
        return 0

    skipped = 0
    captions = not (args.output or args.format)
    args.existing = args.existing or ("skip" if args.ray is not None else "overwrite")
    options = cli.caption_options(args)
    if args.existing == "skip" and captions:
        todo = [p for p in paths if not os.path.exists(options.path(p))]
        skipped, paths = len(paths) - len(todo), todo
    if args.ray is not None:  # the same run on Ray Data; exits 2 with an install hint when Ray is missing
        return distributed.run(args, paths, tagger, settings, skipped=skipped, failed=len(scan_errors))
    if args.output and args.output != "-" and args.ray is None:
        real = os.path.realpath(args.output)
        if any(not is_url(p) and os.path.realpath(p) == real for p in paths):
            log(f"error: -o {args.output}: that file is one of the images to tag; give the CSV another name")
            return 2
    if args.output:
        sink = CsvSink(args.output, settings.labels, header_on_stdout=tagger.family.csv_header_on_stdout)
    elif args.format:
        captions_of = lambda path, tags: settings.captions.caption(tags, args.prefix, args.shuffle,  # noqa: E731
                                                                   first=options.first(path))
        sink = PrintSink(args.format, settings.rules(), caption=captions_of)
    elif any(is_url(p) for p in paths):
        log("error: URLs have no folder to write a caption into; use --format or -o with URL inputs")
        return 2
    else:
        sink = CaptionSink(settings.rules(), settings.captions, args.prefix, args.shuffle,
                           append=args.existing == "append", options=options)
    report = DatasetReport.for_settings(settings) if args.report is not None else None
    summary = run_bulk(tagger, paths, sink, batch_size=args.batch, workers=cli.worker_count(args.workers, len(paths)),
                       share_memory=not args.no_shm, report=report)
    summary.skipped += skipped
    summary.failed += len(scan_errors)
    log(summary.line())
    if report is not None:
        try:
            log(f"Report: {', '.join(report.write(args.report))}")
        except OSError as e:
            log(f"error: --report {args.report}: cannot write it ({e.strerror or e})")
            return 1
    return 1 if summary.failed else 0


def report_error(args: argparse.Namespace) -> str | None:
    """Why `--report` cannot be written in this run (checked before the model loads), or None."""
    if not args.paths:
        return "a report needs images to tag (give PATHs)"
    if args.ray is not None:
        return "not available with --ray"
    folder = os.path.dirname(os.path.abspath(args.report))
    return None if os.path.isdir(folder) else f"folder {folder} does not exist"


def unused_caption_options(args: argparse.Namespace) -> list[str]:
    """The caption options given that do not apply to this run's output (README: caption options and -o).

    -o (raw probabilities of every tag): none of the caption options. --format: the tag selection applies
    (undesired tags, --max-tags, --category-threshold), and to `tags` also the spelling (separator, -p,
    trigger words); where files go does not.
    """
    if not (args.output or args.format):
        return []
    given = {"--caption-extension": args.caption_extension != ".txt", "--output-dir": args.output_dir is not None}
    spelling = {"--trigger-from-folder": args.trigger_from_folder, "--separator": args.separator is not None,
                "--replace-tag": bool(args.replace_tag)}
    selection = {"--undesired-tags": bool(args.undesired_tags or args.undesired_tags_file),
                 "--max-tags": args.max_tags is not None,
                 "--category-threshold": bool(args.category_threshold)}
    if args.output or args.format != "tags":
        given |= spelling
    if args.output:
        given |= selection
    return [flag for flag, used in given.items() if used]


# Options that cannot combine are refused; options that would be ignored get one line saying so.
RULE_FLAGS = ("threshold", "topk", "metric", "implications", "exclude", "exclude_category", "exclude_tag",
              "exclude_tags", "exclusive_group", "exclusive_groups")
CAPTION_FLAGS = ("prefix", "shuffle", "existing")
SPELLING_FLAGS = ("underscores", "prompt", "alias", "aliases", "category_prefix")
RAY_FLAGS = ("ray_actors", "ray_gpus_per_actor", "ray_batch", "ray_cpus", "ray_object_store", "shard_format",
             "shard_rows")
BULK_FLAGS = ("output", "format", "recursive", "batch", "workers", "no_shm", "ray", *RAY_FLAGS)


def preflight(args: argparse.Namespace) -> None:
    """Refuse what cannot work and say what will be ignored, before anything is loaded.

    Raises:
        ValueError: options that cannot combine, a REPL without a terminal, an -o that cannot be written.
    """
    cli.check_device(args.device)  # first: '-dash.png' is read as -d ash.png
    given = cli.given_options(build_parser(), args)
    cli.refuse_clashes(given, {
        ("output", "format"): "-o writes a CSV of probabilities, --format prints tags; choose one",
        ("topk", "threshold"): "--topk keeps the K most probable tags whatever the threshold",
        ("topk", "metric"): "--topk keeps the K most probable tags whatever the thresholds"})
    unused = {}
    if not args.paths:
        unused |= dict.fromkeys((*BULK_FLAGS, *CAPTION_FLAGS, *SPELLING_FLAGS),
                                "to the interactive classifier (no PATH given)")
    elif args.output:
        unused |= dict.fromkeys((*RULE_FLAGS, *CAPTION_FLAGS, *SPELLING_FLAGS),
                                "to -o's CSV (the raw probability of every tag)")
    elif args.format:  # `--format tags` prints the caption itself: -p and -s apply to it
        unused |= dict.fromkeys(CAPTION_FLAGS if args.format != "tags" else ("existing",),
                                "to --format (no .txt captions are written)")
    if args.paths and args.ray is None:
        unused |= dict.fromkeys(RAY_FLAGS, "without --ray")
    elif args.ray is not None:
        unused |= dict.fromkeys(("workers", "no_shm"), "with --ray (Ray tasks decode the images)")
    if note := cli.unused_options(given, unused):
        log(f"note: {note}")
    if args.paths and (ignored := unused_caption_options(args)):
        log(f"note: {', '.join(ignored)} appl{'ies' if len(ignored) == 1 else 'y'} to caption files; "
            f"{'-o writes every probability' if args.output else '--format prints to standard output'}")
    if not args.paths:
        if not args.interactive and not (sys.stdin and sys.stdin.isatty()):
            raise ValueError("no PATH given, and standard input is not a terminal for the interactive classifier; "
                             "give the images to tag (e.g. inference.py -r pictures/), or --interactive to read "
                             "commands from standard input")
        log("No PATH given: starting the interactive classifier (give paths to tag files in bulk; -h for help).")
    elif args.output:
        cli.check_output(args.output, folder=args.ray is not None)


def scan(paths: list[str], recursive: bool, errors: list[str]) -> list[str]:
    """The images to tag, found before the model loads. Missing inputs are reported and counted in `errors`;
    a folder without images says whether its sub-folders have some (without -r). Empty: nothing to tag, and
    every reason has been logged."""
    found, empty = [], []
    for path in paths:
        if not is_url(path) and not os.path.lexists(path):
            log(f"'{path}': file not found")
            errors.append(path)
            continue
        before, failed = len(found), len(errors)
        found += iter_images([path], recursive, errors)
        if len(found) == before and len(errors) == failed and os.path.isdir(path):
            empty.append(path)
    level = "warning" if found else "error"
    for folder in empty:
        nested = 0 if recursive else sum(1 for _ in itertools.islice(iter_images([folder], True), SUBFOLDER_CAP))
        if nested:
            count = f"{nested}" if nested < SUBFOLDER_CAP else f"{SUBFOLDER_CAP - 1}+"
            log(f"{level}: '{folder}' has no images; {count} in sub-folders: add -r")
        else:  # a wrong folder should not look like a finished overnight run
            log(f"{level}: no image files found in '{folder}'")
    return found


SUBFOLDER_CAP = 1001  # counting the images below a folder stops here ("1000+"): never walk a whole disk


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
    except BrokenPipeError:  # `-o - | head`: the reader has gone; stop at once, quietly
        exit_quietly_on_broken_pipe()
