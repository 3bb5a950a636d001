"""Calibration on your own images: one pass of the model over a tagged folder, and the merge with fallback data.

`calibrate.py --from-dataset DIR` runs the model once over a folder of tagged images, counts tp/fp/tn/fn per
tag at the 99 thresholds 0.01..0.99 (`hydra.calibration.thresholds.counts_from_scores`), and calibrates from those
counts exactly as from RedRocket's validation data. The true tags come from sidecar files
(`hydra.calibration.sidecars`, which states the rules) and the probabilities from a resumable cache
(`hydra.calibration.cache`); this module runs the pass and merges the dataset's curves with fallback data.
An image that cannot be read is reported in the one-line format and skipped, as in inference.py.

Shapes: N = images, T = model tags.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hydra.bulk.run import iter_images, run_bulk
from hydra.calibration.cache import CacheSink, ProbabilityCache, cache_folder, file_stat, key_info
from hydra.calibration.grid import VALIDATION_THRESHOLDS
from hydra.calibration.sidecars import GroundTruth, TagMatcher, ground_truth, read_sidecars
from hydra.calibration.thresholds import Curve, counts_from_scores, curves_from_counts
from hydra.common import log

if TYPE_CHECKING:
    from hydra.tagger import Tagger, TaggerSpec

_COUNT_COLUMNS = 512  # tags counted at a time (bounds the float64 copy for large N)


def load_model(spec: TaggerSpec) -> Tagger:
    log(f"Loading '{spec.path}' ...", end="")
    tagger = spec.load()
    log(f" {len(tagger.labels)} tags ({tagger.device}, {tagger.dtype_reason})")
    return tagger


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

    stats = {p: file_stat(p) for p in truth.images}
    rows = {p: row for p in truth.images if (row := cache.get(p, stats[p])) is not None}
    todo = [p for p in truth.images if p not in rows]
    log(f"Probabilities: {len(rows)} cached, {len(todo)} to compute (cache '{cache.folder}').")
    failed_images = 0
    if todo:
        tagger = tagger or load_model(model)
        assert tagger.labels == labels, "cache folder key collision"  # the key hashes the model files
        sink = CacheSink(cache, stats)
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
