"""What the scripts share on the command line: flags, their argparse types, the worker rule, and how a parsed
command line becomes a loaded `Tagger` with its tag settings.

Every script declares the model, device, loader and size flags through the `add_*` functions here, so a flag
means the same thing (same range, same default, same help) everywhere. `load_run(args)` is the one loading
policy: it recognises the family, fetches the family's default files on first use, loads tag metadata,
thresholds and extensions, and asks the family for its defaults (selection, implications, spelling).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from hydra.common import log
from hydra.images.decode import DEFAULT_MAX_PIXELS
from hydra.models.family import CALIBRATION_CSV, CALIBRATION_EMBEDDED, MAX_SIZE, SEQLEN, Family
from hydra.models.resources import DEFAULT_METADATA, DEFAULT_MODEL, find_calibration, short_model_names
from hydra.tags.rules import CATEGORIES, UNKNOWN_CATEGORY, category_names

if TYPE_CHECKING:
    from hydra.tagger import Tagger
    from hydra.tags.rules import TagMetadata, TagSettings

DTYPE_CHOICES = ("auto", "bf16", "fp32")
SIZE_CONTROLS = (SEQLEN, MAX_SIZE)  # every family's size control is one of these flags
DEFAULT_THRESHOLD = "0.5"           # -t without a calibration (symmetric scale: p >= 0.75)


# ---------------------------------------------------------------------------------------------------------
# argparse types


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def natural(text: str) -> int:
    """argparse type: an integer of at least 0."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def pixels(text: str) -> int | None:
    """argparse type of `--max-pixels`: a count with an optional K/M/G suffix (binary); 0 = no limit (None)."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    try:
        n = int(float(text[:-1] if scale > 1 else text) * scale)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a pixel count: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return n or None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def worker_count(requested: int | None, items: int) -> int:
    """Loader processes for `items` images: `-w` as given (0 = in-process), or one per core when negative or
    unset, never more than there are images."""
    if requested is None or requested < 0:
        requested = (os.process_cpu_count() if hasattr(os, "process_cpu_count") else os.cpu_count()) or 1
    return max(0, min(requested, items))


# ---------------------------------------------------------------------------------------------------------
# Flags. `unset=True` makes every default None (False switches too), so a script can tell what was given.


def _default(value, unset: bool):
    return None if unset else value


def add_model_flag(group, *, repeat: bool = False, help_extra: str = "") -> None:
    group.add_argument("-M", "--model", metavar="PATH", action="append" if repeat else None,
                       help=f"Path to model file; the model family is recognised from it. {help_extra}A "
                            f"published model's short name ({', '.join(short_model_names())}) or project path "
                            f"downloads it on first use. (Default: {DEFAULT_MODEL}, downloaded on first use)")


def add_device_flags(group, *, unset: bool = False) -> None:
    group.add_argument("-d", "--device", metavar="TORCH_DEVICE",
                       help="Torch device. (Default: cuda if available, else cpu)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default=_default("auto", unset),
                       help="Compute dtype. (Default: auto = bf16 on GPUs and on CPUs with native bf16, else fp32)")
    group.add_argument("-c", "--compile", action="store_true", default=_default(False, unset),
                       help="torch.compile the model's forward (slow first batch; falls back to eager if it fails).")


def add_metadata_flag(group, *, short: bool = True) -> None:
    flags = ("-m", "--metadata") if short else ("--metadata",)
    group.add_argument(*flags, metavar="PATH",
                       help=f"Path to CSV file with tag metadata (categories, implications). (Default: "
                            f"{DEFAULT_METADATA} for JTP-3, the model's own data otherwise; '' = none)")


def add_extension_flags(group) -> None:
    group.add_argument("-e", "--extension", metavar="PATH", action="append", default=[],
                       help="Path to extension. May be specified multiple times. If a directory is specified, all "
                            "extensions in the specified directory are loaded. (Default: the model's extensions "
                            "folder, e.g. extensions/jtp-3-hydra)")
    group.add_argument("-E", "--no-default-extensions", action="store_true", help="Do not load extensions by default.")


def add_size_flags(group, *, unset: bool = False) -> None:
    """`-S` and `--max-size`: each family reads the one its size control names."""
    from hydra.models import families

    users = "; ".join(f"{' and '.join(f.title for f in families() if f.size is c)}: {c.flag}" for c in SIZE_CONTROLS)
    for control in SIZE_CONTROLS:
        group.add_argument(control.flag, *(["--seqlen"] if control is SEQLEN else []), dest=control.name,
                           metavar="PX" if control is MAX_SIZE else "SEQLEN", type=control.argparse_type,
                           default=_default(control.default, unset),
                           help=f"{control.label}: {control.help}, for models that use it ({users}). "
                                f"(Default: {control.default}; {control.minimum} to {control.maximum})")


def add_dinov3_flags(group, *, unset: bool = False, repeat_vocab: bool = False) -> None:
    group.add_argument("--vocab", metavar="PATH", action="append" if repeat_vocab else None,
                       default=[] if repeat_vocab else None,
                       help="Vocabulary JSON of the DINOv3 tagger. (Default: tagger_vocab_with_categories.json or "
                            "tagger_vocab.json next to the checkpoint)")
    group.add_argument("--exif", action="store_true", default=_default(False, unset),
                       help="DINOv3: apply EXIF orientation (the published script does not; off for parity).")
    group.add_argument("--white-background", action="store_true", default=_default(False, unset),
                       help="DINOv3: composite transparency on white (the published script drops alpha; off for "
                            "parity).")


def add_loader_flags(group, *, unset: bool = False, batch_default: int = 1) -> None:
    group.add_argument("-b", "--batch", metavar="BATCH_SIZE", type=positive_int, default=_default(batch_default, unset),
                       help=f"Batch size. (Default: {batch_default})")
    group.add_argument("-w", "--workers", metavar="N_WORKERS", type=int, default=_default(-1, unset),
                       help="Number of image loader processes. (Default: number of cores; 0 = load in this process)")
    group.add_argument("--no-shm", action="store_true", default=_default(False, unset),
                       help="Pass decoded images through pipes instead of shared memory.")


def add_caption_flags(group) -> None:
    """inference.py's caption options beyond the original's (the kohya / TagGUI ones; README "coming from kohya")."""
    group.add_argument("--caption-extension", metavar="EXT", default=".txt",
                       help="File extension of caption files, with or without the dot (e.g. .caption). "
                            "(Default: .txt)")
    group.add_argument("--output-dir", metavar="DIR",
                       help="Write captions into DIR instead of beside the images, mirroring each folder "
                            "argument's tree (DIR/sub/name.txt); images given as files go directly into DIR. "
                            "Folders are created as needed.")
    group.add_argument("--trigger-from-folder", action="store_true",
                       help="kohya's N_name/ folders: 'name' becomes the first tag of every caption of an image in "
                            "such a folder (its direct parent; other folders add nothing).")
    group.add_argument("--undesired-tags", metavar="TAGS", action="append", default=[],
                       help="Comma-separated tags never to output, in e621 or caption spelling (e.g. "
                            "'text, signature, watermark'); '@FILE' reads them from a file. May be repeated.")
    group.add_argument("--undesired-tags-file", metavar="PATH", action="append", default=[],
                       help="File of tags never to output: comma-separated or one per line, e621 or caption "
                            "spelling ('#' starts a comment).")
    group.add_argument("--replace-tag", metavar="OLD=NEW", action="append", default=[], type=replacement,
                       help="Write tag OLD as NEW in captions (OLD in e621 or caption spelling; the same as -a OLD "
                            "NEW). May be specified multiple times; -A reads a file of them.")
    group.add_argument("--max-tags", metavar="N", type=positive_int,
                       help="At most the N most probable tags of each caption, among those that pass the thresholds "
                            "and rules (prefix and trigger words not counted).")
    group.add_argument("--category-threshold", metavar="CATEGORY=T", action="append", default=[],
                       type=category_threshold,
                       help="Threshold for every tag of a category (or the subcategory color or rating), on the "
                            "scale of -t, e.g. character=0.7; replaces -t and calibrated thresholds for those "
                            "tags. May be specified multiple times.")
    group.add_argument("--separator", metavar="SEP",
                       help="Text between caption tags. (Default: ', ', or ' ' with -u)")
    group.add_argument("--spaces", action="store_true",
                       help="Write underscores as spaces in caption tags (the default; overrides -u).")


def replacement(text: str) -> tuple[str, str]:
    """argparse type of `--replace-tag OLD=NEW` (`caption_options.parse_replacement`)."""
    from hydra.tags.caption_options import parse_replacement

    try:
        return parse_replacement(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def category_threshold(text: str) -> tuple[str, float]:
    """argparse type of `--category-threshold CATEGORY=T` (`caption_options.parse_category_threshold`)."""
    from hydra.tags.caption_options import parse_category_threshold

    try:
        return parse_category_threshold(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def undesired_tags(args: argparse.Namespace) -> list[str]:
    """The names of `--undesired-tags` (comma-separated, `@FILE`) and `--undesired-tags-file`, in order."""
    from hydra.tags.caption_options import split_tags as split
    from hydra.tags.rewrite import strip_comment

    def read(path: str) -> list[str]:
        try:
            with open(path, encoding="utf-8-sig") as f:
                return [t for line in f for t in split(strip_comment(line.rstrip("\r\n")))]
        except OSError as e:
            raise ValueError(f"undesired tags file {path!r}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ValueError(f"undesired tags file {path!r}: not UTF-8 text") from None

    names: list[str] = []
    for value in getattr(args, "undesired_tags", None) or []:
        names += read(value[1:]) if value.startswith("@") else split(value)
    for path in getattr(args, "undesired_tags_file", None) or []:
        names += read(path)
    return names


def caption_options(args: argparse.Namespace):
    """Where captions go (`--caption-extension`, `--output-dir`) and `--trigger-from-folder`, for the sinks."""
    from hydra.bulk.run import CaptionOptions

    return CaptionOptions.create(getattr(args, "paths", None) or [], getattr(args, "caption_extension", None) or ".txt",
                                 getattr(args, "output_dir", None), bool(getattr(args, "trigger_from_folder", False)))


def add_max_pixels_flag(group) -> None:
    group.add_argument("--max-pixels", metavar="N", type=pixels, default=DEFAULT_MAX_PIXELS,
                       help="Refuse images with more pixels than this, before decoding them; suffixes K, M, G "
                            f"(Default: {DEFAULT_MAX_PIXELS // 2**20}M; 0 = no limit)")


# ---------------------------------------------------------------------------------------------------------
# Checks before anything is loaded: a mistake costs a second, not a model load


def given_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """{dest: flag} of every option the command line set to something other than its default (the flag as
    its first long spelling, e.g. "--topk"), in the parser's order."""
    given = {}
    for action in parser._actions:  # argparse has no public list of its actions
        if action.option_strings and action.dest != "help" and hasattr(args, action.dest):
            if getattr(args, action.dest) != action.default:
                given[action.dest] = next((o for o in action.option_strings if o.startswith("--")),
                                          action.option_strings[0])
    return given


