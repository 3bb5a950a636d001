"""Safetensors Metadata Editor: print or change the metadata of a .safetensors file, such as an extension.

    python edit_metadata.py extensions/jtp-3-hydra/my_tag.safetensors                 # print all metadata
    python edit_metadata.py EXT.safetensors classifier.label=my_new_tag               # rename; keeps a .bak copy
    python edit_metadata.py EXT.safetensors "classifier.label.implies=dragon gryphon" modelspec.author=
    python edit_metadata.py -o copy.safetensors EXT.safetensors classifier.label.category=species

`KEY=VALUE` sets a key, `KEY=` deletes it. Tensors are copied unchanged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from hydra.common import atomic_write, log, write_target
from hydra.models.checkpoint import CheckpointError, load_tensors, read_metadata, save_safetensors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Safetensors Metadata Editor", allow_abbrev=False)
    p.add_argument("file", metavar="FILE", help="The .safetensors file.")
    p.add_argument("edits", metavar="KEY=[VALUE]", nargs="*",
                   help="Set KEY to VALUE; an empty VALUE deletes KEY. Without any, print the metadata.")
    p.add_argument("-o", "--output", metavar="PATH",
                   help="Write the result to PATH instead of changing FILE (no backup is made).")
    p.add_argument("-B", "--no-backup", action="store_true",
                   help="Do not keep a copy of FILE before overwriting it. (Default: FILE.bak, FILE.1.bak, ...)")
    return p


def parse_edits(edits: list[str]) -> dict[str, str | None]:
    """`KEY=VALUE` -> {KEY: VALUE}; `KEY=` -> {KEY: None} (delete). Later edits of a key win."""
    out: dict[str, str | None] = {}
    for edit in edits:
        key, sep, value = edit.partition("=")
        if not sep:
            raise ValueError(f"{edit!r}: expected KEY=VALUE (or KEY= to delete KEY)")
        if not key:
            raise ValueError(f"{edit!r}: the key is empty")
        out[key] = value or None
    return out


def apply_edits(metadata: dict[str, str], edits: dict[str, str | None]) -> dict[str, str]:
    """A copy of `metadata` with the edits applied; reports each change on stderr."""
    meta = dict(metadata)
    for key, value in edits.items():
        if value is None:
            if key in meta:
                del meta[key]
                log(f"Delete {key!r}")
            else:
                log(f"Note: {key!r} is not set; nothing to delete.")
        else:
            log(f"Set {key!r}: {value!r}")
            meta[key] = value
    return meta


def backup_path(path: str) -> str:
    """The first free name among FILE.bak, FILE.1.bak, FILE.2.bak, ..."""
    candidate, n = f"{path}.bak", 0
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}.{n}.bak"
    return candidate


def make_backup(path: str) -> str:
    """Copy `path` to the first free backup name, all or nothing (a full disk leaves no empty or short copy)."""
    backup = backup_path(path)
    with open(path, "rb") as src, atomic_write(backup, "wb") as out:
        shutil.copyfileobj(src, out)
    shutil.copystat(path, backup)  # times and mode, as `cp -p`
    return backup


def main(args: argparse.Namespace) -> int:
    try:
        edits = parse_edits(args.edits)
        if not edits:
            if args.output:
                raise ValueError("-o/--output needs at least one KEY=VALUE change")
            for key, value in sorted(read_metadata(args.file).items()):
                print(f"{key!r}: {value!r}")
            return 0
        if args.output and os.path.realpath(args.output) == os.path.realpath(args.file):
            raise ValueError(f"-o {args.output} is FILE itself; leave out -o to change FILE in place (with a backup)")
        tensors, metadata = load_tensors(args.file)
        metadata = apply_edits(metadata, edits)
        target = args.output or args.file
        write_target(target)  # a folder is refused before a backup is made
        backup = None
        if not args.output and not args.no_backup:
            backup = make_backup(args.file)
            log(f"Backup: '{backup}'")
        log(f"Saving '{target}'...")
        try:
            save_safetensors(target, tensors, metadata)  # keeps the replaced file's mode
        except BaseException:
            if backup is not None:  # FILE is unchanged: a copy of it would only be debris
                os.unlink(backup)
            raise
    except (CheckpointError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
