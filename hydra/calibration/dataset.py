"""Calibration on your own images: true tags from sidecar files, and a resumable cache of probabilities.

`calibrate.py --from-dataset DIR` runs the model once over a folder of tagged images, counts tp/fp/tn/fn per
tag at the 99 thresholds 0.01..0.99 (`hydra.calibration.thresholds.counts_from_scores`), and calibrates from those
counts exactly as from RedRocket's validation data. This module holds everything except the selection.

Ground truth (the rules, in one place):
- An image's true tags come from `NAME.json` or, failing that, `NAME.txt` beside `NAME.png` (any image).
  `.txt`: tags separated by commas or newlines, in e621 spelling (`red_fox`, `3d_(artwork)`) or caption
  spelling (`red fox`, `3d \\(artwork\\)`). `.json`: a list of tags, an object with a `tags` list (or an
  e621-style space-separated string), or an e621 post (`{"tags": {"general": [...], ...}, "rating": "e"}`,
  optionally wrapped in `{"post": ...}`); an e621 rating letter adds `safe`/`questionable`/`explicit`.
- Tags match model labels ignoring case, `_` versus space and prompt escapes; for JTP-3 the diffusion
  rename `pussy` is read back as the model's `vulva`. Tags that match nothing are counted and reported.
- With tag metadata, true tags are closed under implications (`red_fox` -> `fox` -> `canine`): e621
  applies implications to its posts, so the model learned (and RedRocket validated) on closed tag sets;
  a caption listing `red_fox` alone would otherwise count a correct `canine` as a false positive.
- Every model tag missing from an image's (closed) tags is a negative for that image, as in RedRocket's
  validation on e621 posts. So a tag is only worth calibrating from the dataset when it has positives;
  `merge_curves` takes the others from the default validation data (or leaves them out).
- Images without a sidecar, with an empty one, or whose sidecar names no model tag at all (a prose
  caption, say) are skipped and counted; an unreadable sidecar or image is reported and skipped.

Probability cache: `DIR/.hydra-calibration/<model>-<key>/`, keyed by the model files (path, size, mtime)
and everything else that changes the numbers (dtype, sequence length / DINOv3 preprocessing), holding
append-only chunk files of (image path, size, mtime, probabilities). See `ProbabilityCache`. Editing the
sidecars never invalidates it; images that failed are not cached and are tried again on the next run.

Shapes: N = images, T = model tags.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hydra.bulk.run import iter_images, read_caption, report, run_bulk
from hydra.calibration.thresholds import VALIDATION_THRESHOLDS, Curve, counts_from_scores, curves_from_counts
from hydra.common import atomic_write, log

if TYPE_CHECKING:
    from hydra.tagger import Tagger, TaggerSpec

SIDECAR_SUFFIXES = (".json", ".txt")  # looked for in this order: the structured file wins
CACHE_DIR = ".hydra-calibration"  # inside the dataset folder; the dot keeps folder scans out of it
CACHE_VERSION = 1
RATINGS = {"s": "safe", "q": "questionable", "e": "explicit"}  # e621's `rating` letters -> JTP-3's tags
# A chunk of new probabilities is written at least this often (and when the run ends or is interrupted),
# so a crash loses at most this much work.
FLUSH_SECONDS = 30.0
FLUSH_IMAGES = 1024
_COUNT_COLUMNS = 512  # tags counted at a time (bounds the float64 copy for large N)


class SidecarError(ValueError):
    """A sidecar file could not be read or has an unexpected shape; str(e) is the one-line reason."""


# ---------------------------------------------------------------------------------------------------
# Sidecars


def find_sidecar(image_path: str) -> str | None:
    """`NAME.json` or `NAME.txt` beside `NAME.ext` (JSON first), or None."""
    stem = os.path.splitext(image_path)[0]
    for suffix in SIDECAR_SUFFIXES:
        if os.path.isfile(stem + suffix):
            return stem + suffix
    return None


def read_sidecar(path: str) -> list[str]:
    """The tags listed in a `.txt` or `.json` sidecar, as written (not yet matched to the model).

    Raises:
        SidecarError: unreadable file, invalid JSON, or JSON of an unexpected shape.
    """
    try:
        if path.lower().endswith(".json"):
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
            return tags_from_json(data)
        return split_caption(read_caption(path))
    except json.JSONDecodeError as e:
        raise SidecarError(f"not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise SidecarError("JSON sidecar is not UTF-8 text") from None
    except OSError as e:
        raise SidecarError(f"cannot read the sidecar ({e.strerror or e})") from None


def split_caption(text: str) -> list[str]:
    """Tags of a caption: separated by commas or newlines, surrounding blanks stripped, empties dropped."""
    return [t.strip() for t in re.split(r"[,\n]", text) if t.strip()]


def tags_from_json(data: Any) -> list[str]:
    """Tags of a JSON sidecar (see the module docstring for the accepted shapes)."""
    if isinstance(data, dict) and isinstance(data.get("post"), dict):
        data = data["post"]  # e621's /posts/ID.json
    if isinstance(data, list):
        return _strings(data, "the list")
    if not isinstance(data, dict) or "tags" not in data:
        raise SidecarError("JSON sidecar must be a list of tags or an object with 'tags'")
    raw, tags = data["tags"], []
    if isinstance(raw, str):
        tags = raw.split()  # e621 tags never contain spaces
    elif isinstance(raw, list):
        tags = _strings(raw, "'tags'")
    elif isinstance(raw, dict):  # e621 post: category -> list of tags
        for category, names in raw.items():
            tags += _strings(names, f"'tags.{category}'")
    else:
        raise SidecarError(f"'tags' must be a list, a string or an object of lists, not {type(raw).__name__}")
    rating = data.get("rating")
    if isinstance(rating, str) and rating[:1].lower() in RATINGS:
        tags.append(RATINGS[rating[:1].lower()])
    return tags


def _strings(values: Any, what: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SidecarError(f"{what} must be a list of strings")
    return [v.strip() for v in values if v.strip()]


# ---------------------------------------------------------------------------------------------------
# Matching sidecar tags to model labels


def _key(tag: str) -> str:
    return tag.strip().lower().replace(" ", "_")


def _unescape(tag: str) -> str:
    return re.sub(r"\\(.)", r"\1", tag)  # prompt escapes: 3d \(artwork\) -> 3d (artwork)


class TagMatcher:
    """Finds the model label a sidecar tag means.

    A tag matches a label when they are equal ignoring case and `_` versus space, first as written and
    then with prompt escapes (`\\(`) removed. Exact spellings win over these looser ones.

    Args:
        labels: the model's labels, model order.
        renames: the family's caption renames (old, new): the renamed spelling is accepted too (JTP-3 captions
            are written with `pussy` for `vulva`).
    """

    def __init__(self, labels: Sequence[str], renames: Sequence[tuple[str, str]] = ()):
        self.labels = list(labels)
        self._index: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            self._index.setdefault(label, i)
        for i, label in enumerate(self.labels):
            self._index.setdefault(_key(label), i)
        for old, new in renames:
            for i, label in enumerate(self.labels):
                if old in label:
                    self._index.setdefault(_key(label.replace(old, new)), i)

    def index(self, tag: str) -> int | None:
        """The label index of `tag`, or None."""
        for form in (tag, _key(tag), _key(_unescape(tag))):
            if form in self._index:
                return self._index[form]
        return None

    def name(self, tag: str) -> str:
        """The label `tag` means, or `tag` itself when it means none."""
        i = self.index(tag)
        return tag if i is None else self.labels[i]


# ---------------------------------------------------------------------------------------------------
# Ground truth


@dataclass
class GroundTruth:
    """The dataset's labelled images and their true tags.

    Attributes:
        images: paths of the images that count, scan order.
        truth: (N, T) bool, True where the tag is true for the image (after implications).
        unmatched: sidecar tag -> number of images listing it, for tags that match no model label.
        matched: (image, label) pairs named by the sidecars, before implications.
        implied: true tags added by implications.
        no_sidecar, empty, no_model_tag: images skipped for each reason.
        failed: sidecars that could not be read (already reported on stderr).
    """

    images: list[str]
    truth: np.ndarray
    unmatched: collections.Counter = field(default_factory=collections.Counter)
    matched: int = 0
    implied: int = 0
    no_sidecar: int = 0
    empty: int = 0
    no_model_tag: int = 0
    failed: int = 0


def read_sidecars(images: Iterable[str]) -> tuple[dict[str, list[str]], int, int]:
    """Raw tags of every image that has a sidecar.

    Returns:
        (image -> tags as written, images without a sidecar, unreadable sidecars). Unreadable sidecars
        are reported on stderr in the one-line format.
    """
    raw, missing, failed = {}, 0, 0
    for image in images:
        sidecar = find_sidecar(image)
        if sidecar is None:
            missing += 1
            continue
        try:
            raw[image] = read_sidecar(sidecar)
        except SidecarError as e:
            report(sidecar, str(e))
            failed += 1
    return raw, missing, failed


def ground_truth(raw: Mapping[str, list[str]], matcher: TagMatcher, implies: Mapping[str, Sequence[str]] | None = None,
                 ) -> GroundTruth:
    """Match sidecar tags to labels and build the truth matrix.

    Args:
        raw: image -> sidecar tags as written (from `read_sidecars`).
        matcher: the model's labels.
        implies: direct implications (tag -> implied tags, any spelling the matcher understands); the true
            tags are closed under them. None = as written.
    """
    gt = GroundTruth([], np.zeros((0, len(matcher.labels)), bool))
    rows = []
    for image, tags in raw.items():
        if not tags:
            gt.empty += 1
            continue
        hits = set()
        for tag in tags:
            i = matcher.index(tag)
            if i is None:
                gt.unmatched[tag] += 1
            else:
                hits.add(i)
        if not hits:
            gt.no_model_tag += 1
            continue
        gt.matched += len(hits)
        row = np.zeros(len(matcher.labels), bool)
        row[list(hits)] = True
        gt.images.append(image)
        rows.append(row)
    if rows:
        gt.truth = np.stack(rows)  # (N, T)
    if implies and rows:
        closed = close_under_implications(gt.truth, matcher, implies)
        gt.implied = int(closed.sum() - gt.truth.sum())
        gt.truth = closed
    return gt


def close_under_implications(truth: np.ndarray, matcher: TagMatcher,
                             implies: Mapping[str, Sequence[str]]) -> np.ndarray:
    """(N, T) truth with every tag implied (transitively) by a true tag set true as well."""
    from hydra.tags.implications import ImplicationGraph

    graph = ImplicationGraph(matcher.labels, {matcher.name(t): [matcher.name(c) for c in cs]
                                              for t, cs in implies.items()})
    # inherit: p'(t) = max of p over t and every tag implying it; on 0/1 values that is the closure
    return graph.inherit(truth.astype(np.float32)) > 0.5


# ---------------------------------------------------------------------------------------------------
# The model and its cache key


def key_info(spec: TaggerSpec) -> dict:
    """What the cache key is a hash of: the model files' identity and the settings that change p."""
    from hydra.common import choose_dtype, default_device
    from hydra.models import detect

    family = detect(spec.path)
    # the resolved dtype, not "auto": bf16 and fp32 give slightly different probabilities. The device is
    # left out on purpose: CPU and GPU kernels differ far below the 0.01 threshold grid.
    dtype = str(choose_dtype(spec.device or default_device(), spec.dtype)[0]).removeprefix("torch.")
    files = family.model_files(spec.path, spec.options)
    return {"version": CACHE_VERSION, "family": family.name, "files": [_file_id(p) for p in files],
            "dtype": dtype, **family.cache_settings(spec.size, spec.options)}