def refuse_clashes(given: dict[str, str], clashes: dict[tuple[str, str], str]) -> None:
    """Refuse the first pair of given options that cannot combine.

    Args:
        given: {dest: flag} of the options on the command line, as `given_options` returns them.
        clashes: {(dest, dest): why the two cannot combine}.

    Raises:
        ValueError: one line naming both options and why.
    """
    for (a, b), why in clashes.items():
        if a in given and b in given:
            raise ValueError(f"{given[a]} and {given[b]} cannot be combined: {why}")


def unused_options(given: dict[str, str], unused: dict[str, str]) -> str | None:
    """One line naming the given options that `unused` ({dest: why}) says do not apply, grouped by reason;
    None when there are none."""
    by_reason: dict[str, list[str]] = {}
    for dest, flag in given.items():
        if dest in unused:
            by_reason.setdefault(unused[dest], []).append(flag)
    if not by_reason:
        return None
    return "; ".join(f"{' '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply {why}"
                     for why, flags in by_reason.items())


def check_device(device: str | None) -> None:
    """`-d`: a torch device this machine has, checked with one tiny tensor before the model loads.

    Raises:
        ValueError: one line naming the device and what is available (and `--` for a file read as `-dNAME`).
    """
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
        if dev.type == "meta":
            raise RuntimeError("not a compute device")
        torch.zeros(1, device=dev)
    except Exception as e:  # RuntimeError from torch: unknown name, no driver, bad ordinal, not compiled in
        reason = " ".join(str(e).split()).split(". ")[0][:160]
        hint = ""
        if os.path.splitext(device)[1] or os.path.exists(f"-d{device}"):
            hint = f" (a file named '-d{device}'? put -- before file names that start with '-': -- -d{device})"
        raise ValueError(f"-d {device}: not usable here ({reason}); available: {', '.join(available_devices())}"
                         + hint) from None


