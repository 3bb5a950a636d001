"""The resumable cache of a model's probabilities on a dataset's images (`calibrate.py --from-dataset`).

`DIR/.hydra-calibration/<model>-<key>/`, keyed by the model files (path, size, mtime) and everything else
that changes the numbers (dtype, sequence length / DINOv3 preprocessing), holding append-only chunk files of
(image path, size, mtime, probabilities). See `ProbabilityCache`. Editing the sidecars never invalidates it;
images that failed are not cached and are tried again on the next run.

Shapes: T = model tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hydra.common import atomic_write, log

if TYPE_CHECKING:
    from hydra.tagger import TaggerSpec

CACHE_DIR = ".hydra-calibration"  # inside the dataset folder; the dot keeps folder scans out of it
CACHE_VERSION = 1
# A chunk of new probabilities is written at least this often (and when the run ends or is interrupted),
# so a crash loses at most this much work.
FLUSH_SECONDS = 30.0
FLUSH_IMAGES = 1024


# ---------------------------------------------------------------------------------------------------
# The cache key


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
    the same image. A damaged or foreign chunk (any error reading it) is ignored, with one note per run;
    the images only it held are tagged again, and the compaction at the end of the run removes it. An entry
    is used only while the image's size and mtime are unchanged. `compact()` merges the chunks into one at the
    end of a run. If the folder cannot be written (read-only dataset), the run goes on without caching.

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
        except Exception:  # damaged in any way (bad JSON, too deep, wrong types): the cache starts afresh
            self.labels = None
        if self.labels is None:
            return  # chunks cannot be checked without the labels; they will be replaced
        damaged = []
        for path in self._chunks():
            try:
                self._read_chunk(path)
            except Exception as e:  # BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError, ...
                damaged.append((path, e))
        if damaged:  # one note per run; the images are tagged again and compact() then drops the damaged files
            path, e = damaged[0]
            more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
            log(f"Note: ignoring damaged cache file '{path}'{more} ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:120]}); images only they held are tagged again.")

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
                if file_stat(os.path.join(self.root, rel)) == (size, mtime)]
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


def file_stat(path: str) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of a file, what a cache entry is checked against; None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class CacheSink:
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
