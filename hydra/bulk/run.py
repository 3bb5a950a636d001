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
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from hydra.bulk.batching import group_by_length
from hydra.bulk.loader import ImageLoader, LoadError
from hydra.common import AtomicFile, atomic_write, log
from hydra.images.decode import is_url
from hydra.tags.rules import CaptionFormat, TagRules, ranked, tag_key

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
        suffix = os.path.splitext(name)[1].lower()
        image = suffix in exts and suffix not in SKIP_SUFFIXES
        if not (image or recursive):
            continue  # neither an image nor a folder to enter: no need to look at it
        try:
            is_dir = entry.is_dir()
        except OSError as e:  # a link to itself (ELOOP), an entry that vanished or cannot be examined
            report(entry.path, f"skipped: cannot examine it ({e.strerror or e})")
            if errors is not None:
                errors.append(entry.path)
            continue
        if is_dir:
            if recursive:
                yield from _scan(entry.path, recursive, exts, seen, errors)
            continue
        if image:
            yield entry.path  # dangling links and non-regular files too: the loader reports them


CAPTION_EXTENSION = ".txt"
KOHYA_FOLDER = re.compile(r"(\d+)_(.+)")  # kohya's `N_name/` training folders (N repeats; name = trigger)


def caption_extension(text: str) -> str:
    """`--caption-extension`: `.caption` or `caption` -> `.caption`.

    Raises:
        ValueError: empty, a path separator, `.`/`..`, or an image extension (the caption would replace an
            image with the same stem).
    """
    ext = text if text.startswith(".") else "." + text
    if ext in (".", "..") or any(c in ext for c in "/\\\0") or (os.altsep and os.altsep in ext):
        raise ValueError(f"--caption-extension {text!r}: an extension such as .txt or .caption, without a path "
                         "separator")
    if ext.lower() in image_extensions():
        raise ValueError(f"--caption-extension {text!r}: that is an image extension; captions would replace "
                         "images of the same name")
    return ext


def caption_path(image_path: str, extension: str = CAPTION_EXTENSION, output_dir: str | None = None,
                 root: str | None = None) -> str:
    """Where an image's caption goes.

    Beside the image by default: `folder/name.png` -> `folder/name.txt` (the original's rule: replace the
    extension; `extension` is `--caption-extension`). With `output_dir` (`--output-dir`), the same relative
    path under it: relative to `root`, the folder argument the image was found in, or, for an image given as
    a file (`root` None), directly in `output_dir` (`DIR/name.txt`).

    Raises:
        OSError: the caption would fall outside `output_dir` (never happens for scanned paths; a guard).
    """
    stem = os.path.splitext(image_path)[0]
    if output_dir is None:
        return stem + extension
    rel = os.path.relpath(stem, root) if root is not None else os.path.basename(stem)
    base = os.path.abspath(output_dir)
    target = os.path.normpath(os.path.join(base, rel + extension))
    if os.path.commonpath([base, target]) != base or os.path.dirname(target) == target:
        raise OSError(errno.EINVAL, f"its caption {target!r} would fall outside --output-dir {output_dir!r}")
    return target


@dataclass(frozen=True)
class CaptionOptions:
    """Where captions go and what every caption of a folder starts with (picklable: Ray's writers get it).

    Attributes:
        extension: `--caption-extension` (with its dot).
        output_dir: `--output-dir`, absolute; None = beside the images.
        roots: the folder arguments, absolute, in the order given (an image belongs to the first that holds it,
            as the scan enters each real folder once); files given directly have no root.
        trigger_from_folder: `--trigger-from-folder`: the `name` of a kohya `N_name/` parent folder goes first.
    """

    extension: str = CAPTION_EXTENSION
    output_dir: str | None = None
    roots: tuple[str, ...] = ()
    trigger_from_folder: bool = False

    @classmethod
    def create(cls, paths: Iterable[str] = (), extension: str = CAPTION_EXTENSION, output_dir: str | None = None,
               trigger_from_folder: bool = False) -> CaptionOptions:
        roots = tuple(os.path.abspath(p) for p in paths if not is_url(p) and os.path.isdir(p)) if output_dir else ()
        return cls(caption_extension(extension), output_dir and os.path.abspath(output_dir), roots,
                   trigger_from_folder)

    def root(self, image_path: str) -> str | None:
        full = os.path.abspath(image_path)
        return next((r for r in self.roots if full.startswith(r.rstrip(os.sep) + os.sep)), None)

    def path(self, image_path: str) -> str:
        """The caption file of an image (`caption_path`)."""
        root = self.root(image_path) if self.output_dir else None
        return caption_path(os.path.abspath(image_path) if root else image_path, self.extension, self.output_dir,
                            root)

    def first(self, image_path: str) -> list[str]:
        """The items every caption of this image's folder starts with: the kohya folder's trigger word."""
        if not self.trigger_from_folder:
            return []
        return folder_trigger(os.path.basename(os.path.dirname(os.path.abspath(image_path))))


