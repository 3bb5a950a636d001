"""Benchmark bulk tagging: images/s, seconds to the first result and peak memory, against the original's way.

Examples:
    python bench.py                                # the full table, CPU and CUDA if present (~25 min on 2 cores)
    python bench.py --seqlen 1024 --batch-size 1 4 # one sequence length
    python bench.py --quick                        # seqlen 256 and a quarter of the images: a first look
    python bench.py --tiny --images 3 --seqlen 64  # smoke run on a tiny random model (the test suite does this)
    python bench.py --family jtp3 hydra35 --quick  # JTP-3 and Hydra 3.5 side by side
    python bench.py --family hydra35 --tiny --images 2 --seqlen 64 --no-load-probe   # Hydra 3.5 smoke run
    python bench.py --compile --modes ours --quick --batch-size 1   # ours with and without -c (torch.compile)
    python bench.py --no-fold --seqlen 1024 --batch-size 1          # ours with and without the folded heads

Nothing is downloaded. The model is a full-size random-weight file in the exact real format, written once by
`hydra.testing.jtp3.write_model` into bench-results/ (1 GB); timing does not depend on the weights' values.
`--family hydra35` adds Hydra 3.5 rows on a full-size random file in its real layout (`hydra.testing.hydra35`,
1.06 GB, libvips preprocessing with its real white background and mks2013-linear resize), naive and ours. The
images are generated deterministically: a "mixed" folder (pixel counts log-uniform from 96x96 to 4096x4096,
twelve aspect ratios, JPEG/PNG/WebP, some with alpha) and a "uniform" folder of 4000x3000 JPEGs.

Every measurement is a fresh process, so start-up and peak RSS are honest:
- "ours" runs `inference.py -o - ...` itself (CSV rows on stdout, timed as they arrive);
- "naive" re-creates what the original inference.py does: every tensor read into a dict and copied into an
  allocated model (peak ~2x the weights), loader workers that import torch and timm (the original's spawned
  workers re-import its modules), batch 1 (`--naive-batch-size N`: N in arrival order), every image padded to
  `seqlen`, the boolean key mask always passed, the Hydra head over all tags in one pass, bf16. For Hydra 3.5
  it re-creates upstream's inference.py the same way: every tensor read (the validation table too) and copied
  into an allocated model, its default loader workers (min(ceil(cores / 3), 16), at most half the images) that
  import torch and timm, libvips as ours, batch 1 padded to `seqlen` with the mask, the whole pool and head over
  all 8,886 tags in one pass, unfolded.
  Both modes print the same CSV, so their probabilities are compared.
- "load" probes load the model alone and report RSS before and the peak after (ours vs the original's way).
- "stage" probes split ours per family in one process: decode + resize + patchify (the family's own pipeline:
  Pillow for JTP-3, libvips for Hydra 3.5) per image on one thread, and the model forward on those samples at
  each batch size, all threads (`--no-stage-probe` skips them).

images/s counts the images after the first result (steady state); "first" is process start to the first row;
"wall" is process start to exit (start-up, every image, shut-down), the user's wait for the whole folder.
`--compile` adds an "ours -c" row (`inference.py -c`, torch.compile) beside every "ours" row: its "first" minus the
eager row's is the compile time, and its images/s the compiled steady state (both printed after the table).
`--no-fold` adds an "ours nofold" row (`HYDRA_NO_FOLD=1`: the heads as stored) beside every "ours" row, so the
fold's gain comes from one run.
"useful" is the model's own FLOPs (JTP-3's or Hydra 3.5's) on the unpadded images per second, as a fraction of the
bf16 matmul peak measured here (model FLOPs utilisation); "exec" counts what the mode really computes (naive pads every
image to `seqlen`) over the same peak. `--repeat N` runs everything N times round-robin and keeps each
run's best, for shared machines. A table goes to stdout and everything to bench-results/bench-<time>.json.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "bench-results"
FULL_MODEL = "jtp-3-hydra-random.safetensors"
FAMILIES = ("jtp3", "hydra35")
FULL_MODELS = {"jtp3": FULL_MODEL, "hydra35": "hydra-3.5-random.safetensors"}
HYDRA35_TAGS = 8886  # as the full-size fixture test (tests/test_hydra35_net.py); the published file has about as many
SEQLENS, BATCH_SIZES = (256, 576, 1024), (1, 4)
MIXED_IMAGES, UNIFORM_IMAGES = 24, 8
UNIFORM_SIZE = (4000, 3000)  # W x H: a 12 Mpx photo, 972 tokens at seqlen 1024
ASPECTS = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2), (21, 9), (1, 3), (3, 1)]
FORMATS = [("jpg", "RGB"), ("png", "RGB"), ("webp", "RGB"), ("jpg", "RGB"), ("png", "RGBA")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark bulk tagging against the original's way of running.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    g = p.add_argument_group("workload")
    g.add_argument("--seqlen", type=int, nargs="+", help=f"Sequence lengths. (Default: {' '.join(map(str, SEQLENS))})")
    g.add_argument("--naive-batch-size", type=int, nargs="+", default=[1], metavar="N",
                   help="Batch sizes for naive: N images in arrival order, each padded to seqlen, as the originals' "
                   "-b. (Default: 1, the originals' default)")
    g.add_argument("--batch-size", type=int, nargs="+", help="Batch sizes for ours. "
                   f"(Default: {' '.join(map(str, BATCH_SIZES))})")
    g.add_argument("--folders", nargs="+", choices=("mixed", "uniform"), default=["mixed", "uniform"],
                   help="Image folders to run. (Default: both)")
    g.add_argument("--images", type=int, help=f"Images per folder. (Default: {MIXED_IMAGES} mixed, "
                   f"{UNIFORM_IMAGES} uniform)")
    g.add_argument("--quick", action="store_true", help="Seqlen 256 and a quarter of the images.")
    g = p.add_argument_group("model")
    g.add_argument("--family", nargs="+", choices=FAMILIES, default=["jtp3"],
                   help="Model families: jtp3, hydra35 (Hydra 3.5). (Default: jtp3)")
    g.add_argument("--model", metavar="PATH", help=f"JTP-3 model file. (Default: bench-results/{FULL_MODEL}, "
                   "written on first use by the fixture writer; never a download)")
    g.add_argument("--hydra35-model", metavar="PATH", help=f"Hydra 3.5 model file. (Default: bench-results/"
                   f"{FULL_MODELS['hydra35']}, written on first use like the JTP-3 one)")
    g.add_argument("--tiny", action="store_true", help="Use a tiny random model instead (smoke runs).")
    g = p.add_argument_group("execution")
    g.add_argument("--device", nargs="+", help="Torch devices. (Default: cpu, plus cuda when available)")
    g.add_argument("--modes", nargs="+", choices=("naive", "ours"), default=["naive", "ours"],
                   help="What to run. (Default: both)")
    g.add_argument("--workers", type=int, nargs="+",
                   help="Loader processes for ours. (Default: inference.py's default, the number of cores)")
    g.add_argument("--compile", action="store_true",
                   help="Also run every 'ours' row with inference.py -c (torch.compile): compile time, steady img/s.")
    g.add_argument("--no-fold", action="store_true",
                   help="Also run every 'ours' row with HYDRA_NO_FOLD=1 (the heads unfolded), for the fold's gain.")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="Dtype for ours. "
                   "(Default: auto; naive is always bf16, as the original)")
    g.add_argument("--no-load-probe", action="store_true", help="Skip the model-loading memory probes.")
    g.add_argument("--no-stage-probe", action="store_true",
                   help="Skip the per-stage probes (preprocessing alone, forward alone).")
    g.add_argument("--repeat", type=int, default=1, help="Run everything this many times, round-robin, and keep "
                   "each run's best (for shared, noisy machines). (Default: 1)")
    g.add_argument("--timeout", type=float, default=3600, help="Seconds one run may take. (Default: 3600)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=str(RESULTS),
                   help="Folder for the JSON, the generated images and model. (Default: bench-results/)")
    p.add_argument("--child", choices=("naive", "load-ours", "load-naive", "stages"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    return p


# -- inputs: the model file, the image folders, the FLOP count --------------------------------------------


def prepare_model(args: argparse.Namespace, out: Path, family: str = "jtp3") -> str:
    given = args.model if family == "jtp3" else getattr(args, "hydra35_model", None)
    if given:
        return given
    tiny = "tiny.safetensors" if family == "jtp3" else f"tiny-{family}.safetensors"
    path = out / (tiny if args.tiny else FULL_MODELS[family])
    if path.is_file():
        return str(path)
    print(f"Writing a random-weight model to {path} ...", file=sys.stderr, flush=True)
    if family == "hydra35":
        from hydra.testing.hydra35 import write_hydra35_model

        # the published file's image settings (docs/formats.md): they decide how much work libvips does
        labels = _jtp3_tags() if args.tiny else [f"tag_{i:04d}" for i in range(HYDRA35_TAGS)]  # tiny: as JTP-3's
        write_hydra35_model(path, labels, full_size=not args.tiny, background="white", resize="mks2013-linear")
    else:
        from hydra.testing.jtp3 import write_model

        write_model(path, _jtp3_tags(), full_size=not args.tiny)
    return str(path)


def _jtp3_tags() -> list[str]:
    return [line.split(",", 1)[0] for line in (ROOT / "data" / "jtp-3-hydra-tags.csv").read_text().splitlines()[1:]]


def image_sizes(folder: str, n: int, seed: int = 0) -> list[tuple[int, int, str, str]]:
    """(width, height, extension, mode) of each generated image; deterministic."""
    if folder == "uniform":
        return [(*UNIFORM_SIZE, "jpg", "RGB")] * n
    rng, sizes = random.Random(seed), []
    for i in range(n):
        pixels = math.exp(rng.uniform(math.log(96 * 96), math.log(4096 * 4096)))
        a, b = rng.choice(ASPECTS)
        w = max(16, round(math.sqrt(pixels * a / b)))
        sizes.append((w, max(16, round(pixels / w)), *FORMATS[i % len(FORMATS)]))
    return sizes


def prepare_folder(out: Path, folder: str, n: int) -> Path:
    import numpy as np
    from PIL import Image

    path = out / "images" / f"{folder}-{n}"
    sizes = image_sizes(folder, n)
    names = [f"{i:03d}_{w}x{h}.{ext}" for i, (w, h, ext, _) in enumerate(sizes)]
    if path.is_dir() and sorted(os.listdir(path)) == sorted(names):
        return path
    path.mkdir(parents=True, exist_ok=True)
    for i, ((w, h, ext, mode), name) in enumerate(zip(sizes, names)):
        rng = np.random.default_rng(i)  # smooth noise: compresses and decodes like a picture, not like static
        small = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, len(mode)), dtype=np.uint8)
        img = Image.fromarray(small, mode).resize((w, h), Image.Resampling.BICUBIC)
        img.save(path / name, **({"quality": 90} if ext in ("jpg", "webp") else {}))
    return path


def model_dims(path: str) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        shape = {k: f.get_slice(k).get_shape() for k in f.keys()}
    heads, tags, head_dim = shape["attn_pool.q"]
    dims = {"width": shape["embeds.proj.weight"][0], "patch": shape["embeds.proj.weight"][1],
            "depth": sum(k.endswith(".attn.qkv.weight") for k in shape), "mlp": shape["blocks.0.mlp.fc1.weight"][0],
            "tags": tags, "attn": heads * head_dim}
    if "attn_pool.ff.proj_in.weight" in shape:  # Hydra 3.5's pool: SpGLU feed-forwards and mid-blocks
        return {**dims, "ff": shape["attn_pool.ff.proj_in.weight"][0] // 2,
                "mid_blocks": sum(k.endswith(".q_proj.weight") for k in shape)}
    return {**dims, "ff": shape["attn_pool.ff_in.weight"][0] // 2}


def image_flops(n: int, m: dict[str, int]) -> float:
    """Model FLOPs (multiply-add = 2) for one image of `n` tokens (JTP-3, or Hydra 3.5 when `m` has mid-blocks)."""
    d, a, t, f = m["width"], m["attn"], m["tags"], m["ff"]
    backbone = 2 * n * m["patch"] * d + m["depth"] * (2 * n * d * (4 * d + 2 * m["mlp"]) + 4 * n * n * d)
    if "mid_blocks" in m:  # hydra35.md "Cost": per block a cross-attention and a feed-forward; q/o projections
        blocks = 1 + m["mid_blocks"]
        head = 2 * n * d * 2 * a + blocks * (4 * t * n * a + 6 * t * a * f) + m["mid_blocks"] * 4 * t * a * a
        return float(backbone + head + 2 * t * a)
    head = 2 * n * d * 2 * a + 4 * t * n * a + 2 * t * a * 3 * f + 4 * t * a
    return float(backbone + head)


def executed_flops(run: Run, token_counts: list[int], m: dict[str, int]) -> list[float]:
    """What the hardware computes per image, in processing order: naive pads every image to `seqlen` and
    runs the whole head; ours runs unpadded (batch > 1 pads a little more: not counted)."""
    if run.mode == "naive":
        return [image_flops(run.seqlen, m)] * len(token_counts)
    return [image_flops(n, m) for n in token_counts]


def folder_tokens(folder: Path, seqlen: int) -> dict[str, int]:
    from PIL import Image

    from hydra.images.naflex import PATCH_SIZE, size_for_seqlen

    out = {}
    for name in sorted(os.listdir(folder)):
        with Image.open(folder / name) as img:
            h, w = size_for_seqlen(img.height, img.width, seqlen)
        out[str(folder / name)] = (h // PATCH_SIZE) * (w // PATCH_SIZE)
    return out


def matmul_peak(device: str, dtype_name: str, small: bool = False) -> float:
    """Best GFLOP/s of large square and head-shaped matmuls on `device` (all threads)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    shapes = [(2048, 2048, 2048), (4096, 4096, 4096), (7504, 2048, 6144)] if device == "cpu" else [(8192,) * 3]
    shapes = [(512, 512, 512)] if small else shapes
    best = 0.0
    with torch.inference_mode():
        for m, k, n in shapes:
            a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
            for _ in range(6):
                _sync(device)
                t = time.perf_counter()
                torch.mm(a, b)
                _sync(device)
                best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -- one run in a fresh process -----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    device: str
    folder: str
    seqlen: int
    mode: str
    batch: int
    workers: int | None
    dtype: str
    family: str = "jtp3"
    compile: bool = False                         # ours with -c (torch.compile)
    fold: bool = True                             # ours with the folded heads (False: HYDRA_NO_FOLD=1)
    images: int = 0
    images_per_s: float = math.nan
    first_result_s: float = math.nan
    total_s: float = math.nan
    peak_rss_gb: float | None = None
    useful_tflop_per_image: float = math.nan      # the original model's FLOPs on the unpadded images
    executed_tflop_per_image: float = math.nan    # what this mode computes (naive: padded to seqlen)
    fraction_of_peak: float = math.nan            # useful FLOPs/s over the measured bf16 matmul peak
    executed_fraction_of_peak: float = math.nan   # executed FLOPs/s over the same peak (hardware busy-ness)
    speedup: float = math.nan                     # images/s over naive's
    first_result_ratio: float = math.nan          # seconds to the first result over naive's
    wall_speedup: float = math.nan                # naive's wall time (start to exit) over this run's
    exit_code: int | None = None
    error: str = ""
    repeats: int = 1


