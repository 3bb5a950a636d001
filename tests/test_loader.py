"""The background loader: results and per-file errors with 0 or several workers, shared memory on and off,
and a worker that crashes hard or hangs (the file is reported, the worker replaced, the run goes on).

    venv/bin/python -m pytest tests/test_loader.py -q
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import pytest

from hydra.bulk import loader
from hydra.bulk.loader import ImageLoader, LoadError


def make_sample(item: str) -> dict:
    """A picklable stand-in for image preprocessing with scripted failures."""
    if item.startswith("crash"):
        ctypes.string_at(0)  # segfault, as a broken C decoder would
    if item.startswith("exit"):
        os._exit(3)
    if item.startswith("hang"):
        time.sleep(60)
    if item.startswith("bad"):
        raise ValueError("cannot decode this one")
    n = int(item.split("-")[1])
    return {"patches": np.full((n, 4), n, np.uint8), "patch_coord": np.zeros((n, 2), np.int16)}


def run(items, **kw):
    with ImageLoader(make_sample, **kw) as loader:
        return dict(loader.imap(items))


@pytest.mark.parametrize("workers,shm", [(0, True), (2, True), (2, False)])
def test_results_and_errors(workers, shm):
    items = [f"ok-{i}" for i in range(1, 8)] + ["bad-1"]
    out = run(items, workers=workers, share_memory=shm)
    assert set(out) == set(items)
    for i in range(1, 8):
        assert out[f"ok-{i}"]["patches"].shape == (i, 4) and out[f"ok-{i}"]["patches"][0, 0] == i
    assert isinstance(out["bad-1"], LoadError) and "cannot decode this one" in str(out["bad-1"])


@pytest.mark.parametrize("culprit,reason", [("crash-x", "crashed while decoding it (signal 11)"),
                                            ("exit-x", "died while decoding it (exit code 3)")])
def test_dead_worker_is_replaced_and_its_file_reported(culprit, reason):
    items = ["ok-1", "ok-2", culprit, "ok-3", "ok-4", "ok-5", "ok-6"]
    t0 = time.monotonic()
    out = run(items, workers=2, prefetch=3)
    assert set(out) == set(items)
    assert isinstance(out[culprit], LoadError) and reason in str(out[culprit])
    assert all(not isinstance(out[f"ok-{i}"], LoadError) for i in range(1, 7))
    assert time.monotonic() - t0 < 30


def test_hanging_file_times_out():
    out = run(["ok-1", "hang-x", "ok-2"], workers=1, timeout=2.0)
    assert "timed out" in str(out["hang-x"]) and out["ok-2"]["patches"].shape == (2, 4)


def test_no_shared_memory_left_behind():
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    run([f"ok-{i}" for i in range(1, 6)], workers=2, share_memory=True)
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {n for n in after - before if n.startswith(("psm_", loader.SHM_PREFIX))}


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory is not listed here")
def test_blocks_of_a_killed_run_are_removed_at_the_next_start():
    import signal
    import subprocess
    import sys

    script = ("import sys, time; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
              "from test_loader import make_sample\nfrom hydra.bulk.loader import ImageLoader\n"
              "it = ImageLoader(make_sample, workers=1, prefetch=2).imap(['ok-5'] * 4)\n"
              "next(it); print('ready', flush=True); time.sleep(60)\n")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", script, here, os.path.dirname(here)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1)  # the worker parks the next result in a block
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of everything: parent, worker and resource tracker
        proc.wait()
    time.sleep(0.5)
    mine = f"_{proc.pid}_"
    leaked = [n for n in os.listdir("/dev/shm") if n.startswith(loader.SHM_PREFIX) and mine in n]
    assert leaked  # the scenario of the issue: blocks in flight outlive a killed run
    run(["ok-1"], workers=1, share_memory=True)  # the next run's loader removes them
    assert not [n for n in os.listdir("/dev/shm") if n in leaked]


def test_a_worker_that_dies_between_two_items_costs_one_file_at_most():
    """Sending to a worker that has just exited (its pipe is broken) replaces it; nothing raises or hangs."""
    items = [f"ok-{i}" for i in range(1, 7)]
    with ImageLoader(make_sample, workers=1, prefetch=2) as loader:
        loader._slots[0].proc.kill()  # dies before the first item reaches it
        loader._slots[0].proc.join(timeout=5)
        t0 = time.monotonic()
        out = dict(loader.imap(items))
    assert set(out) == set(items) and time.monotonic() - t0 < 30
    failed = [k for k, v in out.items() if isinstance(v, LoadError)]
    assert len(failed) <= 1 and all(out[k]["patches"].shape == (int(k[3:]), 4) for k in items if k not in failed)
