"""Bulk tagging: find the images, load them in the background, run the model in batches, write results.

One bad file never ends a run: it is named on stderr with the reason and counted, and the run goes on.
Outputs are written atomically (captions one by one, a CSV file as a whole at the end), so a crash or
Ctrl-C leaves neither half-written files nor temporary debris.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from hydra.bulk.batching import group_by_length
from hydra.bulk.loader import ImageLoader, LoadError
from hydra.common import AtomicFile, atomic_write, log
from hydra.tags.rules import CaptionFormat, TagRules, ranked

if TYPE_CHECKING:
    from hydra.bulk.report import DatasetReport
    from hydra.tagger import Tagger

# Files never treated as images (the original's skip list, matched case-insensitively here).
SKIP_SUFFIXES = (".txt", ".csv", ".json", ".py", ".safetensors")


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions Pillow can open (plus JPEG XL, which a plugin may add)."""
    return frozenset(ext.lower() for ext in Image.registered_extensions()) | {".jxl"}


def iter_images(paths: Iterable[str], recursive: bool = False, errors: list[str] | None = None) -> Iterator[str]:
    """Expand files and folders into image paths.

    A file given explicitly is always tried (whatever its name). In folders, entries starting with "." and
    `__pycache__` are skipped, and only files with an image extension are taken (case-insensitive; a PNG
    named `.jpg` is fine). Sub-folders are entered with `recursive` (each real folder once, so symlink
    loops end). Folders are listed in sorted order. A folder that cannot be listed is reported on stderr
    and appended to `errors`.
    """
    exts = image_extensions()
    seen: set[tuple[int, int]] = set()
    for path in paths:
        if os.path.isdir(path):
            yield from _scan(path, recursive, exts, seen, errors)
        else:
            yield path  # missing files are reported by the loader like any unreadable file


def _scan(folder: str, recursive: bool, exts: frozenset[str], seen: set, errors: list[str] | None) -> Iterator[str]:
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        report(folder, f"cannot list folder ({e.strerror or e})")
        if errors is not None:
            errors.append(folder)
        return
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name == "__pycache__":
            continue
        if entry.is_dir():
            if recursive:
                yield from _scan(entry.path, recursive, exts, seen, errors)
            continue
        suffix = os.path.splitext(name)[1].lower()
        if suffix in exts and suffix not in SKIP_SUFFIXES:
            yield entry.path  # dangling links and non-regular files too: the loader reports them


def caption_path(image_path: str) -> str:
    """`folder/name.png` -> `folder/name.txt` (the original's rule: replace the extension)."""
    return os.path.splitext(image_path)[0] + ".txt"


