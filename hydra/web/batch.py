"""The web UI's batch tab: many uploaded images and zips of images -> a zip of captions and a probability CSV.

Every member is read with a size cap (a zip's declared sizes may lie), names are made safe and unique, and one
bad file (or zip member) is listed in the summary without stopping the batch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from hydra.bulk.loader import describe_error
from hydra.bulk.run import SKIP_SUFFIXES, CsvSink, image_extensions
from hydra.tags.rules import TagRules
from hydra.web.model import UserError, WebModel

if TYPE_CHECKING:
    from hydra.web.service import Limits, WebService

BATCH_SIZE = 4  # images per model call in a batch
ZIP_MAX_MEMBERS = 20_000  # entries of one uploaded zip (any kind): its directory is read into memory


def tag_uploads(web: WebService, model: WebModel, paths: list[str], rules: TagRules, size: int,
            progress: Callable[[int, int], None]) -> tuple[str, str, str]:
    """Tag many uploaded images and zips; returns (captions zip, probabilities CSV, summary)."""
    busy = {os.path.abspath(p) for p in paths or []} - web.in_use
    web.in_use.update(busy)  # the age sweep leaves a running batch's uploads alone
    try:
        with contextlib.ExitStack() as zips:  # each uploaded zip is opened (its directory read) once
            return _tag_items(web, model, list(_upload_items(paths or [], web.limits, zips)), rules, size,
                              progress)
    finally:
        web.in_use.difference_update(busy)


def _tag_items(web: WebService, model: WebModel, items: list, rules: TagRules, size: int,
               progress: Callable[[int, int], None]) -> tuple[str, str, str]:
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
                        zf.writestr(_unique(os.path.splitext(name)[0] + ".txt", taken),
                                    model.caption(list(rules.classify(row).items())))
                        sink.write(name, row)
                        tagged += 1
                progress(min(start + BATCH_SIZE, len(items)), len(items))
    finally:
        sink.close(True)
    lines = [f"Tagged {tagged} image{'s' * (tagged != 1)}, {len(failures)} failed."]
    lines += [f"- `{name}`: {reason}" for name, reason in failures[:50]]
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