def run_command(run: Run, model: str, folder: Path, out: Path) -> list[str]:
    if run.mode == "naive":
        return [sys.executable, str(ROOT / "bench.py"), "--child", "naive", "--model", model, "--folder", str(folder),
                "--seqlen", str(run.seqlen), "--device", run.device, "--batch-size", str(run.batch)]
    cmd = [sys.executable, str(ROOT / "inference.py"), "-M", model, "-E", "-o", "-", "-S", str(run.seqlen),
           "-b", str(run.batch), "-d", run.device, "--dtype", run.dtype]
    return (cmd + (["-w", str(run.workers)] if run.workers is not None else []) + (["-c"] if run.compile else [])
            + [str(folder)])


def execute(cmd: list[str], timeout: float, cwd: Path,
            env: dict[str, str] | None = None) -> tuple[list[tuple[float, str, list[float]]], dict]:
    """Run `cmd` (with `env` added to the environment); return its CSV rows with arrival times (s since start),
    and exit / RSS / stderr facts."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
    tail: list[str] = []
    reader = threading.Thread(target=lambda: [tail.append(x.decode(errors="replace")) for x in proc.stderr],
                              daemon=True)
    reader.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    rows = []
    for line in proc.stdout:
        t = time.perf_counter() - start
        fields = next(csv.reader([line.decode()]))
        if not rows and fields[0] == "filename":  # Hydra 3.5 prints the CSV header on stdout too (as upstream)
            continue
        rows.append((t, fields[0], [float(x) for x in fields[1:]]))
    if hasattr(os, "wait4"):
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss = usage.ru_maxrss / 2**20  # KiB -> GiB
    else:
        proc.wait()
        rss = None
    killer.cancel()
    reader.join(timeout=5)
    return rows, {"total_s": time.perf_counter() - start, "exit_code": proc.returncode, "peak_rss_gb": rss,
                  "stderr": "".join(tail[-5:]).strip()}


def measure(run: Run, rows: list, facts: dict, tokens: dict[str, int], dims: dict, peak: float) -> None:
    run.total_s, run.exit_code, run.peak_rss_gb = facts["total_s"], facts["exit_code"], facts["peak_rss_gb"]
    run.images = len(rows)
    if facts["exit_code"] != 0 or len(rows) < len(tokens):
        run.error = facts["stderr"][-300:]
    if not rows:
        return
    run.first_result_s = rows[0][0]
    useful = [image_flops(tokens[path], dims) for _, path, _ in rows]
    executed = executed_flops(run, [tokens[path] for _, path, _ in rows], dims)
    run.useful_tflop_per_image = sum(useful) / len(useful) / 1e12
    run.executed_tflop_per_image = sum(executed) / len(executed) / 1e12
    if len(rows) > 1 and rows[-1][0] > rows[0][0] and peak:
        span = rows[-1][0] - rows[0][0]
        run.images_per_s = (len(rows) - 1) / span
        run.fraction_of_peak = sum(useful[1:]) / span / (peak * 1e9)
        run.executed_fraction_of_peak = sum(executed[1:]) / span / (peak * 1e9)


def agreement(a: list, b: list) -> dict[str, float]:
    """Mean and max |p_a - p_b| over the images both runs tagged (CSV precision: 1e-4)."""
    import numpy as np

    pa, pb = {path: p for _, path, p in a}, {path: p for _, path, p in b}
    common = sorted(set(pa) & set(pb))
    if not common:
        return {"images": 0, "mean_abs_dp": math.nan, "max_abs_dp": math.nan}
    diff = np.abs(np.array([pa[k] for k in common]) - np.array([pb[k] for k in common]))
    return {"images": len(common), "mean_abs_dp": float(diff.mean()), "max_abs_dp": float(diff.max())}


# -- the original's way, run inside a child ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OriginalWorker:
    """The original's loader worker: a spawned process that re-imports the original's modules (torch and timm)
    before it decodes anything, then preprocesses exactly as ours (padding happens in `collate`): Pillow for
    JTP-3, libvips with the file's background and resize for Hydra 3.5 (`vips` set)."""

    seqlen: int
    vips: tuple[str, str] | None = None  # Hydra 3.5: (background, resize)

    def __call__(self, path: str) -> dict:
        import timm  # noqa: F401  (the cost is the point)
        import torch  # noqa: F401

        if self.vips:
            from hydra.images.vips import Hydra35Preprocess

            return Hydra35Preprocess(self.seqlen, *self.vips)(path)
        from hydra.images.naflex import JTP3Preprocess

        return JTP3Preprocess(self.seqlen)(path)


