"""Background image decoding for bulk runs: worker processes, results in completion order, errors per file.

Decoding and resizing a large image takes longer than the model's step on a GPU, so it runs in a pool of
`spawn` processes (one BLAS thread each, no CUDA). Each worker has its own pipe, so the parent always knows
which file a worker holds: if a worker dies (even a hard crash inside a C decoder) or hangs past the
timeout, exactly that file is reported as failed, the worker is replaced, and the files queued behind it
go to the replacement. The run never hangs on a lost worker.

With `workers=0` everything runs in the calling process (handy for a few files, and for debugging).

Samples are dicts of numpy arrays. With shared memory on (the default), a worker copies each array into a
`multiprocessing.shared_memory` block and sends only its name; the parent copies it out and frees the
block. Blocks of a killed run are removed (`sweep_stale_blocks`). Workers never import torch, so they start in
a fraction of a second.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
from PIL.Image import DecompressionBombError, UnidentifiedImageError

from hydra.images.decode import ImageTooLarge, UnreadableImage


class LoadError(Exception):
    """A file could not be turned into a sample; str(e) is the one-line reason shown to the user."""


def describe_error(e: BaseException) -> str:
    """A short, single-line reason for a failed image (no traceback)."""
    text = " ".join(str(e).split())
    if isinstance(e, LoadError):
        return text
    if isinstance(e, FileNotFoundError):
        return "file not found (or a dangling link)"
    if isinstance(e, ImageTooLarge | UnreadableImage):  # already one line for the user
        return text
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, UnidentifiedImageError):
        return "not an image Pillow can read (unknown or damaged format)"
    if isinstance(e, OSError) and "truncated" in text:
        return "the image file is truncated"
    if isinstance(e, DecompressionBombError):
        return f"refused as a possible decompression bomb ({text})"
    return f"{text} ({type(e).__name__})" if text else type(e).__name__


# Shared memory blocks are named `hydra<pid namespace>_<owner pid>_<random>`: the owner is the process that reads
# and frees them. Blocks in flight stay registered with multiprocessing's resource tracker (which the spawned
# workers share with their parent), so it removes them if the whole run dies at once; and should the tracker
# die too (`kill -9` of the process group, the OOM killer), the next loader start removes the blocks of owners
# that no longer run (`sweep_stale_blocks`).
SHM_PREFIX = "hydra"
SHM_FOLDER = "/dev/shm"


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino  # pids are only comparable within one namespace
    except OSError:
        return 0


def _block_name(owner: int) -> str:
    return f"{SHM_PREFIX}{_pid_namespace()}_{owner}_{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def sweep_stale_blocks(folder: str = SHM_FOLDER) -> list[str]:
    """Remove our shared memory blocks whose owner no longer runs (a run killed with `kill -9`); returns
    their names. Only names of this module's pattern, from this pid namespace, are ever touched."""
    pattern = re.compile(rf"{SHM_PREFIX}{_pid_namespace()}_(\d+)_[0-9a-f]+")
    try:
        names = os.listdir(folder)
    except OSError:  # no /dev/shm (macOS, Windows): nothing to list
        return []
    removed = []
    for name in names:
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                removed.append(name)
    return removed


def _worker(conn: Connection, fn: Callable[[Any], dict], share_memory: bool, owner: int = 0) -> None:
    # Ctrl-C reaches the whole process group; the parent decides how to stop, workers just get told.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            item = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if item is None:
            return
        try:
            out: Any = fn(item)
            if share_memory:
                out = {k: _to_shm(v, owner) if isinstance(v, np.ndarray) else v for k, v in out.items()}
        except Exception as e:  # reported per file; the worker lives on
            out = LoadError(describe_error(e))
        try:
            conn.send((item, out))
        except (BrokenPipeError, KeyboardInterrupt):
            return


