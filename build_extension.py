"""Turn a train_extension.py checkpoint into an extension file that inference.py, app.py and calibrate.py load.

    python build_extension.py train/my_tag/checkpoints/20260101-120000_e66.pt my_tag general
    python build_extension.py -a "Me" -i dragon -i gryphon CHECKPOINT dragon_on_top_gryphon_on_bottom general
    python build_extension.py -o my_extensions -r CHECKPOINT my_tag species my_tag_v2
    python build_extension.py -I canine HYDRA35_CHECKPOINT my_canine_tag species   # canine implies the new tag

The checkpoint says which model family it was trained for (upstream's checkpoints are JTP-3's). JTP-3 gets
upstream's v1 file (q RMS-normalised, as the base model stores it); Hydra 3.5 a v2 file naming its base
model by title. Either holds the averaged weights x that the validation measured (rebuilt from the
optimizer's z) and the validation counts for calibration.
"""

from __future__ import annotations

import argparse
import os
import sys

from hydra.common import log
from hydra.models.checkpoint import CheckpointError
from hydra.models.family import Family
from hydra.models.resources import project_path
from hydra.tags.names import check_tag_name
from hydra.tags.rules import CATEGORIES

# torch and the training code are imported in main(): --help and argument errors do not wait for them.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="JTP-3 Hydra Extension Builder", allow_abbrev=False)
    p.add_argument("checkpoint", metavar="CHECKPOINT_PATH", help="A .pt checkpoint written by train_extension.py.")
    p.add_argument("tag", metavar="TAG", help="The tag, e621 spelling without spaces (e.g. my_tag_(custom)).")
    p.add_argument("category", metavar="CATEGORY", choices=list(CATEGORIES),
                   help=f"The tag's category: {', '.join(CATEGORIES)}.")
    p.add_argument("file_name", metavar="FILE_NAME", nargs="?",
                   help="Output name without .safetensors. (Default: TAG with '/' and '.' replaced by '_')")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output-dir", metavar="DIR",
                   help="Where to write the extension. (Default: the model family's extensions folder in the "
                        "project folder, created if needed: extensions/jtp-3-hydra, extensions/hydra-3.5)")
    g.add_argument("-r", "--replace", action="store_true", help="Overwrite an existing extension file.")
    g = p.add_argument_group("metadata")
    g.add_argument("-a", "--author", help="Author name. (Default: none)")
    g.add_argument("-l", "--license", default="MIT", help="License. (Default: MIT)")
    g.add_argument("-T", "--title", help="Title. (Default: 'JTP-3 Hydra Extension: TAG', 'Hydra 3.5 Extension: TAG')")
    g.add_argument("-L", "--language", default="en/US", help="Language. (Default: en/US)")
    g.add_argument("-i", "--implies", metavar="TAG", action="append", default=[],
                   help="A tag this tag implies. May be specified multiple times.")
    g.add_argument("-I", "--implied-by", metavar="TAG", action="append", default=[],
                   help="A model tag that implies this tag (Hydra 3.5 only). May be specified multiple times.")
    return p


def check_args(args: argparse.Namespace) -> None:
    for what, tag in [("TAG", args.tag), *(("-i", t) for t in args.implies), *(("-I", t) for t in args.implied_by)]:
        check_tag_name(tag, what)  # the rule the trainer and both loaders apply, too
    if args.file_name is None:
        args.file_name = args.tag.replace("/", "_").replace(".", "_")
    if not args.file_name or any(c in args.file_name for c in "/\\."):
        raise ValueError(f"FILE_NAME {args.file_name!r} must be non-empty and contain no '/', '\\' or '.'")


def output_path(args: argparse.Namespace, family: Family) -> str:
    folder = args.output_dir
    if folder is None:
        folder = project_path(family.extension_dir)
        os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
        raise FileNotFoundError(f"output directory '{folder}' does not exist")
    path = os.path.join(folder, args.file_name + ".safetensors")
    if os.path.exists(path) and not args.replace:
        raise FileExistsError(f"'{path}' already exists. Provide a different file name, or specify --replace to "
                              "overwrite it.")
    return path


def check_caption_name(tag: str, family: Family, path: str) -> None:
    """Refuse a tag that the family's caption rename makes equal to another tag (`big_vulva` beside JTP-3's
    `big_pussy`: two CSV columns and caption tags of one name): checked against the family's tag list
    (`data/jtp-3-hydra-tags.csv`, when present) and the other extensions in the folder of `path`."""
    from hydra.models.checkpoint import read_metadata
    from hydra.models.extensions import KEY_LABEL, caption_name_conflict, find_extensions
    from hydra.tags.rules import load_metadata

    rename = family.rename(False)
    if not any(old in tag or new in tag for old, new in family.caption.renames):
        return  # no rename touches this name
    sources: list[tuple[str, list[str]]] = []
    if family.metadata_file is not None and os.path.isfile(tags_csv := project_path(family.metadata_file.path)):
        sources.append((tags_csv, list(load_metadata(tags_csv, rewrite=lambda t: t).category)))
    folder = os.path.dirname(path) or "."
    for other_file in find_extensions([folder], use_default=False):
        if os.path.abspath(other_file) == os.path.abspath(path):
            continue  # the file being replaced (--replace)
        try:
            sources.append((other_file, [read_metadata(other_file).get(KEY_LABEL, "")]))
        except (CheckpointError, OSError):
            continue  # an unreadable neighbour is reported when it is loaded
    for source, tags in sources:
        if (other := caption_name_conflict(tag, tags, rename)) is not None:
            raise ValueError(f"TAG {tag!r} is written {rename(tag)!r} in captions and CSV columns (the "
                             f"{' / '.join(f'{a} -> {b}' for a, b in family.caption.renames)} rename), as is the "
                             f"tag {other!r} of '{source}'; use {rename(tag)!r} to replace that tag, or another "
                             "name")


def main(args: argparse.Namespace) -> int:
    try:
        check_args(args)
        from hydra.train import loop as training

        log(f"Loading checkpoint '{args.checkpoint}'...")
        ckpt = training.load_checkpoint(args.checkpoint)
        family = training.checkpoint_family(ckpt)
        family.require_training()
        path = output_path(args, family)
        check_caption_name(args.tag, family, path)
        if ckpt.get("validation") is None:
            log("Warning: the checkpoint has no validation data. Calibration will not be supported.")
        log("Preparing metadata...")
        meta = family.extension_metadata(ckpt, tag=args.tag, category=args.category, implies=args.implies,
                                         implied_by=args.implied_by, title=args.title, author=args.author,
                                         license=args.license, language=args.language)
        for key, value in meta.items():
            log(f"{key}: {value!r}")
        log("Building extension...")
        tensors, validation = family.extension_tensors(ckpt, log)
        log(f"Saving extension '{path}'...")
        family.write_extension(path, tensors, meta, validation)
    except (CheckpointError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