def load_like_original(path: str, device: str):
    """The original's loading: every tensor into a dict, a bf16 model allocated uninitialised (timm's
    weight_init="skip"), a strict `load_state_dict` copy, then `.to(device)`."""
    import torch
    from safetensors.torch import load_file

    from hydra.models.backbone import create_backbone
    from hydra.models.checkpoint import KEY_LABELS, parse_backbone_overrides, read_metadata
    from hydra.models.head import HydraCfg, HydraPool
    from hydra.models.jtp3_net import JTP3Model

    state, meta = load_file(path), read_metadata(path)
    net = create_backbone(parse_backbone_overrides(path, meta), device="meta", dtype=torch.bfloat16)
    net.attn_pool = HydraPool(HydraCfg.from_state(state), device="meta", dtype=torch.bfloat16)
    net = net.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    del state
    net = net.requires_grad_(False).eval().to(device)
    return JTP3Model(net=net, labels=meta[KEY_LABELS].split("\n"), path=path, metadata=meta)


def load_like_upstream35(path: str, device: str):
    """Upstream Hydra 3.5's loading: every tensor (the validation table too) into a dict, a bf16 model allocated
    uninitialised, a strict `load_state_dict` copy, then `.to(device)`; the head unfolded."""
    import torch
    from safetensors.torch import load_file

    from hydra.models.checkpoint import KEY_LABELS, parse_backbone_overrides, read_metadata
    from hydra.models.hydra35_net import (
        KEY_BACKGROUND,
        KEY_RESIZE,
        KEY_VALIDATION,
        Hydra2Cfg,
        Hydra35Model,
        build_hydra35_net,
        parse_labels,
    )

    state, meta = load_file(path), read_metadata(path)
    validation = state.pop(KEY_VALIDATION).numpy()
    net = build_hydra35_net(Hydra2Cfg.from_state(state), parse_backbone_overrides(path, meta), device="meta",
                            dtype=torch.bfloat16).to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    del state
    net = net.requires_grad_(False).eval().to(device)
    labels, categories, implies = parse_labels(path, meta[KEY_LABELS])
    return Hydra35Model(net=net, labels=labels, categories=categories, implies=implies, validation=validation,
                        path=path, metadata=meta, background=meta.get(KEY_BACKGROUND, "black"),
                        resize=meta.get(KEY_RESIZE, "lanczos"))  # fold: False


