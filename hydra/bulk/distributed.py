"""Bulk tagging on Ray Data: `inference.py --ray [ADDRESS]`, the same run spread over many GPUs and machines.

The pipeline (Ray Data streams blocks between the stages with back-pressure, so memory stays bounded for any
number of images):

    driver: list inputs, skip finished ones
      -> decode   CPU tasks: `Tagger.preprocess` through `hydra.bulk.loader` (crash- and hang-safe); errors are rows
      -> tag      actor pool: one `hydra.Tagger` per GPU (or CPU actors), batches padded by
                  `hydra.images.naflex.collate`
      -> write    CPU tasks: `.txt` captions with `hydra.bulk.run.CaptionSink`, or one shard file per task
      -> driver:  progress bar, one stderr line per failed file, the summary line of a single-process run

Everything that decides an output is the engine's own code, so outputs equal a single-process run's: captions
are written by `CaptionSink`, CSV shards are `CsvSink` files (same header, `%.4f`), the actors load the driver's tagger
from its picklable spec (`Tagger.spec`). What differs is which images share a batch (padding):
float rounding, as between two single-process runs with different batch sizes.

Shards (`-o DIR`): `DIR/part-<id>.<csv|jsonl|parquet>`, each written atomically (a hidden temporary, then a
rename), plus `DIR/_index/part-<id>.<ext>.json` (the absolute input paths in the shard, written before the
rename) and `DIR/_run.json` (format and tag list). A rerun reads the indexes and tags only inputs not in a
committed shard; names starting with `_` or `.` are ignored by pandas/pyarrow dataset readers.

On a cluster every node must see the images, the model and the output folder at the same paths (a shared
filesystem) and have the project's requirements installed. Ray is imported only when a run starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import socket
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from hydra.bulk.loader import ImageLoader
from hydra.bulk.run import CaptionSink, CsvSink, OutputError, PrintSink, SkipImage, Summary, write_reason
from hydra.cli import caption_options, positive_int
from hydra.common import AtomicFile, atomic_write, log
from hydra.images.decode import is_url

if TYPE_CHECKING:
    from hydra.tagger import Tagger, TaggerSpec
    from hydra.tags.rules import TagSettings

RAY_MISSING = "Ray is not installed: pip install -r requirements-ray.txt"
SHARD_FORMATS = ("csv", "jsonl", "parquet")
DEFAULT_SHARD_ROWS = 1000
DEFAULT_BATCH = 16  # images per model call when -b is left at 1 (one image per call wastes a GPU)
MAX_BLOCKS = 10_000  # input blocks hold one model batch each, or more when there would be more blocks than this
DECODE_MEMORY = 512 << 20  # bytes reserved per decode task: one large image decoded at full size, + samples
INDEX_DIR, MANIFEST = "_index", "_run.json"
GB = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `distributed (Ray)` option group of inference.py."""
    g = parser.add_argument_group("distributed (Ray)", "Tag on Ray Data (pip install -r requirements-ray.txt). Other "
                                  "options mean the same (-w and --no-shm\nexcepted); -o DIR is a folder of shards, "
                                  "and a rerun skips the images already in them.")
    g.add_argument("--ray", metavar="ADDRESS", nargs="?", const="local", type=_address,
                   help="Run on Ray: without ADDRESS on a new local Ray instance; 'auto' or HOST:PORT joins an "
                        "existing cluster (run this on one of its nodes; images, model and -o DIR must be on a "
                        "filesystem every node sees at the same path).")
    g.add_argument("--ray-actors", metavar="N", type=positive_int,
                   help="Number of model actors. (Default: GPUs / --ray-gpus-per-actor; without GPUs, half "
                        "the CPUs)")
    g.add_argument("--ray-gpus-per-actor", metavar="F", type=float, default=1.0,
                   help="GPUs per model actor: 0.5 puts two actors on each GPU, 0 = CPU actors. (Default: 1)")
    g.add_argument("--ray-batch", metavar="N", type=positive_int,
                   help=f"Images per model call in each actor. (Default: -b BATCH_SIZE if above 1, else "
                        f"{DEFAULT_BATCH})")
    g.add_argument("--ray-cpus", metavar="N", type=positive_int,
                   help="CPUs of a local Ray instance. (Default: all)")
    g.add_argument("--ray-object-store", metavar="GB", type=float,
                   help="Object store of a local Ray instance, in GB; blocks spill to disk beyond it. "
                        "(Default: Ray's, 30%% of RAM)")
    g.add_argument("--shard-format", choices=SHARD_FORMATS, default="csv",
                   help="With --ray and -o DIR: file format of the probability shards. (Default: csv)")
    g.add_argument("--shard-rows", metavar="N", type=positive_int, default=DEFAULT_SHARD_ROWS,
                   help=f"With --ray and -o DIR: images per shard, at most. (Default: {DEFAULT_SHARD_ROWS})")


