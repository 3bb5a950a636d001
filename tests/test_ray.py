"""inference.py --ray (hydra/bulk/distributed.py) against single-process runs, on the tiny fixture model and a few
hundred generated images with some broken files: the same captions and the same probabilities in CSV, JSONL and
Parquet shards, bad files reported the same way, resume after Ctrl-C and after a lost shard, a local Ray instance,
the install hint without Ray, and a tiny Hydra 3.5 model's captions (libvips decoding in Ray tasks, the model's
embedded calibration). Shard files, the resume index and the actor sizing are also tested without Ray.

"The same" allows float rounding: which images share a batch (padding) moves the last bits, in a Ray actor as
between two single-process runs with different batch sizes. So the
runs are fp32 (bf16 rounding on the random tiny model is coarser), probabilities agree to the printed precision
(1e-4), and captions agree except for tags within 2e-4 of the threshold.

One Ray instance (2 CPUs, small object store) serves the module and is shut down at its end; most runs call
`inference.main` in this process, connected to it. The Ctrl-C run and the caption resume are real
`inference.py --ray` processes, each on a local instance of its own. About three minutes on 2 CPU cores.

    venv/bin/python -m pytest tests/test_ray.py -q
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, FullAtClose, noise_image

from hydra.bulk import distributed
from hydra.bulk.run import CsvSink

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray's notes about its own options
SCRIPT = str(ROOT / "inference.py")
N_IMAGES = 200
BROKEN = {"broken.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "empty.png": b"", "text.png": b"hello"}


def need_ray():
    """Ray is a test requirement (requirements-dev.txt): in CI a missing Ray fails instead of skipping."""
    if os.environ.get("CI"):
        import ray
        return ray
    return pytest.importorskip("ray")


def cli(*args, check_rc=None):
    # One torch thread, as in each CPU actor: two threads are several times slower on a busy 2-core machine.
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def popen_as_foreground_job(cmd, **kw) -> subprocess.Popen:
    """Popen with SIGINT at its default, as in a terminal's foreground job: a suite started in the background
    inherits SIGINT ignored, and so would the child, losing the test's Ctrl-C (see test_reliability.py)."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # becomes SIG_DFL in the exec'd child
    try:
        return subprocess.Popen(cmd, **kw)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def failures(stderr):
    return sorted(line.strip() for line in stderr.splitlines() if line.strip().startswith("'"))


def summary_line(stderr):
    return [line for line in stderr.splitlines() if line.startswith("Tagged ")][-1]


def read_csv_rows(paths):
    header, rows = None, {}
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            table = list(csv.reader(f))
        assert header in (None, table[0])
        header = table[0]
        for row in table[1:]:
            assert row[0] not in rows, f"{row[0]} is in two shards"
            rows[row[0]] = row[1:]
    return header, rows


def assert_same_probs(got, rows):
    """{path: values} equal to the reference CSV's rows to the printed precision (one unit of its last digit)."""
    assert got.keys() == rows.keys()
    expected = np.array([rows[k] for k in sorted(rows)], dtype=np.float64)  # (N, T)
    values = np.array([got[k] for k in sorted(rows)], dtype=np.float64)
    assert np.abs(values - expected).max() <= 1.01e-4