def folder_trigger(folder: str) -> list[str]:
    """`--trigger-from-folder`: `[name]` for a kohya `N_name` folder name, else `[]`."""
    match = KOHYA_FOLDER.fullmatch(folder)
    return [match.group(2)] if match and match.group(2).strip() else []


@dataclass
class Summary:
    tagged: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    stopped: bool = False  # an output error ended the run early (`stop`)

    def line(self) -> str:
        parts = [f"Tagged {self.tagged} image{'s' * (self.tagged != 1)}"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        parts.append(f"{self.failed} failed")
        return ", ".join(parts) + (" (the run stopped: its output could not be written)." if self.stopped else ".")

    def stop(self, total: int, lost: bool) -> None:
        """The output failed for good after `total` inputs were handed to this run: every input not tagged yet
        counts as failed, and with `lost` (a CSV that is never committed) the tagged ones too."""
        remaining = total - self.tagged - self.failed
        if lost:
            self.failed, self.tagged = self.failed + self.tagged, 0
        self.failed += max(remaining, 0)
        self.stopped = True

    def fail(self, path: str, reason: str, bar: tqdm | None = None) -> None:
        """Count a failed input and print its one stderr line."""
        self.failed += 1
        self.failures.append((path, reason))
        report(path, reason, bar)


EXISTING = ("overwrite", "skip", "append")
MAX_CAPTION_BYTES = 1 << 20  # an existing caption larger than this is not a caption (7,504 tags take ~150 KB)
BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


class SkipImage(Exception):
    """This image gets no output (and counts as failed); str(e) is the one-line reason."""


class OutputError(Exception):
    """The run's output (an `-o` file, stdout) cannot be written any more: the run stops. str(e) is the line;
    `lost` says whether the rows already written are lost with it (a CSV file that will not be committed);
    `error` is the OSError behind it."""

    def __init__(self, message: str, lost: bool, error: OSError | None = None):
        super().__init__(message)
        self.lost, self.error = lost, error


def write_reason(e: OSError) -> str:
    """`e` as the reason of a failed write: the system's words and the file (`hydra.common` errors name the
    file written, not its temporary)."""
    text = e.strerror or str(e)
    return f"'{e.filename}': {text}" if e.filename else text


def read_caption(path: str, limit: int = MAX_CAPTION_BYTES) -> str:
    """An existing caption, whatever its encoding.

    A byte-order mark decides (UTF-8, UTF-16 LE or BE); without one, UTF-8, else Windows-1252, else Latin-1
    (which accepts any bytes), so an old caption never stops a run. Only a regular file is read (a FIFO would
    block, a device never end), at most `limit` bytes.

    Raises:
        OSError: the file cannot be read, is not a regular file, is larger than `limit`, or cannot be decoded
            without losing text (a broken UTF-16 file, NUL bytes of UTF-16 without a mark); strerror says why.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                    "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file")
            raise OSError(errno.EINVAL, f"{kind}, not a regular file", path)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise OSError(errno.EFBIG, f"larger than {limit >> 10} KiB, so not a caption", path)
    data = b"".join(chunks)
    for bom, encoding in BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(encoding)
            except UnicodeDecodeError:
                raise OSError(errno.EILSEQ, f"not valid {encoding.upper()} text after its byte-order mark",
                              path) from None
    if b"\0" in data:
        raise OSError(errno.EILSEQ, "holds NUL bytes (UTF-16 without a byte-order mark?), so not a text caption",
                      path)
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def _key(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def caption_conflicts(targets: Mapping[str, str]) -> dict[str, str]:
    """Images whose caption must not be written, with the reason, from {image: its caption file}.

    Rules, whatever names the captions (`caption_path` and its options):
    - a caption file that is one of the images (an image named `pic.txt`, or `a.png` beside an input `a.txt`)
      is never written;
    - images sharing one caption file (`a.png` and `a.jpg` -> `a.txt`): the first in sorted order gets it, the
      others get none (the same image reached by two paths is one image).

    Files are compared by their real paths (symlinks resolved; case-insensitively where the OS is).
    """
    images = {_key(image): image for image in targets}
    refused: dict[str, str] = {}
    owners: dict[str, tuple[str, str]] = {}  # caption key -> (image key, image) of the image that gets it
    for image in sorted(targets):
        caption = targets[image]
        key, own = _key(caption), _key(image)
        if key in images:
            other = images[key]
            refused[image] = ("its caption would replace the image itself" if key == own else
                              f"its caption '{caption}' would replace the input image '{other}'")
            continue
        first = owners.setdefault(key, (own, image))
        if first[0] != own:
            refused[image] = (f"same caption file '{caption}' as '{first[1]}', which gets it (rename one of them "
                              "to caption both)")
    return refused


def merge_captions(existing: str, new: str, prefix: str | Sequence[str] = "", separator: str = ", ") -> str:
    """`--existing append`: the existing caption, then the new tags it does not have yet.

    Tags compare ignoring case, spacing, underscores vs spaces and prompt escapes (`tag_key`), so `male_feral`,
    `Male Feral` and `male feral` are one tag. Both captions are split on the separator's visible part (on
    whitespace when it is blank) and joined with `separator`. The first items (`-p`, a folder's trigger word)
    missing from the old caption's start go first.
    """
    core = separator.strip()

    def split(text: str) -> list[str]:
        return [t.strip() for t in (text.split(core) if core else text.split()) if t.strip()]

    old = split(existing)
    seen = {tag_key(t) for t in old}
    words = list(old)
    for tag in split(new):
        if tag_key(tag) not in seen:
            seen.add(tag_key(tag))
            words.append(tag)
    first = [prefix] if isinstance(prefix, str) and prefix else [] if isinstance(prefix, str) else list(prefix)
    keys = [tag_key(f) for f in first]
    if keys and [tag_key(w) for w in words[: len(keys)]] != keys:
        rest = [w for w in words if tag_key(w) not in keys]
        given = {tag_key(w): w for w in words}
        words = [given.get(k, f) for k, f in zip(keys, first)] + rest
    return separator.join(words)


class CaptionSink:
    """Writes one `.txt` caption beside each image (atomically, UTF-8, no trailing newline).

    With `append`, an existing caption is kept and only new tags are added to it (`--existing append`); it is
    read in its own encoding (`read_caption`) and written back as UTF-8 without a byte-order mark.
    A caption is never written over an input, nor twice in one run (`caption_conflicts`).

    Args:
        rules: the run's TagRules (which tags an image gets).
        captions: how they are spelled and ordered (the family's style plus the spelling flags).
    """

    def __init__(self, rules: TagRules, captions: CaptionFormat, prefix: str = "", shuffle: bool = False,
                 append: bool = False, options: CaptionOptions | None = None):
        self.rules, self.captions, self.prefix, self.shuffle, self.append = rules, captions, prefix, shuffle, append
        self.options = options or CaptionOptions()

    def needed_tags(self) -> np.ndarray | None:
        return self.rules.active()

    def target(self, path: str) -> str:
        """The caption file of the image `path` (`CaptionOptions.path`)."""
        return self.options.path(path)

    def refuse(self, paths: Sequence[str]) -> dict[str, str]:
        """Images of this run that get no caption, with the reason (`caption_conflicts`)."""
        targets, refused = {}, {}
        for p in paths:
            try:
                targets[p] = self.target(p)
            except OSError as e:  # outside --output-dir (a guard)
                refused[p] = e.strerror or str(e)
        refused |= caption_conflicts(targets)
        return {p: f"cannot write output ({reason})" for p, reason in refused.items()}

    def write(self, path: str, probs: np.ndarray) -> None:
        first = self.options.first(path)
        caption = self.captions.caption(self.rules.classify(probs), self.prefix, self.shuffle, first=first)
        target = self.target(path)
        if _key(target) == _key(path):  # also checked for the whole run up front (`refuse`)
            raise SkipImage("cannot write output (its caption would replace the image itself)")
        if self.options.output_dir is not None:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        if self.append and os.path.exists(target):
            try:
                old = read_caption(target)
            except OSError as e:
                raise SkipImage(f"cannot read its existing caption '{target}' ({e.strerror or e})") from None
            caption = merge_captions(old, caption, self.captions.first_items(self.prefix, first),
                                     self.captions.separator)
        with atomic_write(target, "w", encoding="utf-8", newline="") as f:
            f.write(caption)

    def close(self, ok: bool) -> None:
        pass


class CsvSink:
    """Raw probabilities of every tag, one row per image (`%.4f`, model order, csv default dialect).

    `-o PATH` writes a header row (`filename`, then the tag names) and the rows to PATH, which appears only when
    the run completes; a write error stops the run (OutputError) and PATH is then never written. `-o -` prints
    the rows to stdout, with the header only for families whose original does so (`header_on_stdout`: Hydra
    3.5; JTP-3's original prints none).
    """

    def __init__(self, target: str, labels: Sequence[str], header_on_stdout: bool = False):
        # surrogateescape: a file name that is not valid UTF-8 is written back as its original bytes
        self._file = None if target == "-" else AtomicFile(target, "w", encoding="utf-8", newline="",
                                                             errors="surrogateescape")
        self._out = sys.stdout if self._file is None else self._file.file
        self._target, self._broken = target, False
        self._name = "standard output" if target == "-" else f"'{target}'"
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
        except BrokenPipeError:
            if self._file is None:
                raise  # stdout's reader has gone (`| head`): the caller stops quietly
            self._fail_for_good(BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)))
        except OSError as e:
            # Part of a row may be in the buffer: the file can no longer be trusted, and tagging on would only
            # produce rows that cannot be kept. Stop the run.
            self._fail_for_good(e)

    def _fail_for_good(self, e: OSError) -> None:
        self._broken = True
        if self._file is None:
            raise OutputError(f"cannot write to standard output ({e.strerror or e}); the run stopped", False, e)
        if self._file.tmp is None:  # a FIFO or device, written in place: the rows so far have gone out
            raise OutputError(f"cannot write {self._name} ({e.strerror or e}); the run stopped", False, e)
        raise OutputError(f"cannot write {self._name} ({e.strerror or e}); the run stopped and {self._name} was "
                          "not written", True, e) from None

    def close(self, ok: bool) -> None:
        """Commit the file when the run completed (`ok`), else remove it. Raises OutputError if the commit fails
        (a full disk shows when the file is closed); nothing is committed then."""
        if self._file is not None:
            file, self._file = self._file, None
            if ok and not self._broken:
                try:
                    file.commit()
                except OSError as e:
                    raise OutputError(f"cannot write {self._name} ({e.strerror or e}); it was not written",
                                      file.tmp is not None, e) from None
            else:
                file.discard()


FORMATS = ("pretty", "tags", "names", "json", "jsonl")


class PrintSink:
    """`--format`: each image's tags on stdout, most probable first (the DINOv3 card's CLI formats).

    pretty: a ruled header with the path, then `rank. score bar tag` lines; tags: one line per image, the
    image's caption exactly as the `.txt` file would hold it (`caption(path, tags)`: spelling, order,
    separator, `-p`); names: one line per image, the label names most probable first, joined by ", ";
    jsonl: one `{"file", "tags": [{"tag", "score"}]}` object per line (label names); json: the same
    objects as one array, printed when the run ends (indent 2).
    """

    def __init__(self, fmt: str, rules: TagRules, stream: TextIO | None = None,
                 caption: Callable[[str, dict[str, float]], str] | None = None):
        assert fmt in FORMATS, fmt
        self.fmt, self.rules, self.stream = fmt, rules, stream or sys.stdout
        self._caption = caption or (lambda path, tags: ", ".join(t for t, _ in ranked(tags)))
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
            text = json_text(item)
        elif self.fmt == "tags":
            text = self._caption(path, tags)
        elif self.fmt == "names":
            text = ", ".join(t for t, _ in ordered)
        else:
            rule = "-" * 60
            lines = [f"{i:>3}. {p:.3f} {'█' * int(p * 20):<20} {t}" for i, (t, p) in enumerate(ordered, 1)]
            text = "\n".join([rule, path, rule, *lines])
        self._print(text)

    def _print(self, text: str) -> None:
        try:
            print(text, file=self.stream, flush=True)
        except BrokenPipeError:
            raise  # the reader has gone (`| head`): the caller stops quietly
        except OSError as e:
            raise OutputError(f"cannot write to standard output ({e.strerror or e}); the run stopped", False,
                              e) from None

    def close(self, ok: bool) -> None:
        if self.fmt == "json" and ok:
            self._print(json_text(self._items, indent=2))


def json_text(value: object, indent: int | None = None) -> str:
    """JSON as UTF-8 text, readable (non-ASCII as is), always valid UTF-8.

    A file name that is not valid UTF-8 reaches Python with surrogate escapes (PEP 383); printed as they are,
    they would become the name's raw bytes, which is not UTF-8. Here they stay JSON escapes (`"\\udce9"`), which
    Python's json reads back to the same escapes (`os.fsencode` gives the original bytes), as in shard files.
    """
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


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

    An image whose own output cannot be written (a caption) is reported and counted as failed, and the run
    goes on; when the run's output fails (OutputError: the `-o` file, stdout), the run stops, the error is
    logged and the summary counts what was lost (`Summary.stop`). BrokenPipeError (stdout's reader has gone,
    `| head`) is raised after the sink is closed, for the caller to exit quietly (`hydra.common.exit_quietly`).

    Args:
        tagger: the loaded model; its picklable `preprocess` runs in the loader workers, `predict_samples` here.
        batch_size: images per model call (similar lengths are grouped, see hydra/bulk/batching.py).
        workers: loader processes (0 = decode in this process).
        report: also fed each written image (`--report`, hydra/bulk/report.py).
    """
    summary = Summary()
    needed = sink.needed_tags()
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    refused = getattr(sink, "refuse", lambda _: {})(paths)  # e.g. a caption that would replace an input
    for path, reason in refused.items():
        summary.fail(path, reason, bar)
        bar.update(1)
    todo = [p for p in paths if p not in refused]
    ok = False
    try:
        try:
            with ImageLoader(tagger.preprocess, workers, share_memory) as loader:
                for batch in _batches(loader.imap(todo), batch_size, tagger.sample_tokens, summary, bar):
                    names = [p for p, _ in batch]
                    probs = tagger.predict_samples([s for _, s in batch], needed)
                    for name, row in zip(names, probs):
                        try:
                            sink.write(name, row)
                            summary.tagged += 1
                            if report is not None:
                                report.add(name, row)
                        except SkipImage as e:
                            summary.fail(name, str(e), bar)
                        except (OutputError, BrokenPipeError):
                            raise
                        except OSError as e:  # this image's own output (a caption): the run goes on
                            summary.fail(name, f"cannot write output ({write_reason(e)})", bar)
                    bar.update(len(batch))
            ok = True
        finally:
            bar.close()
            sink.close(ok)  # commits the output when ok (raises OutputError if that fails), else removes it
    except OutputError as e:  # the output is gone for good: tagging on would only produce lost work
        log(f"error: {e}")
        summary.stop(len(paths), e.lost)
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