def _address(text: str) -> str:
    # `--ray pictures/` would take the folder for an address: say so rather than run something else
    if text in ("local", "auto") or "://" in text or re.fullmatch(r"[\w.\-\[\]:]+:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a Ray address (auto, HOST:PORT or ray://HOST:PORT); for a "
                                     "local instance put --ray after the paths")


# ---------------------------------------------------------------------------------------------------------
# Shard files


class JsonlSink:
    """One `{"filename": path, "probs": [p, ...]}` line per image, model order, `%.4f` (the tag names are
    in `_run.json`: repeating 7,504 names on every line would triple the size)."""

    def __init__(self, target: str, labels: Sequence[str]):
        self._file = AtomicFile(target, "w", encoding="utf-8", newline="")

    def write(self, path: str, probs: np.ndarray) -> None:
        values = ", ".join(f"{p:.4f}" for p in probs.tolist())
        self._file.file.write(f'{{"filename": {json.dumps(path)}, "probs": [{values}]}}\n')

    def close(self, ok: bool) -> None:
        self._file.commit() if ok else self._file.discard()


class ParquetSink:
    """A Parquet file with a `filename` column and one float32 column per tag (the CSV's columns, unrounded)."""

    def __init__(self, target: str, labels: Sequence[str]):
        self.target, self.labels = target, list(labels)
        self._paths: list[str] = []
        self._rows: list[np.ndarray] = []

    def write(self, path: str, probs: np.ndarray) -> None:
        self._paths.append(path)
        self._rows.append(np.asarray(probs, dtype=np.float32))

    def close(self, ok: bool) -> None:
        if not ok:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        probs = np.stack(self._rows) if self._rows else np.zeros((0, len(self.labels)), np.float32)  # (B, T)
        columns = [pa.array(self._paths, pa.string()), *(pa.array(probs[:, k]) for k in range(probs.shape[1]))]
        table = pa.Table.from_arrays(columns, names=["filename", *self.labels])
        with atomic_write(self.target, "wb") as f:
            pq.write_table(table, f)


SHARD_SINKS = {"csv": CsvSink, "jsonl": JsonlSink, "parquet": ParquetSink}


