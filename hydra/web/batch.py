"""The web UI's batch tab: many uploaded images and zips of images -> a zip of captions and a probability CSV.

Every member is read with a size cap (a zip's declared sizes may lie), names are made safe and unique, and one
bad file (or zip member) is listed in the summary without stopping the batch.

The caption options of the tab (`batch_captions`) are `inference.py`'s, parsed and applied by the CLI's own
functions (`hydra/tags/caption_options.py`, `hydra/bulk/run.py`), so a caption in the zip is the `.txt` file the
CLI would write with the same flags. `--output-dir` has no counterpart (the captions come back as a zip);
`--trigger-from-folder` reads the folder of each zip member.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hydra.bulk.loader import describe_error
from hydra.bulk.run import (
    CAPTION_EXTENSION,
    SKIP_SUFFIXES,
    CsvSink,
    caption_extension,
    caption_path,
    folder_trigger,
    image_extensions,
)
from hydra.tags import caption_options as options
from hydra.tags.rules import CaptionFormat, TagRules
from hydra.web.model import UserError, WebModel, whole_number

if TYPE_CHECKING:
    from hydra.web.service import Limits, WebService

BATCH_SIZE = 4  # images per model call in a batch
ZIP_MAX_MEMBERS = 20_000  # entries of one uploaded zip (any kind): its directory is read into memory


@dataclass(frozen=True)
class BatchCaptions:
    """The batch tab's caption options, parsed (`batch_captions`).

    Attributes:
        extension: `--caption-extension` (with its dot).
        prefix: `-p`: the items every caption starts with.
        trigger_from_folder: `--trigger-from-folder`, for the folders of zip members.
        captions: the caption format with `--replace-tag`, `--separator` and underscores; None = the model's.
        rule_changes: `TagSettings` fields for the rules (`exclude_tags`, `category_thresholds`, `max_tags`).
        notes: one line per option value the model cannot use (tags it lacks), for the summary.
    """

    extension: str = CAPTION_EXTENSION
    prefix: str = ""
    trigger_from_folder: bool = False
    captions: CaptionFormat | None = None
    rule_changes: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def name(self, member: str) -> str:
        """The caption's name in the zip: the member's, with the caption extension."""
        return caption_path(member, self.extension)

    def caption(self, model: WebModel, member: str, rules: TagRules, probs: np.ndarray) -> str:
        """One image's caption, as `inference.py`'s `CaptionSink` writes it."""
        first = folder_trigger(posixpath.basename(posixpath.dirname(member))) if self.trigger_from_folder else []
        return (self.captions or model.settings.captions).caption(rules.classify(probs), self.prefix, first=first)


def batch_captions(model: WebModel, topk: int | None, *, extension: str | None = CAPTION_EXTENSION,
                   prefix: str | None = "", trigger_from_folder: bool = False, undesired: str | None = "",
                   replace: str | None = "", category_thresholds: str | None = "", max_tags=None,
                   separator: str | None = "", underscores: bool = False) -> BatchCaptions:
    """The batch form's caption fields, as `inference.py` reads the same flags.

    Args:
        model: the model the batch runs.
        topk: k when the batch keeps the k most probable tags (category thresholds then make no sense), else None.
        extension: `--caption-extension` ("" = .txt). prefix: `-p`.
        undesired: `--undesired-tags`, comma-separated. replace: `--replace-tag OLD=NEW` items, separated by commas
            or new lines. category_thresholds: `--category-threshold CATEGORY=T` items, the same way.
        max_tags: `--max-tags` (None, "" or 0 = no limit). separator: `--separator` ("" = the default).
        underscores: `-u` (keep underscores); off is `--spaces`.

    Raises:
        UserError: a bad value, in the CLI's words after the field's name.
    """
    def field_error(what: str, call: Callable):
        try:
            return call()
        except ValueError as e:
            raise UserError(f"{what}: {e}") from None

    def items(text: str | None) -> list[str]:
        return [t.strip() for line in (text or "").splitlines() for t in line.split(",") if t.strip()]

    settings, notes = model.settings, []
    ext = field_error("Caption extension", lambda: caption_extension((extension or "").strip() or CAPTION_EXTENSION))
    pairs = field_error("Replace tags", lambda: [options.parse_replacement(t) for t in items(replace)])
    by_category = field_error("Category thresholds",
                              lambda: dict(options.parse_category_threshold(t) for t in items(category_thresholds)))
    field_error("Category thresholds", lambda: options.check_category_thresholds(
        by_category, settings.metadata, topk, "(Select tags by: Top k); choose a threshold or a calibration instead"))
    limit = _max_tags(max_tags)

    def warn(line: str) -> None:  # names the model lacks: a note under the summary, not a server log line
        notes.append(line.removeprefix("warning: "))

    captions = None
    if pairs or separator or underscores:
        captions = options.caption_spelling(settings.labels, settings.metadata, settings.rewrite, model.family.caption,
                                            aliases=dict(pairs), underscores=bool(underscores),
                                            separator=separator or None, warn=warn)
    undesired_labels = options.undesired_labels(captions or settings.captions, options.split_tags(undesired or ""),
                                                warn)
    changes = {"max_tags": limit}
    if undesired_labels:
        changes["exclude_tags"] = list(dict.fromkeys([*settings.exclude_tags, *undesired_labels]))
    if by_category:
        changes["category_thresholds"] = by_category
    return BatchCaptions(ext, prefix or "", bool(trigger_from_folder), captions, changes, tuple(notes))


def _max_tags(value) -> int | None:
    """`--max-tags` from the form: a whole number; 0 or empty = no limit."""
    try:
        return whole_number(0 if value is None or value == "" else value, 0) or None
    except ValueError:
        raise UserError(f"Max tags must be a whole number (0 = no limit), got {value!r}.") from None


def tag_uploads(web: WebService, model: WebModel, paths: list[str], rules: TagRules, size: int,
                progress: Callable[[int, int], None], captions: BatchCaptions | None = None) -> tuple[str, str, str]:
    """Tag many uploaded images and zips; returns (captions zip, probabilities CSV, summary)."""
    busy = {os.path.abspath(p) for p in paths or []} - web.in_use
    web.in_use.update(busy)  # the age sweep leaves a running batch's uploads alone
    try:
        with contextlib.ExitStack() as zips:  # each uploaded zip is opened (its directory read) once
            return _tag_items(web, model, list(_upload_items(paths or [], web.limits, zips)), rules, size,
                              progress, captions or BatchCaptions())
    finally:
        web.in_use.difference_update(busy)


def _tag_items(web: WebService, model: WebModel, items: list, rules: TagRules, size: int,
               progress: Callable[[int, int], None], captions: BatchCaptions) -> tuple[str, str, str]:
    if not items:
        raise UserError("No images in the upload (zips are searched for image files).")
    out = tempfile.mkdtemp(dir=web.tmpdir)
    zip_path, csv_path = os.path.join(out, "captions.zip"), os.path.join(out, "probabilities.csv")
    sink, failures, tagged, taken = CsvSink(csv_path, model.labels), [], 0, set()
    try:
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
            for start in range(0, len(items), BATCH_SIZE):
                names, samples = [], []
                for name, read in items[start:start + BATCH_SIZE]:
                    try:
                        samples.append(web.preprocess(model, read(), size))
                        names.append(name)
                    except Exception as e:  # one bad file (or zip member) never stops the batch
                        failures.append((name, str(e) if isinstance(e, UserError) else describe_error(e)))
                if samples:
                    for name, row in zip(names, web.predict(model, samples)):
                        zf.writestr(_unique(captions.name(name), taken), captions.caption(model, name, rules, row))
                        sink.write(name, row)
                        tagged += 1
                progress(min(start + BATCH_SIZE, len(items)), len(items))
    finally:
        sink.close(True)
    lines = [f"Tagged {tagged} image{'s' * (tagged != 1)}, {len(failures)} failed."]
    lines += [f"- `{name}`: {reason}" for name, reason in failures[:50]]
    lines += [f"- note: {note}" for note in captions.notes]
    return zip_path, csv_path, "\n".join(lines)

def _upload_items(paths: list[str], limits: Limits,
                  zips: contextlib.ExitStack) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read) for every uploaded file, and for every image inside uploaded zips."""
    count, total, cap = 0, 0, limits.max_upload_bytes
    exts = image_extensions()
    for path in paths:
        if zipfile.is_zipfile(path):
            members = _zip_members(zips.enter_context(zipfile.ZipFile(path)), os.path.basename(path), exts, cap)
        else:
            members = [(os.path.basename(path), os.path.getsize(path), functools.partial(_read, path, cap))]
        for name, size, read in members:
            count, total = count + 1, total + size
            if count > limits.batch_max_files:
                raise UserError(f"Too many images: at most {limits.batch_max_files} per batch.", 413)
            if total > limits.batch_max_bytes:
                raise UserError(f"The batch is over {limits.batch_max_bytes / 2**20:.0f} MiB "
                                "(uncompressed).", 413)
            yield name, read