class _Shared:
    """A numpy array parked in a shared memory block (what travels through the pipe is just its name)."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str):
        self.name, self.shape, self.dtype = name, shape, dtype

    def take(self) -> np.ndarray:
        """Copy the array out and free the block (the receiving side calls this exactly once)."""
        shm = shared_memory.SharedMemory(name=self.name)
        try:
            return np.ndarray(self.shape, self.dtype, buffer=shm.buf).copy()
        finally:
            shm.close()
            shm.unlink()

    def free(self) -> None:
        try:
            shm = shared_memory.SharedMemory(name=self.name)
        except FileNotFoundError:
            return
        shm.close()
        shm.unlink()


def _to_shm(arr: np.ndarray, owner: int) -> _Shared:
    while True:
        try:
            shm = shared_memory.SharedMemory(_block_name(owner), create=True, size=max(arr.nbytes, 1))
            break
        except FileExistsError:  # 32 random bits taken: draw again
            continue
    # Still registered with the resource tracker (shared with the parent, which unregisters it when it frees the
    # block): if the run is killed, the tracker removes it.
    np.ndarray(arr.shape, arr.dtype, buffer=shm.buf)[...] = arr
    shm.close()
    return _Shared(shm.name, arr.shape, arr.dtype.str)


def _from_shm(out: Any) -> Any:
    if isinstance(out, dict):
        return {k: v.take() if isinstance(v, _Shared) else v for k, v in out.items()}
    return out


class _Slot:
    """One worker process and the items it holds (the first is in progress)."""

    def __init__(self, ctx: Any, fn: Callable, share_memory: bool):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, fn, share_memory, os.getpid()), daemon=True)
        saved = {k: os.environ.get(k) for k in _WORKER_ENV}
        os.environ.update(_WORKER_ENV)  # inherited at spawn: no thread oversubscription, no CUDA
        # A spawned child re-runs the parent's main script (to find functions defined there) unless it has no
        # __file__; ours are all importable from hydra, and re-running inference.py would import torch and
        # timm in every worker (seconds each). Hide it while the child starts.
        main = sys.modules["__main__"]
        main_file = main.__dict__.pop("__file__", None) if getattr(main, "__spec__", None) is None else None
        try:
            self.proc.start()
        finally:
            if main_file is not None:
                main.__file__ = main_file
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self.items: collections.deque = collections.deque()
        self.since = time.monotonic()  # when the head item started

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=2)
        # Results nobody will read (the run was interrupted): free their shared memory blocks.
        try:
            while self.conn.poll():
                _, out = self.conn.recv()
                for v in out.values() if isinstance(out, dict) else ():
                    if isinstance(v, _Shared):
                        v.free()
        except (EOFError, OSError):
            pass
        self.conn.close()


# One thread per worker (the workers are the parallelism), no CUDA; libvips reads VIPS_CONCURRENCY at import.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "VIPS_CONCURRENCY": "1", "CUDA_VISIBLE_DEVICES": ""}


class ImageLoader:
    """Run `fn(item)` for every item in worker processes.

    Args:
        fn: picklable callable item -> dict of tensors (e.g. `hydra.images.naflex.JTP3Preprocess`).
        workers: number of processes; 0 runs `fn` in the calling process.
        share_memory: pass tensors through shared memory (`--no-shm` turns this off: plain pickling).
        prefetch: items queued per worker.
        timeout: seconds one item may take before its worker is killed and the item reported.
    """

    def __init__(self, fn: Callable[[Any], dict], workers: int = 0, share_memory: bool = True,
                 prefetch: int = 2, timeout: float = 300.0):
        self.fn, self.workers, self.share_memory = fn, workers, share_memory
        self.prefetch, self.timeout = prefetch, timeout
        self._ctx = mp.get_context("spawn")
        if workers and share_memory:
            sweep_stale_blocks()  # what a killed run left behind
        self._slots: list[_Slot] = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> _Slot:
        return _Slot(self._ctx, self.fn, self.share_memory)

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for slot in self._slots:
            slot.stop()
        self._slots = []

    def imap(self, items: Iterable[Any]) -> Iterator[tuple[Any, dict | LoadError]]:
        """Yield (item, sample) or (item, LoadError) for every item, in completion order."""
        if not self._slots:
            for item in items:
                try:
                    yield item, self.fn(item)
                except Exception as e:
                    yield item, LoadError(describe_error(e))
            return
        todo = iter(items)
        requeued: collections.deque = collections.deque()
        exhausted = False
        while True:
            # Keep every worker's queue topped up.
            for slot in self._slots:
                while len(slot.items) < self.prefetch:
                    if requeued:
                        item = requeued.popleft()
                    elif not exhausted:
                        item = next(todo, _END)
                        if item is _END:
                            exhausted = True
                            break
                    else:
                        break
                    if not slot.items:
                        slot.since = time.monotonic()
                    slot.items.append(item)
                    try:
                        slot.conn.send(item)
                    except OSError:  # the worker has just died: below, it is replaced and its items requeued
                        break
            busy = [s for s in self._slots if s.items]
            if not busy:
                return
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=1.0)
            for i, slot in enumerate(self._slots):
                if not slot.items:
                    continue
                if slot.conn in ready or slot.conn.poll():
                    try:
                        item, out = slot.conn.recv()
                    except (EOFError, OSError):
                        slot.proc.join(timeout=1)
                        yield from self._replace(i, _crash_reason(slot), requeued)
                        continue
                    slot.items.popleft()
                    slot.since = time.monotonic()
                    yield item, _from_shm(out)
                elif not slot.proc.is_alive():
                    yield from self._replace(i, _crash_reason(slot), requeued)
                elif time.monotonic() - slot.since > self.timeout:
                    slot.proc.kill()
                    yield from self._replace(i, f"timed out after {self.timeout:.0f} s", requeued)

    def _replace(self, i: int, reason: str, requeued: collections.deque) -> Iterator[tuple[Any, LoadError]]:
        """Report the worker's current item, requeue the rest, and start a fresh worker in its place."""
        slot = self._slots[i]
        culprit = slot.items.popleft()
        requeued.extend(slot.items)
        slot.items.clear()
        slot.stop()
        self._slots[i] = self._spawn()
        yield culprit, LoadError(reason)


def _crash_reason(slot: _Slot) -> str:
    code = slot.proc.exitcode
    if code is not None and code < 0:
        return f"the loader worker crashed while decoding it (signal {-code})"
    return f"the loader worker died while decoding it (exit code {code})"


_END = object()
