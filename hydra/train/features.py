"""The extension trainer's workspace and feature cache.

A training workspace is `<dir>/<tag_dir>/positive|negative` (+ `checkpoints`). Because the backbone is frozen,
each image's final-LayerNorm token features are computed once and cached in bf16 beside it, in
`<folder>/_cache/<cache_tag>__<name>.safetensors`; an epoch then only runs the head (hydra/train/loop.py).
The images go through the model family's own preprocessing (JTP-3: Pillow, Hydra 3.5: libvips), and
features of different models must not share a cache tag (train_extension.py defaults it to the family name).

Shape legend: N = valid tokens of one image, D = backbone width, B = images, S = tokens (padded).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from hydra.bulk.loader import ImageLoader, LoadError
from hydra.bulk.run import report
from hydra.images.naflex import DEFAULT_SEQLEN, JTP3Preprocess, collate
from hydra.models.checkpoint import CheckpointError, load_tensors, save_safetensors
from hydra.models.naflex import NaFlexTagModel
from hydra.tags.names import check_tag_name

POSITIVE, NEGATIVE = "positive", "negative"
CACHE_DIR = "_cache"
SKIPPED_SUFFIXES = (".txt", ".csv")  # captions and notes next to the images are not training data


# ---------------------------------------------------------------------------------------------------
# Workspace


def check_tag(tag: str) -> str:
    """The tag's e621 spelling, if build_extension.py will accept it (hydra/tags/names.py), else ValueError.

    Spaces are read as underscores, as upstream's trainer does for the folder name (`my tag` trains
    `train/my_tag`): the checkpoint does not record the tag, so what matters is that `my_tag` can be built.
    Anything the builder refuses for another reason is refused here with the builder's message, before hours
    of training rather than after.
    """
    return check_tag_name(tag.replace(" ", "_"), "TAG")


def tag_dir_name(tag: str) -> str:
    """The tag's folder name: spaces, '/' and '.' become '_' (e.g. `my_tag_(custom)` stays as it is)."""
    return tag.replace(" ", "_").replace("/", "_").replace(".", "_")


def list_images(folder: str | os.PathLike) -> list[str]:
    """Regular files directly inside `folder`, sorted; dot files, `.txt` and `.csv` are skipped."""
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.is_file() and not e.name.startswith(".")
                      and not e.name.lower().endswith(SKIPPED_SUFFIXES))


@dataclass(frozen=True)
class Workspace:
    """`<dir>/<tag_dir>/positive`, `negative` and `checkpoints`."""

    root: str  # <dir>/<tag_dir>

    @classmethod
    def for_tag(cls, folder: str | os.PathLike, tag: str) -> Workspace:
        root = os.path.join(os.fspath(folder), tag_dir_name(check_tag(tag)))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data directory '{root}' does not exist; create '{root}/{POSITIVE}' and "
                                    f"'{root}/{NEGATIVE}' and put the example images there")
        for sub in (POSITIVE, NEGATIVE):
            if not os.path.isdir(os.path.join(root, sub)):
                raise FileNotFoundError(f"'{os.path.join(root, sub)}' does not exist")
        return cls(root)

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    def images(self) -> list[tuple[str, int]]:
        """(path, label) for every image: 1 = positive, 0 = negative."""
        return [(p, label) for sub, label in ((POSITIVE, 1), (NEGATIVE, 0))
                for p in list_images(os.path.join(self.root, sub))]


# ---------------------------------------------------------------------------------------------------
# Feature cache


def check_cache_tag(cache_tag: str) -> str:
    if not cache_tag or cache_tag.startswith(".") or any(c in cache_tag for c in "/\\" + os.sep):
        raise ValueError(f"invalid --cache-tag {cache_tag!r}: it must be non-empty, not start with '.', and "
                         "contain no path separator")
    return cache_tag


def cache_path(image: str, cache_tag: str) -> str:
    """`<folder>/_cache/<cache_tag>__<name>.safetensors` for `<folder>/<name>`."""
    folder, name = os.path.split(image)
    return os.path.join(folder, CACHE_DIR, f"{cache_tag}__{name}.safetensors")


def cache_is_fresh(image: str, cache: str, check_mtime: bool = True) -> bool:
    """The cache file exists and (with `check_mtime`) is not older than the image."""
    try:
        cached = os.stat(cache).st_mtime_ns
    except FileNotFoundError:
        return False
    return not check_mtime or cached >= os.stat(image).st_mtime_ns