def open_folder(folder: str | os.PathLike, fmt: str, labels: Sequence[str]) -> set[str]:
    """Create or reopen a shard folder; returns the absolute input paths already in committed shards.

    Raises ValueError when the folder holds shards of another format or tag list (mixing them would make
    a dataset nobody can read back), or is a file.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"'{folder}' is a file; with --ray, -o names a folder for the shards")
    (folder / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    manifest = {"format": fmt, "labels": list(labels)}
    if (folder / MANIFEST).exists():
        old = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if old != manifest:
            what = "format" if old.get("format") != fmt else "tag list"
            raise ValueError(f"'{folder}' holds {old.get('format')} shards with another {what}; choose a new "
                             "output folder or remove it")
    else:
        with atomic_write(folder / MANIFEST, "w") as f:
            json.dump(manifest, f)
    for stale in [*folder.glob(".part-*.tmp"), *(folder / INDEX_DIR).glob(".part-*.tmp")]:
        stale.unlink(missing_ok=True)  # temporaries of a killed run (never visible as shards)
    done: set[str] = set()
    for index in (folder / INDEX_DIR).glob("part-*.json"):
        if (folder / index.stem).exists():
            done.update(json.loads(index.read_text(encoding="utf-8")))
        else:
            index.unlink(missing_ok=True)  # the run stopped between the index and the shard's rename
    return done


def write_shard(folder: str, fmt: str, labels: Sequence[str], rows: Sequence[tuple[str, str, np.ndarray]]) -> str:
    """Write one shard into a folder prepared by `open_folder`: the index, then the shard (atomically).

    Rows are (path as given, absolute path, (T,) probabilities); the file has them sorted by path.
    Returns the shard's name.
    """
    name = f"part-{uuid.uuid4().hex[:16]}.{fmt}"
    index = os.path.join(folder, INDEX_DIR, name + ".json")
    sink = SHARD_SINKS[fmt](os.path.join(folder, name), labels)
    ok = False
    try:
        try:
            for path, _, probs in sorted(rows, key=lambda r: r[0]):
                sink.write(path, probs)
            with atomic_write(index, "w") as f:
                json.dump([file for _, file, _ in rows], f)
            ok = True
        finally:
            sink.close(ok)  # the shard's commit (or its removal)
    except OutputError as e:  # a CSV shard's own error: the OSError under it is what callers handle
        ok = False
        raise (e.error or OSError(str(e))) from None
    except BaseException:
        ok = False
        raise
    finally:
        if not ok:  # nothing of a failed shard stays, not even its index
            with contextlib.suppress(FileNotFoundError):
                os.unlink(index)
    return name


# ---------------------------------------------------------------------------------------------------------
# Pipeline stages (run in Ray workers; batches are dicts of numpy arrays)
#
# Columns: path, file = the input as given and its absolute form, as os.fsencode bytes (a file name that is
# not valid UTF-8 survives Arrow); sample = the pickled preprocess output (variable-length numpy arrays of
# any model family, one opaque bytes value per image); error = "" or the one-line reason; probs = (T,).

_LOADERS: dict[Any, ImageLoader] = {}


def decode(batch: dict[str, np.ndarray], preprocess: Callable) -> dict[str, np.ndarray]:
    """Paths -> pickled samples or error reasons (one worker process per Ray worker, reused across tasks)."""
    if preprocess not in _LOADERS:
        _LOADERS[preprocess] = ImageLoader(preprocess, workers=1)
    files = [os.fsdecode(f) for f in batch["file"]]
    results = dict(_LOADERS[preprocess].imap(files))
    samples, errors = [], []
    for file in files:
        out = results[file]
        if isinstance(out, dict):
            samples.append(pickle.dumps(out, protocol=5))  # our own data between our own workers
            errors.append("")
        else:
            samples.append(b"")
            errors.append(str(out))
    return {"path": batch["path"], "file": batch["file"], "sample": _objects(samples), "error": _objects(errors)}


class TagActor:
    """The model stage: loads the tagger once from the driver's picklable spec.

    Args:
        spec: `Tagger.spec` of the driver's tagger, with absolute paths and the actor's device (`_actor_spec`).
        needed: (T,) bool mask of the tags worth computing, or None for all.
        threads: torch threads (CPU actors), or None to keep torch's choice.
    """

    def __init__(self, spec: TaggerSpec, needed: np.ndarray | None, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.tagger = spec.load()
        self.needed = needed
        log(f"Model actor ready: {self.tagger.describe()}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        probs = np.full((len(batch["error"]), len(self.tagger.labels)), np.nan, np.float32)  # (B, T)
        if ok:
            samples = [pickle.loads(batch["sample"][i]) for i in ok]
            probs[ok] = self.tagger.predict_samples(samples, self.needed)
        return {"path": batch["path"], "file": batch["file"], "error": batch["error"], "probs": probs}


def write_captions(batch: dict[str, np.ndarray], sink: CaptionSink) -> dict[str, np.ndarray]:
    errors = list(batch["error"])
    for i, error in enumerate(errors):
        if not error:
            try:
                sink.write(os.fsdecode(batch["file"][i]), batch["probs"][i])
            except SkipImage as e:
                errors[i] = str(e)
            except OSError as e:
                errors[i] = f"cannot write output ({write_reason(e)})"
    return {"path": batch["path"], "error": _objects(errors)}


def write_shards(batch: dict[str, np.ndarray], folder: str, fmt: str, labels: list[str]) -> dict[str, np.ndarray]:
    """One shard per batch. A file name the format cannot store fails the shard's rows; a write error (a full
    disk) fails them too and sets `stop`: the driver stops the run (tagging on would only produce lost work)."""
    errors = list(batch["error"])
    stop = np.zeros(len(errors), bool)
    ok = [i for i, e in enumerate(errors) if not e]
    if ok:
        rows = [(os.fsdecode(batch["path"][i]), os.fsdecode(batch["file"][i]), batch["probs"][i]) for i in ok]
        try:
            write_shard(folder, fmt, labels, rows)
        except OSError as e:
            for i in ok:
                errors[i] = f"cannot write a shard in '{folder}' ({e.strerror or e})"
            stop[ok] = True
        except ValueError as e:  # a file name Parquet cannot store (not UTF-8)
            for i in ok:
                errors[i] = f"cannot write output ({e})"
    return {"path": batch["path"], "error": _objects(errors), "stop": stop}


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# ---------------------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace, paths: Sequence[str], tagger: Tagger, settings: TagSettings, *,
        skipped: int = 0, failed: int = 0) -> int:
    """Tag `paths` on Ray Data with the options of `args`; the exit code of inference.py.

    Args:
        tagger, settings: what the driver's `hydra.cli.load_run(args)` returned (the driver uses only the
            picklable `tagger.preprocess`, `tagger.spec` and the tag settings; every actor loads its own model).
        skipped, failed: inputs the caller already skipped (`--existing skip`) or failed to list.
    """
    try:
        import ray
    except ImportError:
        log(RAY_MISSING)
        return 2
    summary = Summary(failed=failed, skipped=skipped)
    try:
        plan = _Plan(args, paths, settings, tagger.family.csv_header_on_stdout)
    except (OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    for path, reason in plan.refused.items():
        summary.fail(path, reason)
    ok = True
    if plan.todo:
        owned = not ray.is_initialized()  # a caller (or a test) may have connected already
        if owned:
            try:
                _init_ray(ray, args)
            except ConnectionError as e:
                log(f"error: {e}")
                return 2
        try:
            pool = _actor_options(args, ray.cluster_resources())
            ok = _execute(plan, args, pool, tagger, summary)
        except ValueError as e:
            log(f"error: {e}")
            return 2
        finally:
            if owned:
                ray.shutdown()
    summary.skipped += plan.resumed
    log(summary.line())
    return 1 if summary.failed or not ok else 0


class _Plan:
    """What to run: the inputs still to do, the output stage, and the driver-side sink (stdout modes)."""

    def __init__(self, args: argparse.Namespace, paths: Sequence[str], settings: Any, header_on_stdout: bool):
        if args.device not in (None, "cpu", "cuda"):
            raise ValueError(f"with --ray, -d is 'cpu' or 'cuda' (Ray gives each actor its GPU), not {args.device!r}")
        self.labels, self.rules, self.captions = settings.labels, settings.rules(), settings.captions
        self.stdout_sink: CsvSink | PrintSink | None = None
        self.caption_sink: CaptionSink | None = None
        self.folder: str | None = None
        self.refused: dict[str, str] = {}  # inputs that get no output, with the reason
        done: set[str] = set()
        if args.output == "-":
            self.stdout_sink, self.needed = CsvSink("-", self.labels, header_on_stdout), None
        elif args.format:
            options = caption_options(args)
            text = lambda path, tags: settings.captions.caption(tags, args.prefix, args.shuffle,  # noqa: E731
                                                                first=options.first(path))
            self.stdout_sink, self.needed = PrintSink(args.format, self.rules, caption=text), self.rules.active()
        elif args.output:
            self.folder, self.needed = os.path.abspath(args.output), None
            done = open_folder(self.folder, args.shard_format, self.labels)
        elif any(is_url(p) for p in paths):
            raise ValueError("URLs have no folder to write a caption into; use --format or -o with URL inputs")
        else:
            self.needed = self.rules.active()
            self.caption_sink = CaptionSink(self.rules, self.captions, args.prefix, args.shuffle,
                                            append=getattr(args, "existing", "") == "append",
                                            options=caption_options(args))
            self.refused = self.caption_sink.refuse(paths)  # a caption over an input, or two images' caption
        items = [(p, p if is_url(p) else os.path.abspath(p)) for p in paths if p not in self.refused]
        self.todo = [(p, f) for p, f in items if f not in done]
        self.resumed = len(items) - len(self.todo)


def _init_ray(ray: Any, args: argparse.Namespace) -> None:
    import logging

    if args.ray == "local":
        store = int(args.ray_object_store * GB) if args.ray_object_store else None
        ray.init(address="local", num_cpus=args.ray_cpus, object_store_memory=store, include_dashboard=False,
                 logging_level=logging.ERROR)
    else:  # workers import this project from the driver's script folder: it must exist on every node
        _probe(args.ray)
        ray.init(address=args.ray, logging_level=logging.ERROR)


def _probe(address: str) -> None:
    """Fail at once when nothing listens at HOST:PORT (ray.init would retry for minutes, deaf to Ctrl-C)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address} ({e.strerror or e})") from None