def upstream35_workers(cores: int, images: int) -> int:
    """Upstream Hydra 3.5's default `-w`: min(ceil(cores / 3), 16) loader processes, at most half the images."""
    return max(1, min(-(-cores // 3), 16, images // 2))


def naive_child(args: argparse.Namespace) -> int:
    import torch

    import hydra.models.head
    import hydra.models.hydra35_net
    from hydra.bulk.loader import ImageLoader, LoadError
    from hydra.bulk.run import iter_images
    from hydra.images.naflex import collate

    # the originals' heads: all tags in one pass
    hydra.models.head.CHUNK_ROWS = hydra.models.head.GPU_CHUNK_ROWS = 1 << 30
    hydra.models.hydra35_net.CHUNK_ROWS = hydra.models.hydra35_net.GPU_CHUNK_ROWS = 1 << 30
    out = csv.writer(sys.stdout)
    from bench import OriginalWorker as Worker  # by module name: workers cannot import from a __main__

    seqlen, paths, cores = args.seqlen[0], list(iter_images([args.folder])), os.cpu_count() or 1
    if _is_hydra35(args.model):
        model = load_like_upstream35(args.model, args.device[0])
        worker, workers = Worker(seqlen, (model.background, model.resize)), upstream35_workers(cores, len(paths))
    else:
        model, worker, workers = load_like_original(args.model, args.device[0]), Worker(seqlen), cores
    size, pending = (args.batch_size or [1])[0], []

    def run(pending: list[tuple[str, dict]]) -> None:
        host = collate([sample for _, sample in pending], pad_to=seqlen)
        batch = model.to_device_batch(host, non_blocking=True)
        valid = host["patch_valid"].to(model.device)  # always passed, as the originals
        feats = model.net.forward_features(batch["patches"], patch_coord=batch["patch_coord"],
                                           patch_valid=valid, attn_mask=valid[:, None, None, :])["patches"]
        probs = model.head_logits(feats, valid).float().sigmoid().cpu().numpy()
        for (path, _), p in zip(pending, probs):
            out.writerow([path, *(f"{x:.4f}" for x in p.tolist())])
        sys.stdout.flush()

    with torch.inference_mode(), ImageLoader(worker, workers) as loader:
        for path, sample in loader.imap(paths):
            if isinstance(sample, LoadError):
                print(f"'{path}': {sample}", file=sys.stderr)
                continue
            pending.append((path, sample))
            if len(pending) == size:
                run(pending)
                pending = []
        if pending:
            run(pending)
    return 0


def load_child(args: argparse.Namespace) -> int:
    """Print RSS after imports, peak RSS after loading, load time, and the weights' size (JSON)."""
    import torch

    from hydra.common import choose_dtype
    from hydra.models.jtp3_net import load_jtp3

    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if args.child == "load-naive":
        load = load_like_upstream35 if _is_hydra35(args.model) else load_like_original
        model = load(args.model, args.device[0])
    elif _is_hydra35(args.model):
        from hydra.models.hydra35_net import load_hydra35

        model = load_hydra35(args.model, args.device[0], choose_dtype(args.device[0], args.dtype)[0])
    else:
        model = load_jtp3(args.model, args.device[0], choose_dtype(args.device[0], args.dtype)[0])
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.net.parameters())
    print(json.dumps({"load_s": seconds, "rss_before_gb": before / 2**20, "peak_rss_gb": _status_kib("VmHWM") / 2**20,
                      "weights_gb": weights / 2**30, "dtype": str(model.dtype).removeprefix("torch."),
                      "torch_threads": torch.get_num_threads()}))
    return 0


def _is_hydra35(path: str) -> bool:
    from hydra.models.checkpoint import HYDRA35_ARCHITECTURE, KEY_ARCHITECTURE, read_metadata

    return read_metadata(path).get(KEY_ARCHITECTURE) == HYDRA35_ARCHITECTURE


def stages_child(args: argparse.Namespace) -> int:
    """Print (JSON) the family's preprocessing per image on one thread, and the forward alone at each batch size
    on all threads: samples in file order, one warm-up batch, then every batch timed."""
    os.environ["VIPS_CONCURRENCY"] = "1"  # as in the loader workers (libvips reads it at import)
    import torch

    from hydra.bulk.run import iter_images
    from hydra.tagger import Tagger

    tagger = Tagger(args.model, device=args.device[0], dtype=args.dtype, size=args.seqlen[0])
    paths = list(iter_images([args.folder]))
    torch.set_num_threads(1)  # preprocessing: what one loader worker does
    tagger.preprocess(paths[0])  # warm-up (imports, libvips' lookup tables)
    start = time.perf_counter()
    samples = [tagger.preprocess(p) for p in paths]
    prep_s = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    forward = {}
    for b in args.batch_size:
        batches = [samples[i:i + b] for i in range(0, len(samples), b)]
        tagger.predict_samples(batches[0])  # warm-up (first-call allocations, kernel selection)
        _sync(args.device[0])
        start = time.perf_counter()
        for batch in batches:
            tagger.predict_samples(batch)
        _sync(args.device[0])
        forward[str(b)] = len(samples) / (time.perf_counter() - start)
    print(json.dumps({"preprocess": type(tagger.preprocess).__name__, "images": len(paths),
                      "preprocess_images_per_s": len(paths) / prep_s, "forward_images_per_s": forward,
                      "mean_tokens": sum(map(tagger.sample_tokens, samples)) / len(samples),
                      "dtype": str(tagger.dtype).removeprefix("torch.")}))
    return 0


def _status_kib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            return next(float(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return math.nan


# -- the whole benchmark ---------------------------------------------------------------------------------------


def plan(args: argparse.Namespace, devices: list[str]) -> list[Run]:
    runs = []
    for family in args.family:
        for device in devices:
            for folder in args.folders:
                for seqlen in args.seqlen:
                    if "naive" in args.modes:
                        runs += [Run(device, folder, seqlen, "naive", b, None, "bf16", family)
                                 for b in args.naive_batch_size]
                    if "ours" in args.modes:
                        runs += [Run(device, folder, seqlen, "ours", b, w, args.dtype, family, c)
                                 for b in args.batch_size for w in (args.workers or [None])
                                 for c in ((False, True) if args.compile else (False,))]
                        if args.no_fold:
                            runs += [Run(device, folder, seqlen, "ours", b, w, args.dtype, family, fold=False)
                                     for b in args.batch_size for w in (args.workers or [None])]
    return runs


def machine_info(devices: list[str]) -> dict:
    import timm
    import torch

    from hydra.common import cpu_has_fast_bf16

    cpu = platform.processor()
    try:
        info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines())
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError, ValueError):
        pass
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_fast_bf16()}
    if "cuda" in " ".join(devices):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(runs: list[Run]) -> None:
    head = ("family", "device", "folder", "seqlen", "mode", "batch", "workers", "img/s", "x naive", "first s",
            "x naive", "wall s", "x naive", "RSS GB", "useful", "exec")
    rows = [(r.family, r.device, r.folder, r.seqlen,
             r.mode + (" -c" if r.compile else "") + ("" if r.fold else " nofold"), r.batch,
             "-" if r.workers is None else r.workers,
             f"{r.images_per_s:.3f}", _ratio(r.speedup), f"{r.first_result_s:.1f}", _ratio(r.first_result_ratio),
             f"{r.total_s:.1f}", _ratio(r.wall_speedup),
             "-" if r.peak_rss_gb is None else f"{r.peak_rss_gb:.2f}", f"{100 * r.fraction_of_peak:.0f}%",
             f"{100 * r.executed_fraction_of_peak:.0f}%")
            for r in runs]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for line in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def _twin(runs: list[Run], r: Run) -> Run | None:
    """The plain "ours" row (eager, folded) of the same family, device, folder, seqlen, batch and workers."""
    return next((e for e in runs if e.mode == r.mode and not e.compile and e.fold and e is not r
                 and (e.family, e.device, e.folder, e.seqlen, e.batch, e.workers)
                 == (r.family, r.device, r.folder, r.seqlen, r.batch, r.workers)), None)


def print_compile(runs: list[Run]) -> None:
    """Each "ours -c" row against its eager twin: the extra seconds to the first result (compiling) and the
    steady-state speed ratio; each "ours nofold" row against its folded twin."""
    for r in runs:
        base = _twin(runs, r)
        if base is None:
            continue
        if r.compile:
            print(f"-c {r.family} {r.device} {r.folder} seqlen {r.seqlen} batch {r.batch}: compile "
                  f"+{r.first_result_s - base.first_result_s:.1f} s to the first result, steady "
                  f"{r.images_per_s:.3f} img/s against {base.images_per_s:.3f} "
                  f"({_ratio(r.images_per_s / base.images_per_s)}x)")
        elif not r.fold:
            print(f"fold {r.family} {r.device} {r.folder} seqlen {r.seqlen} batch {r.batch}: "
                  f"{base.images_per_s:.3f} img/s folded against {r.images_per_s:.3f} unfolded "
                  f"({_ratio(base.images_per_s / r.images_per_s)}x), wall {base.total_s:.1f} s against "
                  f"{r.total_s:.1f} s")


def _ratio(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "-"  # "-": no naive run to compare with


def print_stages(stages: list[dict]) -> None:
    """The per-stage probes: preprocessing alone (one thread) and the forward alone, per batch size."""
    ok = [p for p in stages if "error" not in p]
    if not ok:
        return
    batches = sorted({int(b) for p in ok for b in p["forward_images_per_s"]})
    head = ("family", "device", "folder", "seqlen", "preprocess", "prep img/s/core",
            *(f"forward b{b} img/s" for b in batches), "tokens")
    rows = [(p["family"], p["device"], p["folder"], p["seqlen"], p["preprocess"], f"{p['preprocess_images_per_s']:.2f}",
             *(f"{p['forward_images_per_s'].get(str(b), math.nan):.3f}" for b in batches), f"{p['mean_tokens']:.0f}")
            for p in ok]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print()
    for line in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def compare(runs: list[Run], outputs: dict[int, list]) -> list[dict]:
    """Speed-up columns against the naive run of the same device/folder/seqlen, and probability agreement."""
    checks = []
    for i, r in enumerate(runs):
        base = next((j for j, n in enumerate(runs) if n.mode == "naive" and (n.family, n.device, n.folder, n.seqlen)
                     == (r.family, r.device, r.folder, r.seqlen)), None)
        if base is None:
            continue
        r.speedup = r.images_per_s / runs[base].images_per_s
        r.first_result_ratio = r.first_result_s / runs[base].first_result_s
        r.wall_speedup = runs[base].total_s / r.total_s
        if r.mode == "ours":
            checks.append({"family": r.family, "device": r.device, "folder": r.folder, "seqlen": r.seqlen,
                           "batch": r.batch, "against": "naive", "compile": r.compile, "fold": r.fold,
                           **agreement(outputs[base], outputs[i])})
    for i, r in enumerate(runs):  # the fold's own effect: unfolded against folded, same batch
        twin = _twin(runs, r)
        if not r.fold and twin is not None:
            checks.append({"family": r.family, "device": r.device, "folder": r.folder, "seqlen": r.seqlen,
                           "batch": r.batch, "against": "folded", "compile": False, "fold": False,
                           **agreement(outputs[runs.index(twin)], outputs[i])})
    return checks


def load_probes(args: argparse.Namespace, devices: list[str], models: dict[str, str], out: Path) -> dict:
    """{"cpu/naive": ..., "cpu/ours": ...} for JTP-3, {"hydra35/cpu/naive": ..., ...} for Hydra 3.5."""
    probes = {}
    for family, model in models.items():
        for d in devices:
            for kind in ("load-naive", "load-ours"):
                cmd = [sys.executable, str(ROOT / "bench.py"), "--child", kind, "--model", model, "--device", d,
                       "--dtype", args.dtype]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=out, timeout=args.timeout)
                key = f"{d}/{kind[5:]}" if family == "jtp3" else f"{family}/{d}/{kind[5:]}"
                probes[key] = json.loads(done.stdout) if done.returncode == 0 else done.stderr[-500:]
    return probes


def stage_probes(args: argparse.Namespace, devices: list[str], models: dict[str, str], folders: dict[str, Path],
                 out: Path) -> list[dict]:
    """One `--child stages` process per family, device, folder and sequence length."""
    probes = []
    for family, model in models.items():
        for d in devices:
            for folder, path in folders.items():
                for seqlen in args.seqlen:
                    print(f"[stages] {family} {d} {folder} seqlen {seqlen}", file=sys.stderr, flush=True)
                    cmd = [sys.executable, str(ROOT / "bench.py"), "--child", "stages", "--model", model,
                           "--folder", str(path), "--seqlen", str(seqlen), "--device", d, "--dtype", args.dtype,
                           "--batch-size", *map(str, args.batch_size)]
                    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out, timeout=args.timeout)
                    probe = {"family": family, "device": d, "folder": folder, "seqlen": seqlen}
                    probe.update(json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]})
                    probes.append(probe)
    return probes