def available_devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_output(path: str | None, *, folder: bool = False, flag: str = "-o") -> None:
    """An output path that cannot be written is refused before any work: a folder where a file is wanted
    (or a file where a folder is), a missing or read-only parent folder. `-` (stdout), devices and FIFOs are
    fine; a symlink is checked at its target, which is what gets written.

    Raises:
        ValueError: one line naming the path and the reason.
    """
    if path is None or path == "-":
        return
    target = os.path.realpath(path)
    if os.path.isdir(target) and not folder:
        raise ValueError(f"{flag} {path}: is a folder; give the name of the file to write")
    if os.path.exists(target) and folder and not os.path.isdir(target):
        raise ValueError(f"{flag} {path}: is a file; with --ray, {flag} names a folder for the shards")
    parent = target if folder and os.path.isdir(target) else os.path.dirname(target)
    while folder and not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)  # --ray creates the shard folder and its parents
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: the folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder '{parent}' is not writable")


# ---------------------------------------------------------------------------------------------------------
# From a command line to a loaded model


def resolve_model(path: str | None) -> tuple[str, Family]:
    """The model file (the default is fetched on first use) and its family."""
    from hydra.models import detect
    from hydra.models.resources import resolve_model as resolve

    model_path = resolve(path)
    return model_path, detect(model_path)