def shards(folder, ext="csv"):
    return sorted(folder.glob(f"part-*.{ext}"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """N_IMAGES small images of many sizes (so batches mix patch counts), one sub-folder, 3 broken files."""
    folder = tmp_path_factory.mktemp("ray") / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        w, h = (int(v) for v in rng.integers(32, 97, 2))
        noise_image(w, h, i).save(folder / ("sub" if i % 4 == 0 else "") / f"img{i:03d}.png")
    for name, data in BROKEN.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def inputs(images):
    """The command-line inputs: the folder (recursive) plus a file that does not exist."""
    return ["-r", images, images / "missing.png"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for the module: in-process runs use it directly, CLI runs join it by address."""
    ray = need_ray()
    from ray.job_config import JobConfig

    # in-process runs pickle the project's classes by reference: the workers must find the project
    ray.init(num_cpus=2, object_store_memory=300 << 20, include_dashboard=False, logging_level="ERROR",
             job_config=JobConfig(code_search_path=[str(ROOT)]))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model, inputs, tmp_path_factory):
    """A single-process CSV run: (header, {path: values}, stderr)."""
    out = tmp_path_factory.mktemp("ref") / "ref.csv"
    run = cli("-M", tiny_model, "--dtype", "fp32", "-b", "8", "-o", out, *inputs, check_rc=1)
    header, rows = read_csv_rows([out])
    assert len(rows) == N_IMAGES
    return header, rows, run.stderr


def caption_bounds(model, threshold, header, rows, tol=2e-4):
    """{caption path: (tags that must be there, tags that may be there)}: the captions of the reference
    probabilities with every threshold raised / lowered by `tol`."""
    import dataclasses

    import inference
    from hydra import cli
    from hydra.bulk.run import caption_path
    from hydra.tags.rules import caption_tag

    _, settings = cli.load_run(inference.build_parser().parse_args(["-M", model, "-t", threshold]))
    rules = settings.rules()
    assert rules.labels == header[1:]
    strict = dataclasses.replace(rules, thresholds=rules.thresholds + tol)
    loose = dataclasses.replace(rules, thresholds=rules.thresholds - tol)
    bounds = {}
    for path, values in rows.items():
        p = np.array(values, dtype=np.float64)
        bounds[Path(caption_path(path))] = ({caption_tag(t) for t in strict.classify(p)},
                                            {caption_tag(t) for t in loose.classify(p)})
    return bounds


def assert_captions_within(bounds, folder):
    captions = {p: p.read_text(encoding="utf-8") for p in folder.rglob("*.txt")}
    assert captions.keys() == bounds.keys()
    for path, text in captions.items():
        tags = set(text.split(", ")) if text else set()
        must, may = bounds[path]
        assert must <= tags <= may, (path, must - tags, tags - may)
        assert len(must) > 3


def ray_cli(model, *args, check_rc=1):
    """`inference.py --ray ARGS` in a new process: the first of `args` is the address, or an option for a
    local instance."""
    return cli("-M", model, "--dtype", "fp32", "--ray", *args, check_rc=check_rc)


def ray_main(capfd, model, address, *args, rc=1):
    """`inference.main` in this process, on the module's Ray instance: (stdout, stderr)."""
    import inference

    argv = ["-M", model, "--dtype", "fp32", "--ray", address, *args]
    parsed = inference.build_parser().parse_args(list(map(str, argv)))
    capfd.readouterr()
    code = inference.main(parsed)
    out, err = capfd.readouterr()
    assert code == rc, err[-3000:]
    return out, err


@pytest.mark.slow
def test_captions_match_single_process(tiny_model, images, inputs, reference, cluster, capfd):
    header, rows, _ = reference
    bounds = caption_bounds(tiny_model, "-0.4", header, rows)
    single = cli("-M", tiny_model, "--dtype", "fp32", "-b", "8", "-t", "-0.4", *inputs, check_rc=1)
    assert_captions_within(bounds, images)  # (the bounds hold for a single-process run, too)
    captions = sorted(images.rglob("*.txt"))
    for p in captions:
        p.unlink()
    _, err = ray_main(capfd, tiny_model, cluster, "-t", "-0.4", *inputs)
    assert_captions_within(bounds, images)
    assert failures(err) == failures(single.stderr) and len(failures(err)) == len(BROKEN) + 1
    assert summary_line(err) == summary_line(single.stderr) == f"Tagged {N_IMAGES} images, 4 failed."

    # a rerun of a caption job resumes (with --ray, --existing defaults to skip); this time on a local instance
    kept = {p: p.read_bytes() for p in captions[7:]}
    for p in captions[:7]:
        p.unlink()
    run = ray_cli(tiny_model, "--ray-cpus", "2", "--ray-object-store", "0.2", "-t", "-0.4", *inputs)
    assert summary_line(run.stderr) == f"Tagged 7 images, {N_IMAGES - 7} skipped, 4 failed."
    assert_captions_within(bounds, images)
    assert all(p.read_bytes() == data for p, data in kept.items())
    for p in captions:
        p.unlink()


@pytest.mark.slow
def test_csv_shards_match_single_process(tiny_model, inputs, reference, cluster, tmp_path, capfd):
    header, rows, single_stderr = reference
    out = tmp_path / "shards"
    _, err = ray_main(capfd, tiny_model, cluster, "--shard-rows", "64", "-o", out, *inputs)
    assert failures(err) == failures(single_stderr)
    assert summary_line(err) == f"Tagged {N_IMAGES} images, 4 failed."
    files = shards(out)
    assert len(files) >= N_IMAGES // 64 and all(len(read_csv_rows([f])[1]) <= 64 for f in files)
    got_header, got = read_csv_rows(files)
    assert got_header == header and all(len(v.split(".")[1]) == 4 for v in next(iter(got.values())))
    assert_same_probs(got, rows)
    assert json.loads((out / "_run.json").read_text())["labels"] == header[1:]
    assert not list(out.glob(".*"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_shards_match_single_process(tiny_model, inputs, reference, cluster, tmp_path, capfd,
                                                       fmt):
    header, rows, single_stderr = reference
    out = tmp_path / fmt
    _, err = ray_main(capfd, tiny_model, cluster, "--shard-format", fmt, "-o", out, *inputs)
    assert failures(err) == failures(single_stderr)
    assert_same_probs(read_jsonl(out) if fmt == "jsonl" else read_parquet(out), rows)


def read_jsonl(folder):
    labels = json.loads((folder / "_run.json").read_text())["labels"]
    out = {}
    for shard in shards(folder, "jsonl"):
        for line in shard.read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            assert len(item["probs"]) == len(labels)
            out[item["filename"]] = item["probs"]
    return out


def read_parquet(folder):
    import pyarrow.parquet as pq

    table = pq.read_table(folder)  # the dataset reader skips _index/, _run.json and hidden temporaries
    assert table.column_names[1:] == json.loads((folder / "_run.json").read_text())["labels"]
    assert table.schema.field(1).type == "float"
    probs = np.stack([table.column(i).to_numpy() for i in range(1, table.num_columns)], axis=1)
    return dict(zip(table.column("filename").to_pylist(), probs))


@pytest.mark.slow
def test_resume_after_ctrl_c_and_after_a_lost_shard(tiny_model, inputs, reference, cluster, tmp_path, capfd):
    header, rows, _ = reference
    out = tmp_path / "resume"
    # The run to stop is a process of its own with its own local instance (Ray Data jobs from two drivers on one
    # instance trip over Ray Data's shared actor-location tracker in Ray 2.60).
    cmd = [sys.executable, SCRIPT, "-M", tiny_model, "--dtype", "fp32", "--ray", "--ray-cpus", "2",
           "--ray-object-store", "0.2", "--ray-batch", "4", "--shard-rows", "8", "-o", out, *inputs]
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        proc = popen_as_foreground_job(list(map(str, cmd)), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(shards(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # The last ~20 of ~25 shards take about 2 s here: if this process saw more than half of them written
        # (it was starved of CPU), the run may end before the signal lands; then run it again.
        late = len(shards(out)) > N_IMAGES // 8 // 2
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode == 130 or not late:
            break
    assert proc.returncode == 130, stderr[-3000:]  # stopped midway, by Ctrl-C
    # (a shard being written when the job stopped may be left as a hidden temporary: the rerun removes it)
    lost = shards(out)[0]  # and one finished shard goes missing
    lost.unlink()
    done = len(read_csv_rows(shards(out))[1])
    assert 0 < done < N_IMAGES

    _, err = ray_main(capfd, tiny_model, cluster, "--shard-rows", "8", "-o", out, *inputs)
    assert summary_line(err) == f"Tagged {N_IMAGES - done} images, {done} skipped, 4 failed."
    got_header, got = read_csv_rows(shards(out))  # (no path in two shards)
    assert got_header == header
    assert_same_probs(got, rows)
    assert not list(out.glob(".*")) and not list((out / "_index").glob(".*"))
    assert len(list((out / "_index").iterdir())) == len(shards(out))


@pytest.mark.slow
def test_csv_to_stdout(tiny_model, images, reference, cluster, capfd):
    header, rows, _ = reference
    picked = sorted(images.glob("img00*.png"))
    out, err = ray_main(capfd, tiny_model, cluster, "-o", "-", *picked, rc=0)
    got = {r[0]: r[1:] for r in csv.reader(io.StringIO(out, newline=""))}
    assert_same_probs(got, {str(p): rows[str(p)] for p in picked})
    assert summary_line(err) == f"Tagged {len(picked)} images, 0 failed."


@pytest.fixture(scope="module")
def hydra35_model(tmp_path_factory):
    """A tiny random Hydra 3.5 file with its real image settings (white background, mks2013-linear resize)."""
    from hydra.testing.hydra35 import write_hydra35_model

    labels = [f"tag_{i:02d}" for i in range(24)]
    implies = [("tag_00",) if i % 5 == 1 else () for i in range(24)]  # a few implications for `inherit`
    return write_hydra35_model(tmp_path_factory.mktemp("h35") / "hydra-3.5-test.safetensors", labels,
                               implies=implies, seed=3, background="white", resize="mks2013-linear")


@pytest.mark.slow
def test_hydra35_captions_equal_single_process(hydra35_model, cluster, tmp_path, capfd):
    """Each image alone on one thread in both runs (`-b 1` and `--ray-batch 1`, OMP_NUM_THREADS=1 as in an
    actor), so the probabilities are the same bits and the captions must be equal, not just close."""
    folder = tmp_path / "h35"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(16):
        w, h = (int(v) for v in rng.integers(32, 161, 2))
        noise_image(w, h, 100 + i, mode="RGBA" if i % 5 == 0 else "RGB").save(
            folder / ("sub" if i % 4 == 0 else "") / f"h{i:02d}.png")
    single = cli("-M", hydra35_model, "--dtype", "fp32", "-b", "1", "-r", folder, check_rc=0)
    assert "Calibrating with f1.0@0.1" in single.stderr  # Hydra 3.5's default: its embedded calibration
    expected = {p: p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.txt"))}
    assert len(expected) == 16 and all(expected.values()) and len(set(expected.values())) > 1
    for p in expected:
        p.unlink()
    _, err = ray_main(capfd, hydra35_model, cluster, "--ray-batch", "1", "-r", folder, rc=0)
    assert {p: p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.txt"))} == expected
    assert summary_line(err) == summary_line(single.stderr) == "Tagged 16 images, 0 failed."


def test_without_ray_says_how_to_install(small_model, tmp_path):
    path, _ = small_model
    noise_image(40, 40).save(tmp_path / "a.png")
    code = ("import runpy, sys; sys.modules['ray'] = None; "  # `import ray` now raises ImportError
            f"sys.argv = [{SCRIPT!r}, '-M', {path!r}, '-m', '', {str(tmp_path)!r}, '--ray']; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1] == "Ray is not installed: pip install -r requirements-ray.txt"
    assert not (tmp_path / "a.txt").exists()


def test_a_path_after_ray_is_not_taken_for_an_address(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, "--ray", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "is not a Ray address" in run.stderr
    for address in ["local", "auto", "10.0.0.5:6379", "head-node:6379", "ray://head:10001", "[::1]:6379"]:
        assert distributed._address(address) == address


def test_an_address_where_nothing_listens_fails_at_once():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        distributed._probe(f"127.0.0.1:{port}")


def test_help_has_the_ray_group():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120).stdout
    for flag in ["distributed (Ray)", "--ray [ADDRESS]", "--ray-actors", "--ray-gpus-per-actor", "--ray-batch",
                 "--ray-cpus", "--ray-object-store", "--shard-format", "--shard-rows"]:
        assert flag in out, flag


# ---------------------------------------------------------------------------------------------------------
# Without Ray: shard files and the resume index


@pytest.mark.parametrize("fmt", distributed.SHARD_FORMATS)
def test_shard_round_trip_and_index(tmp_path, fmt):
    labels = ["a", "b_(c)", "d"]
    assert distributed.open_folder(tmp_path, fmt, labels) == set()
    rows = [("z.png", "/abs/z.png", np.array([0.5, 0.25, 1.0], np.float32)),
            ("y, x.png", "/abs/y, x.png", np.array([0.12345, 0.0, 0.99995], np.float32))]
    name = distributed.write_shard(str(tmp_path), fmt, labels, rows)
    got = {"csv": lambda: read_csv_rows(shards(tmp_path))[1], "jsonl": lambda: read_jsonl(tmp_path),
           "parquet": lambda: read_parquet(tmp_path)}[fmt]()
    assert list(got) == ["y, x.png", "z.png"]  # sorted by path inside a shard
    if fmt == "csv":
        assert got["y, x.png"] == [f"{v:.4f}" for v in rows[1][2].tolist()]
    elif fmt == "jsonl":
        assert got["z.png"] == [0.5, 0.25, 1.0]
    else:
        assert np.array_equal(got["y, x.png"], rows[1][2])
    assert distributed.open_folder(tmp_path, fmt, labels) == {"/abs/z.png", "/abs/y, x.png"}
    assert (tmp_path / "_index" / f"{name}.json").exists()


def test_csv_shard_is_a_csv_sink_file(tmp_path):
    labels, probs = ["t1", "t2"], np.array([0.1, 0.98765], np.float32)
    distributed.open_folder(tmp_path, "csv", labels)
    distributed.write_shard(str(tmp_path), "csv", labels, [("p.png", "/p.png", probs)])
    sink = CsvSink(str(tmp_path / "single.csv"), labels)
    sink.write("p.png", probs)
    sink.close(True)
    assert shards(tmp_path)[0].read_bytes() == (tmp_path / "single.csv").read_bytes()


def test_resume_index_ignores_uncommitted_shards_and_cleans_temporaries(tmp_path):
    labels = ["a"]
    distributed.open_folder(tmp_path, "csv", labels)
    distributed.write_shard(str(tmp_path), "csv", labels, [("k.png", "/k.png", np.ones(1, np.float32))])
    # a run killed after writing an index but before its shard's rename, and in the middle of writing
    (tmp_path / "_index" / "part-0123.csv.json").write_text('["/lost.png"]')
    (tmp_path / ".part-0456.csv.abc.tmp").write_text("half a shard")
    assert distributed.open_folder(tmp_path, "csv", labels) == {"/k.png"}
    assert not (tmp_path / "_index" / "part-0123.csv.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_folder_of_another_run_is_refused(tmp_path):
    distributed.open_folder(tmp_path, "csv", ["a", "b"])
    with pytest.raises(ValueError, match="another format"):
        distributed.open_folder(tmp_path, "jsonl", ["a", "b"])
    with pytest.raises(ValueError, match="another tag list"):
        distributed.open_folder(tmp_path, "csv", ["a", "c"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        distributed.open_folder(tmp_path / "file", "csv", ["a"])


@pytest.mark.parametrize("resources, flags, expected", [
    ({"CPU": 16, "GPU": 4}, {}, (4, {"num_gpus": 1.0, "num_cpus": 1.0}, None)),
    ({"CPU": 16, "GPU": 4}, {"ray_gpus_per_actor": 0.5}, (8, {"num_gpus": 0.5, "num_cpus": 1.0}, None)),
    ({"CPU": 16, "GPU": 4}, {"device": "cpu", "ray_actors": 3}, (3, {"num_cpus": 1.0}, 1)),
    ({"CPU": 2}, {}, (1, {"num_cpus": 1.0}, 1)),
    ({"CPU": 2}, {"ray_actors": 2}, (2, {"num_cpus": 0.5}, 1)),  # decode and write tasks keep one CPU
    ({"CPU": 1}, {}, (1, {"num_cpus": 0.5}, 1)),
])
def test_actor_sizing(resources, flags, expected):
    args = argparse.Namespace(**{"device": None, "ray_actors": None, "ray_gpus_per_actor": 1.0, **flags})
    assert distributed._actor_options(args, resources) == expected


def test_cuda_without_gpus_is_refused():
    args = argparse.Namespace(device="cuda", ray_actors=None, ray_gpus_per_actor=1.0)
    with pytest.raises(ValueError, match="no GPUs"):
        distributed._actor_options(args, {"CPU": 8})


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_shard_whose_commit_fails_leaves_nothing_and_stops_the_run(tmp_path, monkeypatch, fmt):
    from hydra import common

    labels = ["a", "b"]
    distributed.open_folder(tmp_path, fmt, labels)
    fdopen = os.fdopen

    def flaky(fd, mode, **kw):
        f = fdopen(fd, mode, **kw)
        return FullAtClose(f) if "part-" in os.readlink(f"/proc/self/fd/{fd}") and "_index" not in \
            os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(common.os, "fdopen", flaky)
    batch = {"path": np.array([b"x.png", b"y.png"], object), "file": np.array([b"/x.png", b"/y.png"], object),
             "error": np.array(["", ""], object), "probs": np.full((2, 2), 0.5, np.float32)}
    out = distributed.write_shards(batch, str(tmp_path), fmt, labels)
    assert out["stop"].all() and all("No space left on device" in e for e in out["error"])
    assert sorted(os.listdir(tmp_path)) == ["_index", "_run.json"] and os.listdir(tmp_path / "_index") == []