def run_all(args: argparse.Namespace, runs: list[Run], models: dict[str, str], folders: dict[str, Path],
            peaks: dict, out: Path, report: dict) -> tuple[list[Run], dict[int, list]]:
    """Every run `args.repeat` times, round-robin (so slow phases of a shared machine hit all alike); per run
    the best images/s and the best first-result time are kept."""
    dims, tries, outputs = report["dims"], {}, {}
    for rep in range(args.repeat):
        for i, run in enumerate(runs):
            tokens = folder_tokens(folders[run.folder], run.seqlen)
            report["folders"].setdefault(run.folder, {})[run.seqlen] = sorted(tokens.values())
            print(f"[{rep * len(runs) + i + 1}/{args.repeat * len(runs)}] {run.family} {run.mode}"
                  f"{' -c' if run.compile else ''}{'' if run.fold else ' nofold'} {run.device} {run.folder} "
                  f"seqlen {run.seqlen} batch {run.batch}", file=sys.stderr, flush=True)
            attempt = dataclasses.replace(run)
            rows, facts = execute(run_command(run, models[run.family], folders[run.folder], out), args.timeout, out,
                                  None if run.fold else {"HYDRA_NO_FOLD": "1"})
            measure(attempt, rows, facts, tokens, dims[run.family], peaks[run.device]["bf16"])
            tries.setdefault(i, []).append(attempt)
            outputs.setdefault(i, rows)
    report["attempts"] = [dataclasses.asdict(a) for t in tries.values() for a in t]
    return [best_of(tries[i]) for i in range(len(runs))], outputs