def load_model(spec: TaggerSpec) -> Tagger:
    log(f"Loading '{spec.path}' ...", end="")
    tagger = spec.load()
    log(f" {len(tagger.labels)} tags ({tagger.device}, {tagger.dtype_reason})")
    return tagger


def _file_id(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def cache_folder(dataset: str, checkpoint: str, key_info: Mapping) -> str:
    """`DATASET/.hydra-calibration/<model stem>-<16 hex digits of the key's sha256>`."""
    digest = hashlib.sha256(json.dumps(key_info, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(dataset, CACHE_DIR, f"{Path(checkpoint).stem}-{digest}")


# ---------------------------------------------------------------------------------------------------
# The probability cache


class ProbabilityCache:
    """Probabilities of one model on one dataset's images, kept across runs.

    Layout of `folder`: `model.json` (the key information and the model's labels, so a fully cached rerun
    need not load the model) and chunk files `000001.npz`, `000002.npz`, ... each holding `paths` (n,)
    paths relative to the dataset, `sizes` and `mtimes` (n,) int64 (bytes, ns) and `probs` (n, T) float32.

    Chunks are only ever added, each written to a hidden temporary file and renamed into place, so a crash
    or Ctrl-C loses at most the chunk being written and never damages earlier ones; a later chunk wins for
    the same image. A damaged or foreign chunk is ignored with a note. An entry is used only while the
    image's size and mtime are unchanged. `compact()` merges the chunks into one at the end of a run.
    If the folder cannot be written (read-only dataset), the run goes on without caching.

    Args:
        folder: the cache folder (from `cache_folder`).
        root: the dataset folder; entries are keyed by paths relative to it.
        key_info: the JSON-serialisable key information stored in `model.json`.
    """

    def __init__(self, folder: str, root: str, key_info: Mapping):
        self.folder, self.root, self.key_info = folder, root, dict(key_info)
        self.entries: dict[str, tuple[int, int, np.ndarray]] = {}  # relative path -> (size, mtime_ns, (T,) row)
        self._pending: list[tuple[str, int, int, np.ndarray]] = []
        self._writable = True
        self.labels: list[str] | None = None

    # -- reading ----------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read `model.json` and every chunk (later chunks override earlier ones)."""
        try:
            with open(os.path.join(self.folder, "model.json"), encoding="utf-8") as f:
                info = json.load(f)
            if info.get("key") == json.loads(json.dumps(self.key_info)):
                self.labels = list(info["labels"])
        except (OSError, ValueError, KeyError, TypeError):
            self.labels = None
        if self.labels is None:
            return  # chunks cannot be checked without the labels; they will be replaced
        for path in self._chunks():
            try:
                self._read_chunk(path)
            except (OSError, ValueError, KeyError, EOFError) as e:
                log(f"Note: ignoring damaged cache file '{path}' ({' '.join(str(e).split())[:120]}).")

    def _read_chunk(self, path: str) -> None:
        with np.load(path, allow_pickle=False) as z:
            paths, sizes, mtimes, probs = z["paths"], z["sizes"], z["mtimes"], z["probs"]
        n = len(paths)
        if not (sizes.shape == mtimes.shape == (n,) and probs.shape == (n, len(self.labels))
                and probs.dtype == np.float32):
            raise ValueError(f"unexpected shapes {paths.shape} {sizes.shape} {mtimes.shape} {probs.shape}")
        for rel, size, mtime, row in zip(paths.tolist(), sizes.tolist(), mtimes.tolist(), probs):
            self.entries[rel] = (size, mtime, row)

    def _chunks(self) -> list[str]:
        try:
            names = sorted(n for n in os.listdir(self.folder) if re.fullmatch(r"\d{6,}\.npz", n))
        except OSError:
            return []
        return [os.path.join(self.folder, n) for n in sorted(names, key=lambda n: int(n[:-4]))]

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def get(self, path: str, stat: tuple[int, int] | None) -> np.ndarray | None:
        """The cached (T,) probabilities of `path` if its (size, mtime_ns) still match, else None."""
        entry = self.entries.get(self.relative(path))
        if entry is None or stat is None or entry[:2] != stat:
            return None
        return entry[2]

    # -- writing ----------------------------------------------------------------------------------------

    def set_labels(self, labels: Sequence[str]) -> None:
        """Record the model's labels (a new or mismatched cache starts empty)."""
        if self.labels != list(labels):
            self.clear()
        self.labels = list(labels)
        self._write_json()

    def clear(self) -> None:
        """Forget every entry and delete the chunk files (`--refresh`)."""
        self.entries.clear()
        for path in self._chunks():
            self._guard(os.unlink, path)

    def add(self, path: str, stat: tuple[int, int] | None, row: np.ndarray) -> None:
        """Remember `row` for `path`; written by the next `flush()`. Files without a stat are not cached."""
        if stat is None:
            return
        rel = self.relative(path)
        self.entries[rel] = (*stat, row)
        self._pending.append((rel, *stat, row))

    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Write the pending entries as one new chunk."""
        if self._pending:
            items, self._pending = self._pending, []
            self._write_chunk(items)

    def compact(self) -> None:
        """Merge all chunks into one, dropping entries whose image changed or is gone."""
        chunks = self._chunks()
        if len(chunks) <= 1:
            return
        keep = [(rel, size, mtime, row) for rel, (size, mtime, row) in self.entries.items()
                if _stat(os.path.join(self.root, rel)) == (size, mtime)]
        if self._write_chunk(keep):
            for path in chunks:
                self._guard(os.unlink, path)

    def _write_chunk(self, items: list[tuple[str, int, int, np.ndarray]]) -> bool:
        if not self._writable or not items:
            return False
        chunks = self._chunks()
        number = int(os.path.basename(chunks[-1])[:-4]) + 1 if chunks else 1
        path = os.path.join(self.folder, f"{number:06d}.npz")
        rels, sizes, mtimes, rows = zip(*items)

        def write() -> None:
            os.makedirs(self.folder, exist_ok=True)
            with atomic_write(path, "wb") as f:
                np.savez(f, paths=np.array(rels, dtype=str), sizes=np.array(sizes, np.int64),
                         mtimes=np.array(mtimes, np.int64), probs=np.stack(rows).astype(np.float32, copy=False))

        return self._guard(write)

    def _write_json(self) -> None:
        def write() -> None:
            os.makedirs(self.folder, exist_ok=True)
            with atomic_write(os.path.join(self.folder, "model.json"), "w", encoding="utf-8") as f:
                json.dump({"key": self.key_info, "labels": self.labels}, f, ensure_ascii=False, indent=1)

        self._guard(write)

    def _guard(self, fn: Any, *args: Any) -> bool:
        """Run a write; on the first OSError say so once and stop caching (the run itself goes on)."""
        if not self._writable:
            return False
        try:
            fn(*args)
            return True
        except OSError as e:
            self._writable = False
            log(f"warning: cannot write the probability cache '{self.folder}' ({e.strerror or e}); "
                "continuing without it.")
            return False


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class _CacheSink:
    """`run_bulk` sink: keeps every image's probabilities and writes them to the cache in chunks."""

    def __init__(self, cache: ProbabilityCache, stats: Mapping[str, tuple[int, int] | None]):
        self.cache, self.stats = cache, stats
        self.rows: dict[str, np.ndarray] = {}
        self._last = time.monotonic()

    def needed_tags(self) -> None:
        return None  # every tag: calibration needs them all

    def write(self, path: str, probs: np.ndarray) -> None:
        self.rows[path] = probs
        self.cache.add(path, self.stats.get(path), probs)
        if self.cache.pending() >= FLUSH_IMAGES or time.monotonic() - self._last >= FLUSH_SECONDS:
            self.cache.flush()
            self._last = time.monotonic()

    def close(self, ok: bool) -> None:
        self.cache.flush()  # also on Ctrl-C or an error: the rows computed so far are good


# ---------------------------------------------------------------------------------------------------
# The whole pass over a dataset


@dataclass
class DatasetResult:
    """What the model said about the dataset's labelled images.

    Attributes:
        labels: model labels (T), model order.
        truth: the ground truth (images that failed to load removed).
        probs: (N, T) float32 probabilities, rows matching `truth.images`.
        failed: files that failed (sidecars and images; each reported on stderr).
    """

    labels: list[str]
    truth: GroundTruth
    probs: np.ndarray
    failed: int

    def curves(self) -> tuple[dict[str, Curve], dict[str, int]]:
        """Validation curves (99 thresholds) of the tags with at least one positive image, model order.

        Returns:
            (tag -> Curve, tag -> number of positive images).
        """
        truth = self.truth.truth
        positives = truth.sum(0)  # (T,)
        cols = np.flatnonzero(positives)
        counts = np.concatenate([counts_from_scores(self.probs[:, c], truth[:, c])
                                 for c in np.array_split(cols, max(1, -(-len(cols) // _COUNT_COLUMNS)))])
        tags = [self.labels[c] for c in cols]
        return curves_from_counts(tags, counts, VALIDATION_THRESHOLDS), dict(zip(tags, positives[cols].tolist()))


def evaluate_dataset(folder: str, model: TaggerSpec, *, recursive: bool = False,
                     implies: Mapping[str, Sequence[str]] | None = None, refresh: bool = False, batch_size: int = 1,
                     workers: int = 0, share_memory: bool = True, progress: bool = True) -> DatasetResult:
    """Read the sidecars, run the model on the labelled images not cached yet, and collect the results.

    Logs what it does to stderr (images skipped and why, unmatched tags, cached/computed counts);
    unreadable sidecars and images are reported in the one-line format and skipped.

    Args:
        folder: the dataset folder.
        model: the model to run.
        recursive: also scan sub-folders.
        implies: tag -> direct implications, to close the true tags under (None = as written).
        refresh: ignore and delete the cached probabilities.
        batch_size, workers, share_memory: as in inference.py (`-b`, `-w`, `--no-shm`).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no image has a sidecar naming a model tag.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset folder '{folder}' does not exist")
    scan_errors: list[str] = []
    images = list(iter_images([folder], recursive, scan_errors))
    raw, no_sidecar, bad_sidecars = read_sidecars(images)

    info = key_info(model)
    cache = ProbabilityCache(cache_folder(folder, model.path, info), folder, info)
    if refresh:
        cache.clear()
    else:
        cache.load()
    tagger = None
    if cache.labels is None:  # a new cache (or --refresh): the labels come from the model itself
        tagger = load_model(model)
        cache.set_labels(tagger.labels)
    labels = cache.labels
    from hydra.models import detect

    truth = ground_truth(raw, TagMatcher(labels, detect(model.path).caption.renames), implies)
    truth.no_sidecar, truth.failed = no_sidecar, bad_sidecars
    _log_truth(folder, len(images), truth, implies is not None)
    if not truth.images:
        raise ValueError(f"no image in '{folder}' has a .txt or .json sidecar naming a model tag"
                         + ("" if recursive else " (sub-folders need --recursive)"))

    stats = {p: _stat(p) for p in truth.images}
    rows = {p: row for p in truth.images if (row := cache.get(p, stats[p])) is not None}
    todo = [p for p in truth.images if p not in rows]
    log(f"Probabilities: {len(rows)} cached, {len(todo)} to compute (cache '{cache.folder}').")
    failed_images = 0
    if todo:
        tagger = tagger or load_model(model)
        assert tagger.labels == labels, "cache folder key collision"  # the key hashes the model files
        sink = _CacheSink(cache, stats)
        summary = run_bulk(tagger, todo, sink, batch_size=batch_size, workers=min(workers, len(todo)),
                           share_memory=share_memory, progress=progress)
        rows.update(sink.rows)
        failed_images = summary.failed
    cache.compact()

    keep = [i for i, p in enumerate(truth.images) if p in rows]
    truth.images = [truth.images[i] for i in keep]
    truth.truth = truth.truth[keep]
    probs = np.stack([rows[p] for p in truth.images]) if keep else np.zeros((0, len(labels)), np.float32)
    return DatasetResult(labels, truth, probs, bad_sidecars + failed_images + len(scan_errors))


def _log_truth(folder: str, n_images: int, gt: GroundTruth, closed: bool) -> None:
    skipped = [(gt.no_sidecar, "without a .txt/.json sidecar"), (gt.empty, "with an empty sidecar"),
               (gt.no_model_tag, "whose sidecar names no model tag"), (gt.failed, "with an unreadable sidecar")]
    parts = [f"{n} {why}" for n, why in skipped if n]
    log(f"Dataset '{folder}': {n_images} image{'s' * (n_images != 1)}, {len(gt.images)} with tags"
        + (f"; skipped {', '.join(parts)}" if parts else "") + ".")
    if gt.unmatched:
        total = sum(gt.unmatched.values())
        examples = ", ".join(repr(t) for t, _ in gt.unmatched.most_common(5))
        log(f"Sidecar tags: {gt.matched} matched a model tag; {total} ({len(gt.unmatched)} distinct) matched "
            f"none, e.g. {examples}.")
    if closed:
        log(f"Implications added {gt.implied} true tag{'s' * (gt.implied != 1)}.")


# ---------------------------------------------------------------------------------------------------
# Combining the dataset's curves with fallback data


@dataclass
class Provenance:
    """Where each tag's counts came from, for the summary lines.

    Attributes:
        sources: tag -> source name, for the tags that have counts (model order).
        names: every source name, in display order (the dataset first).
        n_labels: the number of model tags.
        failed: files that failed during the run (set by the caller).
    """

    sources: dict[str, str]
    names: list[str]
    n_labels: int
    failed: int = 0

    def describe(self, tags: Iterable[str]) -> str:
        """`4 from the dataset, 2 from the default validation data` for these tags."""
        counts = collections.Counter(self.sources[t] for t in tags)
        return ", ".join(f"{counts[name]} from {name}" for name in self.names)

    def data_line(self) -> str:
        missing = self.n_labels - len(self.sources)
        return f"Model tags: {self.describe(self.sources)}, {missing} with no data (omitted)."

    def summary_line(self, calibrated: Iterable[str]) -> str:
        calibrated = [t for t in calibrated if t in self.sources]
        omitted = self.n_labels - len(calibrated)
        return (f"Calibrated {len(calibrated)} tags: {self.describe(calibrated)}; {omitted} of the model's "
                f"{self.n_labels} tags omitted.")


def merge_curves(labels: Sequence[str], data: Mapping[str, Curve], positives: Mapping[str, int],
                 fallbacks: Sequence[tuple[str, Mapping[str, Curve]]] = (), min_positives: int = 1,
                 dataset_name: str = "the dataset") -> tuple[dict[str, Curve], Provenance]:
    """The curve each model tag is calibrated from, and where it comes from.

    A tag with at least `min_positives` positive images uses the dataset's counts; any other tag uses the
    first fallback that has it (e.g. extension counts, then the default validation data), or none (it is
    then omitted from the calibration).

    Args:
        labels: the model's labels; only these are returned.
        data: the dataset's curves (`DatasetResult.curves()`), positives: tag -> positive images.
        fallbacks: (source name, tag -> Curve) in order of preference.
        min_positives: fewer positives than this counts as absent from the dataset.

    Returns:
        (tag -> Curve in model order, Provenance).
    """
    curves, sources = {}, {}
    for tag in labels:
        if tag in data and positives.get(tag, 0) >= min_positives:
            curves[tag], sources[tag] = data[tag], dataset_name
            continue
        for name, fallback in fallbacks:
            if tag in fallback:
                curves[tag], sources[tag] = fallback[tag], name
                break
    return curves, Provenance(sources, [dataset_name, *(name for name, _ in fallbacks)], len(labels))