def save_features(path: str, features: Tensor) -> None:
    """Write one image's features (N, D) as the single bf16 tensor `features` (atomically)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_safetensors(path, {"features": features.to(torch.bfloat16).cpu()}, {})


def load_features(path: str) -> Tensor:
    """The cached (N, D) bf16 features of one image."""
    tensors, _ = load_tensors(path)
    if "features" not in tensors or tensors["features"].ndim != 2:
        raise CheckpointError(f"{path}: not a feature cache file (expected one tensor 'features' (N, D))")
    return tensors["features"]


@dataclass(frozen=True, order=True)
class Item:
    """One cached training example (sorted by path, then label)."""

    path: str
    label: int   # 1 = positive, 0 = negative
    cache: str


@dataclass
class CacheResult:
    items: list[Item]     # every image with a usable cache file, sorted
    computed: int = 0     # images whose features were computed in this run
    failed: int = 0
    seconds: float = 0.0  # time spent computing features


def build_feature_cache(model: NaFlexTagModel | None, images: Sequence[tuple[str, int]], cache_tag: str, *,
                        preprocess: Callable[[str], dict] | None = None, batch_size: int = 4, workers: int = 0,
                        share_memory: bool = True, rebuild: bool = False, check_mtime: bool = True,
                        seqlen: int = DEFAULT_SEQLEN, progress: bool = True) -> CacheResult:
    """Compute and save the features of every image whose cache is missing or stale.

    Images are decoded by `workers` loader processes and run through the backbone `batch_size` at a time.
    Unreadable images are reported on stderr (one line each) and counted; they are left out.

    Args:
        model: the loaded model (only needed when something has to be computed): a NaFlex tag model
            (`to_device_batch`, `features`).
        images: (path, label) pairs.
        preprocess: the model's picklable image -> sample function (`Tagger.preprocess`); None = JTP-3's
            Pillow pipeline at `seqlen` tokens (upstream's trainer).
        rebuild: recompute even fresh cache files.
        check_mtime: a cache file older than its image is stale (False: existence is enough).

    Returns:
        The usable items and the counts.
    """
    pending = [(p, y) for p, y in images if rebuild or not cache_is_fresh(p, cache_path(p, cache_tag), check_mtime)]
    labels = dict(images)
    done = {p for p, _ in images} - {p for p, _ in pending}
    result = CacheResult(items=[])
    bar = tqdm(total=len(images), initial=len(done), desc="caching", unit="img", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        if pending:
            assert model is not None, "features must be computed, but no model was given"
            preprocess = preprocess or JTP3Preprocess(seqlen)
            with ImageLoader(preprocess, min(workers, len(pending)), share_memory) as loader:
                for batch in _sample_batches(loader.imap([p for p, _ in pending]), batch_size, result, bar):
                    done.update(_cache_batch(model, batch, cache_tag, result, bar))
                    bar.update(len(batch))
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    result.items = sorted(Item(p, labels[p], cache_path(p, cache_tag)) for p in done)
    return result


def _sample_batches(results: Iterator[tuple[str, Any]], size: int, result: CacheResult,
                    bar: tqdm) -> Iterator[list[tuple[str, dict]]]:
    batch: list[tuple[str, dict]] = []
    for path, sample in results:
        if isinstance(sample, LoadError):
            _failed(result, path, str(sample), bar)
            continue
        batch.append((path, sample))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _failed(result: CacheResult, path: str, reason: str, bar: tqdm) -> None:
    result.failed += 1
    report(path, reason, bar)
    bar.update(1)
    bar.set_postfix(failed=result.failed)


@torch.inference_mode()
def _cache_batch(model: NaFlexTagModel, batch: list[tuple[str, dict]], cache_tag: str, result: CacheResult,
                 bar: tqdm) -> list[str]:
    """Run the backbone on one batch and save each image's valid-token features; returns the saved paths."""
    feats = model.features(model.to_device_batch(collate([s for _, s in batch])))  # (B, S, D)
    saved = []
    for i, (path, sample) in enumerate(batch):
        n = len(sample["patches"])  # collate puts the valid tokens first
        try:
            save_features(cache_path(path, cache_tag), feats[i, :n])  # (N, D)
        except OSError as e:
            result.failed += 1
            report(path, f"cannot write its feature cache ({e.strerror or e})", bar)
            continue
        result.computed += 1
        saved.append(path)
    return saved