def _read(path: str, cap: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise UserError(f"over the {cap / 2**20:.0f} MiB limit per image", 413)
    return data


def _zip_members(zf: zipfile.ZipFile, shown: str, exts: frozenset[str],
                 cap: int) -> list[tuple[str, int, Callable[[], bytes]]]:
    """Image members of an open zip with safe relative names; sizes are the declared uncompressed sizes."""
    infos = zf.infolist()
    if len(infos) > ZIP_MAX_MEMBERS:
        raise UserError(f"{shown} has {len(infos)} entries; at most {ZIP_MAX_MEMBERS} per zip.", 413)

    def read(info: zipfile.ZipInfo) -> bytes:
        with zf.open(info) as f:
            data = f.read(cap + 1)  # the declared size may lie: read at most one byte over the cap
        if len(data) > cap:
            raise UserError(f"over the {cap / 2**20:.0f} MiB limit per image", 413)
        return data

    out = []
    for info in infos:
        parts = [p for p in posixpath.normpath(info.filename.replace("\\", "/")).split("/")
                 if p not in ("", ".", "..")]
        name = "/".join(parts)
        if info.is_dir() or not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        suffix = os.path.splitext(name)[1].lower()
        if suffix in exts and suffix not in SKIP_SUFFIXES:
            out.append((name, info.file_size, functools.partial(read, info)))
    return out


def _unique(name: str, taken: set[str]) -> str:
    stem, ext = os.path.splitext(name)
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}{ext}"
    taken.add(candidate)
    return candidate