def best_of(attempts: list[Run]) -> Run:
    ok = [a for a in attempts if math.isfinite(a.images_per_s)] or attempts
    best = dataclasses.replace(max(ok, key=lambda a: a.images_per_s if math.isfinite(a.images_per_s) else -1))
    best.first_result_s = min(a.first_result_s for a in ok)
    best.total_s = min(a.total_s for a in ok)
    rss = [a.peak_rss_gb for a in attempts if a.peak_rss_gb is not None]
    best.peak_rss_gb = max(rss) if rss else None
    best.error = "; ".join(a.error for a in attempts if a.error)
    best.repeats = len(attempts)
    return best


def main(args: argparse.Namespace) -> int:
    if args.child == "naive":
        return naive_child(args)
    if args.child == "stages":
        return stages_child(args)
    if args.child:
        return load_child(args)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    models = {f: prepare_model(args, out, f) for f in args.family}
    folders = {f: prepare_folder(out, f, n_images(args, f)) for f in args.folders}
    peaks = {d: {t: matmul_peak(d, t, small=args.tiny) for t in ("bf16", "fp32")} for d in devices}
    report = {"machine": machine_info(devices), "matmul_peak_gflops": peaks, "command": " ".join(sys.argv),
              "models": models, "dims": {f: model_dims(m) for f, m in models.items()}, "folders": {}, "load": {},
              "stages": [], "runs": [], "agreement": []}
    if not args.no_load_probe:
        report["load"] = load_probes(args, devices, models, out)
    if not args.no_stage_probe:
        report["stages"] = stage_probes(args, devices, models, folders, out)
    runs, outputs = run_all(args, plan(args, devices), models, folders, peaks, out, report)
    report["agreement"] = compare(runs, outputs)
    report["runs"] = [dataclasses.asdict(r) for r in runs]
    path = out / f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print_table(runs)
    print_compile(runs)
    for c in report["agreement"]:
        print(f"|dp| {c['family']} {c['device']} {c['folder']} seqlen {c['seqlen']} batch {c['batch']}"
              f"{' -c' if c['compile'] else ''}{'' if c['fold'] else ' nofold'} against {c['against']}: "
              f"mean {c['mean_abs_dp']:.5f}, max {c['max_abs_dp']:.4f} over {c['images']} images")
    print_stages(report["stages"])
    print(f"\n{report['machine']['cpu']}, {report['machine']['date']}; bf16 matmul peak "
          + ", ".join(f"{d} {p['bf16']:.0f} GFLOP/s" for d, p in peaks.items()) + f"\nJSON: {path}")
    return 1 if any(r.error for r in runs) or any("error" in p for p in report["stages"]) else 0


def n_images(args: argparse.Namespace, folder: str) -> int:
    if args.images:
        return args.images
    full = MIXED_IMAGES if folder == "mixed" else UNIFORM_IMAGES
    return full // 4 if args.quick else full


def _finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.seqlen = args.seqlen or [256]
    args.seqlen = args.seqlen or list(SEQLENS)
    args.batch_size = args.batch_size or list(BATCH_SIZES)
    return args


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(_finish_args(build_parser().parse_args())))