def find_extensions(args: argparse.Namespace, family: Family) -> tuple[str, ...]:
    """`-e` paths expanded, plus the family's default folder unless `-E` (families without extensions have none)."""
    from hydra.models.extensions import find_extensions as find
    from hydra.models.resources import project_path

    default = project_path(family.extension_dir) if family.extension_dir else None
    use_default = default is not None and not getattr(args, "no_default_extensions", False)
    return tuple(find(getattr(args, "extension", None) or [], use_default, default_dir=default or ""))


def check_family_options(args: argparse.Namespace, family: Family, path: str) -> None:
    """Family-specific flags given for a model that does not use them: say so instead of ignoring them."""
    if getattr(args, "vocab", None) and "vocab" not in family.options:
        raise ValueError(f"--vocab is for the DINOv3 tagger; '{path}' is a {family.title} model")
    for name, flag in (("exif", "--exif"), ("white_background", "--white-background")):
        if getattr(args, name, None) and name not in family.options:
            raise ValueError(f"{flag} is for the DINOv3 tagger; '{path}' is a {family.title} model")
    check_size_flags(args, family, path)


def check_size_flags(args: argparse.Namespace, family: Family, path: str) -> None:
    """`-S` for a model sized by `--max-size`, or the reverse: one line naming the flag the model uses.

    Raises:
        ValueError: a size flag given (not None: the scripts declare them `unset`) that `family` does not use.
    """
    for control in SIZE_CONTROLS:
        if control is not family.size and getattr(args, control.name, None) is not None:
            raise ValueError(f"{control.flag} does not apply to '{path}', a {family.title} model: its "
                             f"{family.size.label.lower()} is {family.size.flag}")


def tagger_from_args(args: argparse.Namespace, model_path: str, family: Family, extensions: tuple[str, ...],
                     device: str | None = None) -> Tagger:
    from hydra.tagger import Tagger

    return Tagger(model_path, getattr(args, "vocab", None), device=device or args.device, dtype=args.dtype,
                  size=getattr(args, family.size.name, None), extensions=extensions,
                  max_pixels=getattr(args, "max_pixels", DEFAULT_MAX_PIXELS), exif=bool(getattr(args, "exif", False)),
                  white_background=bool(getattr(args, "white_background", False)),
                  compile=bool(getattr(args, "compile", False)))