@dataclass
class Summary:
    tagged: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        parts = [f"Tagged {self.tagged} image{'s' * (self.tagged != 1)}"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        parts.append(f"{self.failed} failed")
        return ", ".join(parts) + "."

    def fail(self, path: str, reason: str, bar: tqdm | None = None) -> None:
        """Count a failed input and print its one stderr line."""
        self.failed += 1
        self.failures.append((path, reason))
        report(path, reason, bar)


EXISTING = ("overwrite", "skip", "append")


def read_caption(path: str) -> str:
    """An existing caption, whatever its encoding: UTF-8 (with or without BOM), else Windows-1252, else
    Latin-1 (which accepts any bytes), so an old caption never stops a run."""
    data = open(path, "rb").read()
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def merge_captions(existing: str, new: str, prefix: str = "") -> str:
    """`--existing append`: the existing caption, then the new tags it does not have yet.

    Tags compare ignoring case, spacing, underscores vs spaces and prompt escapes, so `male_feral`,
    `Male Feral` and `male feral` are one tag. A prefix missing from the old caption goes first.
    """
    def key(tag: str) -> str:
        return " ".join(tag.replace("\\", "").replace("_", " ").lower().split())

    old = [t.strip() for t in existing.split(",") if t.strip()]
    seen = {key(t) for t in old}
    words = list(old)
    for tag in (t.strip() for t in new.split(", ") if t.strip()):
        if key(tag) not in seen:
            seen.add(key(tag))
            words.append(tag)
    if prefix and words and words[0] != prefix and prefix in words:
        words.remove(prefix)
        words.insert(0, prefix)
    return ", ".join(words)


class CaptionSink:
    """Writes one `.txt` caption beside each image (atomically, UTF-8, no trailing newline).

    With `append`, an existing caption is kept and only new tags are added to it (`--existing append`).

    Args:
        rules: the run's TagRules (which tags an image gets).
        captions: how they are spelled and ordered (the family's style plus the spelling flags).
    """

    def __init__(self, rules: TagRules, captions: CaptionFormat, prefix: str = "", shuffle: bool = False,
                 append: bool = False):
        self.rules, self.captions, self.prefix, self.shuffle, self.append = rules, captions, prefix, shuffle, append

    def needed_tags(self) -> np.ndarray | None:
        return self.rules.active()

    def write(self, path: str, probs: np.ndarray) -> None:
        caption = self.captions.caption(self.rules.classify(probs), self.prefix, self.shuffle)
        target = caption_path(path)
        if os.path.realpath(target) == os.path.realpath(path):
            raise OSError(errno.EEXIST, "its caption would replace the image itself, whose name ends in .txt")
        if self.append and os.path.exists(target):
            caption = merge_captions(read_caption(target), caption, self.prefix)
        with atomic_write(target, "w", encoding="utf-8", newline="") as f:
            f.write(caption)

    def close(self, ok: bool) -> None:
        pass


class CsvSink:
    """Raw probabilities of every tag, one row per image (`%.4f`, model order, csv default dialect).

    `-o PATH` writes a header row (`filename`, then the tag names) and the rows to PATH, which appears only when
    the run completes; `-o -` prints the rows to stdout, with the header only for families whose original
    does so (`header_on_stdout`: Hydra 3.5; JTP-3's original prints none).
    """

    def __init__(self, target: str, labels: Sequence[str], header_on_stdout: bool = False):
        # surrogateescape: a file name that is not valid UTF-8 is written back as its original bytes
        self._file = None if target == "-" else AtomicFile(target, "w", encoding="utf-8", newline="",
                                                             errors="surrogateescape")
        self._out = sys.stdout if self._file is None else self._file.file
        self._target, self._broken = target, False
        self._csv = csv.writer(self._out)
        if self._file is not None or header_on_stdout:
            self._csv.writerow(["filename", *labels])

    def needed_tags(self) -> np.ndarray | None:
        return None

    def write(self, path: str, probs: np.ndarray) -> None:
        try:
            self._csv.writerow([path, *(f"{p:.4f}" for p in probs.tolist())])
            if self._file is None:
                self._out.flush()
        except OSError:
            self._broken = True  # part of a row may be in the buffer: the file can no longer be trusted
            raise

    def close(self, ok: bool) -> None:
        if self._file is not None:
            if ok and not self._broken:
                self._file.commit()
            else:
                self._file.discard()
                if self._broken:
                    log(f"error: {self._target} was not written, since writing it failed")
            self._file = None


FORMATS = ("pretty", "tags", "json", "jsonl")


class PrintSink:
    """`--format`: each image's tags on stdout, most probable first (the DINOv3 card's CLI formats).

    pretty: a ruled header with the path, then `rank. score bar tag` lines; tags: one line per image, tags
    joined by ", "; jsonl: one `{"file", "tags": [{"tag", "score"}]}` object per line; json: the same
    objects as one array, printed when the run ends (indent 2).
    """

    def __init__(self, fmt: str, rules: TagRules, stream: TextIO | None = None):
        assert fmt in FORMATS, fmt
        self.fmt, self.rules, self.stream = fmt, rules, stream or sys.stdout
        self._items: list[dict] = []

    def needed_tags(self) -> np.ndarray | None:
        return self.rules.active()

    def write(self, path: str, probs: np.ndarray) -> None:
        tags = self.rules.classify(probs)
        ordered = ranked(tags)
        item = {"file": path, "tags": [{"tag": t, "score": round(p, 4)} for t, p in ordered]}
        if self.fmt == "json":
            self._items.append(item)
            return
        if self.fmt == "jsonl":
            text = json.dumps(item, ensure_ascii=False)
        elif self.fmt == "tags":
            text = ", ".join(t for t, _ in ordered)
        else:
            rule = "-" * 60
            lines = [f"{i:>3}. {p:.3f} {'█' * int(p * 20):<20} {t}" for i, (t, p) in enumerate(ordered, 1)]
            text = "\n".join([rule, path, rule, *lines])
        print(text, file=self.stream, flush=True)

    def close(self, ok: bool) -> None:
        if self.fmt == "json":
            json.dump(self._items, self.stream, indent=2, ensure_ascii=False)
            print(file=self.stream, flush=True)


def report(path: str, reason: str, bar: tqdm | None = None) -> None:
    """The one stderr line for a failed input."""
    line = f"'{path}': {reason}"
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def run_bulk(tagger: Tagger, paths: Sequence[str], sink: CaptionSink | CsvSink | PrintSink, *, batch_size: int = 1,
             workers: int = 0, share_memory: bool = True, progress: bool = True,
             report: DatasetReport | None = None) -> Summary:
    """Tag `paths` and hand each image's probabilities to `sink`.

    Args:
        tagger: the loaded model; its picklable `preprocess` runs in the loader workers, `predict_samples` here.
        batch_size: images per model call (similar lengths are grouped, see hydra/bulk/batching.py).
        workers: loader processes (0 = decode in this process).
        report: also fed each written image (`--report`, hydra/bulk/report.py).
    """
    summary = Summary()
    needed = sink.needed_tags()
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    ok = False
    try:
        with ImageLoader(tagger.preprocess, workers, share_memory) as loader:
            for batch in _batches(loader.imap(paths), batch_size, tagger.sample_tokens, summary, bar):
                names = [p for p, _ in batch]
                probs = tagger.predict_samples([s for _, s in batch], needed)
                for name, row in zip(names, probs):
                    try:
                        sink.write(name, row)
                        summary.tagged += 1
                        if report is not None:
                            report.add(name, row)
                    except OSError as e:
                        summary.fail(name, f"cannot write output ({e.strerror or e})", bar)
                bar.update(len(batch))
        ok = True
    finally:
        bar.close()
        sink.close(ok)
    return summary


def _batches(results: Iterable[tuple[str, dict | LoadError]], size: int, tokens: Callable[[dict], int],
             summary: Summary, bar: tqdm) -> Iterator[list[tuple[str, dict]]]:
    def loaded() -> Iterator[tuple[str, dict]]:
        for path, sample in results:
            if isinstance(sample, LoadError):
                summary.fail(path, str(sample), bar)
                bar.update(1)
                continue
            yield path, sample

    # Similar lengths batched together (little padding); the first image still goes alone (hydra/bulk/batching.py).
    yield from group_by_length(loaded(), size, lambda item: tokens(item[1]))