def _actor_options(args: argparse.Namespace, resources: dict[str, float]) -> tuple[int, dict[str, float], int | None]:
    """(actors, Ray resources per actor, torch threads per actor or None) for the cluster's resources."""
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    per_gpu = args.ray_gpus_per_actor
    if args.device == "cuda" and not (gpus and per_gpu > 0):
        raise ValueError("-d cuda, but the Ray cluster has no GPUs (or --ray-gpus-per-actor is 0)")
    if gpus and per_gpu > 0 and args.device != "cpu":
        return args.ray_actors or max(1, int(gpus / per_gpu)), {"num_gpus": per_gpu, "num_cpus": 1.0}, None
    actors = args.ray_actors or max(1, int(cpus) // 2)
    # Actors never book the last CPU: decode and write tasks need one, or the pipeline would stall.
    share = min(1.0, max(cpus - 1.0, 0.5) / actors)
    return actors, {"num_cpus": share}, 1


def _actor_spec(spec: TaggerSpec, gpu: bool) -> TaggerSpec:
    """The driver's tagger as the actors load it: files absolute (a worker's current directory is not the
    driver's), the device fixed to the actor's kind."""
    options = dataclasses.replace(spec.options, extensions=tuple(map(os.path.abspath, spec.options.extensions)),
                                  vocab=spec.options.vocab and os.path.abspath(spec.options.vocab))
    return dataclasses.replace(spec, path=os.path.abspath(spec.path), options=options,
                               device="cuda" if gpu else "cpu")


def _execute(plan: _Plan, args: argparse.Namespace, pool: tuple[int, dict[str, float], int | None],
             tagger: Tagger, summary: Summary) -> bool:
    """Build and stream the pipeline; False if Ray failed (the reason is logged)."""
    import logging

    import ray.data as rd

    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's count blocks per stage
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no notes on deprecations, fusion, disabled bars
    actors, resources, threads = pool
    batch = args.ray_batch or (args.batch if args.batch > 1 else DEFAULT_BATCH)
    each = f"{resources['num_gpus']:g} GPU" if "num_gpus" in resources else f"{resources['num_cpus']:g} CPU"
    log(f"Ray: {actors} model actor{'s' * (actors != 1)} ({each} each), batch {batch}, {len(plan.todo)} images"
        + (f" ({plan.resumed} already done)" if plan.resumed else ""))

    # A block is the unit of work of every stage (Ray Data does not split blocks into smaller tasks): one model
    # batch per block spreads the images over all actors and keeps the progress bar moving.
    items = [{"path": os.fsencode(p), "file": os.fsencode(f)} for p, f in plan.todo]
    rows = max(batch, math.ceil(len(items) / MAX_BLOCKS))
    ds = rd.from_items(items, override_num_blocks=math.ceil(len(items) / rows))
    # The memory reservation also keeps Ray Data from fusing decode into the model actors (it fuses only
    # stages with equal resources): decoding must run in tasks on other CPUs, overlapping the model.
    ds = ds.map_batches(decode, fn_kwargs={"preprocess": tagger.preprocess}, batch_size=None, batch_format="numpy",
                        memory=DECODE_MEMORY)
    spec = _actor_spec(tagger.spec, "num_gpus" in resources)
    ds = ds.map_batches(TagActor, fn_constructor_args=(spec, plan.needed, threads), batch_size=batch,
                        batch_format="numpy", compute=rd.ActorPoolStrategy(size=actors), **resources)
    if plan.folder is not None:
        ds = ds.map_batches(write_shards, fn_kwargs={"folder": plan.folder, "fmt": args.shard_format,
                                                     "labels": plan.labels},
                            batch_size=args.shard_rows, batch_format="numpy")
    elif plan.caption_sink is not None:
        # batch_size=None: each model batch is written as it comes (no waiting for more rows)
        ds = ds.map_batches(write_captions, fn_kwargs={"sink": plan.caption_sink}, batch_size=None,
                            batch_format="numpy")

    bar = tqdm(total=len(items), unit="img", file=sys.stderr, dynamic_ncols=True)
    ok, handled = False, 0
    try:
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if "stop" in out and out["stop"].any():  # the shard folder cannot be written: stop now
                    reason = out["error"][int(np.argmax(out["stop"]))]
                    raise OutputError(f"{reason}; the run stopped. Finished shards are kept: rerun the same "
                                      "command to do the rest", lost=False)
                for i, (path, error) in enumerate(zip(out["path"], out["error"])):
                    path = os.fsdecode(path)
                    if error:
                        summary.fail(path, error, bar)
                    else:
                        if plan.stdout_sink is not None:
                            plan.stdout_sink.write(path, out["probs"][i])
                        summary.tagged += 1
                    handled += 1
                bar.update(len(out["path"]))
            ok = True
        finally:
            bar.close()
            if plan.stdout_sink is not None:
                plan.stdout_sink.close(ok)
    except OutputError as e:  # stdout or the shard folder: tagging on would only produce lost work
        log(f"error: {e}")
        summary.failed += len(items) - handled
        summary.stopped, ok = True, False
    except BrokenPipeError:
        raise  # stdout's reader has gone (`-o - | head`): inference.py exits quietly
    except Exception as e:  # a Ray failure (a lost node, an actor that cannot load): one line, then exit 1
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log(f"error: the Ray run failed: {first}")
        log("Finished outputs are kept: rerun the same command to do the rest.")
    return ok