def load_run(args: argparse.Namespace) -> tuple[Tagger, TagSettings]:
    """The model and the tag settings of a run, from the command line. Logs what it loads to stderr.

    Uses: model (-M), device, dtype, the size flags, extensions (-e/-E), DINOv3's flags, max_pixels,
    metadata (-m), threshold (-t), metric, implications (-i), exclude (-x/-C), exclude_tag(s), groups (-g/-G),
    topk, original_tags (-O), aliases (-a/-A/--replace-tag), category prefixes (-B), underscores (-u/--spaces),
    prompt (-P), and the caption options of `add_caption_flags` (undesired tags, max tags, category thresholds,
    separator; the extension and output folder are only checked). Flags a script does not declare take their
    defaults.
    """
    from hydra.calibration.embedded import DEFAULT_METRIC, parse_metric
    from hydra.models.resources import resolve_metadata
    from hydra.tags import rewrite as spelling
    from hydra.tags.caption_options import caption_spelling, check_category_thresholds, undesired_labels
    from hydra.tags.rules import (
        TagMetadata,
        TagSettings,
        load_metadata,
        parse_categories,
        parse_threshold,
    )

    flag = lambda name, default=None: getattr(args, name, default) or default  # noqa: E731
    check_device(getattr(args, "device", None))
    model_path, family = resolve_model(args.model)
    check_family_options(args, family, model_path)
    mode = flag("implications")
    if mode is not None and mode not in family.implication_modes:
        raise ValueError(f"implications mode '{mode}' is not one of {family.title}'s: "
                         f"{' '.join(family.implication_modes)}")
    if flag("metric") is not None and family.calibration != CALIBRATION_EMBEDDED:
        raise ValueError(f"--metric chooses thresholds from validation counts inside the model file; "
                         f"{family.title} models have none (use calibrate.py, -t or a calibration CSV)")
    if flag("metric") is not None and flag("threshold") is not None:
        raise ValueError("give either -t (a threshold or calibration CSV) or --metric (thresholds from the "
                         "model's validation counts), not both")
    metric = parse_metric(flag("metric", DEFAULT_METRIC))
    rewrite = family.rename(bool(flag("original_tags", False)))
    metadata: TagMetadata | None = None
    if metadata_path := resolve_metadata(getattr(args, "metadata", None), family.metadata_file):
        log(f"Loading '{metadata_path}' ...", end="")
        metadata = load_metadata(metadata_path, rewrite)
        log(f" {len(metadata.category)} tags")
    threshold_arg = flag("threshold")
    if threshold_arg is None and family.calibration == CALIBRATION_CSV:
        threshold_arg = find_calibration()  # the current folder's, else the project folder's
    threshold = parse_threshold(threshold_arg or DEFAULT_THRESHOLD, rewrite)
    exclude = [*flag("exclude", []), *flag("exclude_category", [])]
    exclude_tags = spelling.collect_tags(flag("exclude_tag", []), flag("exclude_tags", []))
    undesired = undesired_tags(args)
    groups = spelling.collect_groups(flag("exclusive_group", []), flag("exclusive_groups", []))
    aliases = spelling.collect_aliases([*flag("alias", []), *flag("replace_tag", [])], flag("aliases", []))
    if flag("underscores", False) and flag("spaces", False):
        raise ValueError("give either -u (keep underscores) or --spaces, not both")
    caption_options(args)  # a bad --caption-extension is an error before the model loads
    if flag("output_dir") and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir!r} exists and is not a folder")
    if metadata is not None:  # checked before the model loads when the model cannot change the answer
        exclude = parse_categories(exclude, metadata.names.values())
        _check_metadata_needs(args, metadata, exclude)

    extensions = find_extensions(args, family)
    log(f"Loading '{model_path}' ...", end="")
    try:
        tagger = tagger_from_args(args, model_path, family, extensions)
    except BaseException:
        log("")  # end the "Loading ..." line, so the error gets a line of its own
        raise
    log(f" {len(tagger.labels)} tags ({tagger.device}, {tagger.dtype_reason})")
    labels = [rewrite(t) for t in tagger.labels]
    own_metadata = metadata is None and tagger.model.tag_metadata is not None
    if own_metadata:  # a vocabulary's categories, Hydra 3.5's data (its extensions already merged in)
        own = tagger.model.tag_metadata
        metadata = TagMetadata({rewrite(t): c for t, c in own.category.items()},
                               {rewrite(t): tuple(map(rewrite, i)) for t, i in own.implies.items()}, own.names)
    exclude = parse_categories(exclude, metadata.names.values() if metadata is not None else ())
    _check_metadata_needs(args, metadata, exclude)
    if threshold_arg is None and family.calibration == CALIBRATION_EMBEDDED:
        threshold = embedded_calibration(labels, tagger.model.validation, metric)
    for ext in tagger.model.extensions:
        label = rewrite(ext.label)
        if metadata is not None and not own_metadata:
            metadata.add(label, CATEGORIES.get(ext.category, UNKNOWN_CATEGORY), (rewrite(t) for t in ext.implies))
        if not isinstance(threshold, dict) or label in threshold:
            shown = category_names([label], metadata)[0] if metadata is not None else ext.category
            log(f"Using tag '{label}' ({shown}) from extension '{ext.path}'.")
        else:
            log(f"Ignoring tag '{label}' from uncalibrated extension '{ext.path}'.")
    has_implications = metadata is not None and any(metadata.implies.values())
    mode = mode or (family.default_implications if has_implications else "off")
    topk = flag("topk")
    if topk is None and flag("threshold") is None:
        topk = family.default_topk
    by_category = dict(flag("category_threshold", []))
    topk_hint = f"({'--topk' if flag('topk') else 'the default for ' + family.title + ' without -t'}); give -t instead"
    check_category_thresholds(by_category, metadata, topk, topk_hint)
    log(selection_line(threshold, threshold_arg, topk, family, metric, len(labels)))
    # warns about the tags it cannot replace
    captions = caption_spelling(labels, metadata, rewrite, family.caption, aliases=aliases,
                                category_prefixes=dict(flag("category_prefix", [])),
                                underscores=bool(flag("underscores", False)) and not flag("spaces", False),
                                prompt=bool(flag("prompt", False)), separator=flag("separator"))
    exclude_tags = captions.names.resolve(exclude_tags, "--exclude-tag/-X") if exclude_tags else []
    exclude_tags += undesired_labels(captions, undesired)
    settings = TagSettings(labels, metadata, rewrite, threshold, mode, exclude, topk, list(dict.fromkeys(exclude_tags)),
                           groups, family.implications_after_thresholds, captions, by_category, flag("max_tags"))
    settings.rules()  # unknown group tags, bad combinations: one error now rather than per image
    return tagger, settings


def selection_line(threshold, threshold_arg: str | None, topk: int | None, family: Family, metric,
                   n_labels: int) -> str:
    """The one log line that says how tags are selected: which thresholds (a number, a calibration CSV and
    where it was found, the model's own calibration) or top k."""
    from hydra.tags.rules import to_symmetric

    if topk is not None:
        why = " (uncalibrated probabilities)" if family.default_topk is not None else ""
        return f"Tags: the {topk} most probable{why}."
    if isinstance(threshold, dict) and threshold_arg is None:
        return f"Calibrating with {metric}: {len(threshold)} of {n_labels} tags can be output."
    if isinstance(threshold, dict):
        where = f" ({os.path.abspath(threshold_arg)})" if os.path.dirname(threshold_arg) else " (current folder)"
        return f"Thresholds: per tag from '{threshold_arg}'{where}: {len(threshold)} tags can be output."
    s = to_symmetric(threshold)
    source = "-t" if threshold_arg is not None else "default"
    return (f"Thresholds: {s:g} for every tag ({source}; symmetric scale, p >= {threshold:g})"
            + ("." if threshold_arg is not None or family.calibration != CALIBRATION_CSV
               else "; no calibration.csv in the current or the project folder."))


def embedded_calibration(labels: list[str], validation, metric) -> dict[str, float]:
    """{label: threshold} from the model's own validation counts; tags no threshold qualifies for are left
    out (never output)."""
    import math

    from hydra.calibration.embedded import embedded_thresholds

    values = embedded_thresholds(validation, metric)
    return {t: float(v) for t, v in zip(labels, values) if math.isfinite(v)}


def _check_metadata_needs(args: argparse.Namespace, metadata: TagMetadata | None, exclude: list[str]) -> None:
    """Implications need implication data and -x needs categories: say so before any work is done."""
    mode = getattr(args, "implications", None)
    if mode not in (None, "off") and not (metadata and any(metadata.implies.values())):
        raise ValueError(f"implications mode '{mode}' needs tag metadata with implications "
                         "(-m PATH); this model has none loaded")
    if exclude and metadata is None:
        raise ValueError("category exclusion requires tag metadata (-m PATH, or a vocabulary with categories)")
