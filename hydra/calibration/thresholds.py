"""Per-tag thresholds from validation confusion counts: the pure core of `calibrate.py`.

The validation data (`data/jtp-3-hydra-val.csv`; format in docs/formats.md, read by
`hydra.calibration.validation_csv`) has one row per (tag, threshold) with the confusion counts on RedRocket's
validation set when a tag is predicted at p >= threshold. For every tag we score each candidate threshold
with a metric, drop candidates that fail the filters, and keep the best one (metrics and the selection rule:
docs/calibration.md). Extensions carry the same counts in their `validation` tensor, taken at the trainer's
bf16 logit grid (`hydra.calibration.grid`).

`counts_from_scores` + `write_validation_csv` produce that file format from your own scored, labelled
images, so "calibrate on your own images" is: scores -> counts -> curves -> `select_thresholds`
(`hydra/calibration/dataset.py` does this for a folder of tagged images: `calibrate.py --from-dataset`).

Pure numpy; matplotlib is imported only by `plot_curve`.
Shapes: K = candidate thresholds of one tag, T = tags, N = images.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TextIO

import numpy as np

from hydra.calibration.grid import VALIDATION_THRESHOLDS, extension_thresholds

# calibrate.py's defaults, upstream's (docs/calibration.md). The odd-looking 0.098 / 0.198 are upstream's
# values, kept as-is so that the same command gives the same calibration.
DEFAULT_METRIC = "cti"
DEFAULT_MIN_PRECISION = 0.098
DEFAULT_MIN_RECALL = 0.198
DEFAULT_EPSILON = -0.0001  # so that after the %.4f rounding, p == the chosen candidate still passes

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Curve:
    """Confusion counts of one tag at several candidate thresholds.

    Attributes:
        thresholds: (K,) float64 probabilities in [0, 1], ascending.
        counts: (K, 4) float64 columns tp, fp, tn, fn, counted over images with p >= threshold.
    """

    thresholds: np.ndarray
    counts: np.ndarray


class Choice(NamedTuple):
    """The calibrated threshold of one tag."""

    threshold: float  # the value written: candidate + epsilon, clamped to [0, 1]
    score: float  # the metric at the candidate
    candidate: float  # the validation threshold that won


# ---------------------------------------------------------------------------------------------------
# Counting on your own images


def counts_from_scores(
    probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray = VALIDATION_THRESHOLDS,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Confusion counts per tag and threshold, predicting a tag when p >= threshold (as inference does).

    Args:
        probs: (N, T) probabilities in [0, 1].
        labels: (N, T) bool ground truth.
        thresholds: (K,) thresholds; comparisons are done in float64 (float32 probabilities are exact).
        valid: optional (N, T) bool; where False the image does not count for that tag (unknown label).

    Returns:
        (T, K, 4) int64 counts tp, fp, tn, fn.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    valid = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
    assert probs.ndim == 2 and probs.shape == labels.shape == valid.shape, (
        probs.shape, labels.shape, valid.shape)
    assert thresholds.ndim == 1, thresholds.shape
    assert not np.isnan(probs).any(), "probabilities contain NaN"
    out = np.empty((probs.shape[1], len(thresholds), 4), np.int64)  # (T, K, 4)
    for j in range(probs.shape[1]):
        p, y, ok = probs[:, j], labels[:, j], valid[:, j]
        pos, neg = np.sort(p[y & ok]), np.sort(p[~y & ok])
        # searchsorted(side="left") = how many are < t, so the rest are >= t
        tp = len(pos) - np.searchsorted(pos, thresholds, side="left")  # (K,)
        fp = len(neg) - np.searchsorted(neg, thresholds, side="left")  # (K,)
        out[j] = np.stack([tp, fp, len(neg) - fp, len(pos) - tp], 1)
    return out


def curves_from_counts(
    tags: Sequence[str], counts: np.ndarray, thresholds: np.ndarray = VALIDATION_THRESHOLDS,
) -> dict[str, Curve]:
    """Wrap `counts_from_scores` output as tag -> Curve.

    Args:
        tags: T tag names, in the order of the counts' first axis.
        counts: (T, K, 4) tp, fp, tn, fn.
        thresholds: (K,) ascending thresholds the counts were taken at.
    """
    counts = np.asarray(counts, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    assert counts.shape == (len(tags), len(thresholds), 4), (counts.shape, len(tags), thresholds.shape)
    return {tag: Curve(thresholds.copy(), counts[j]) for j, tag in enumerate(tags)}


# ---------------------------------------------------------------------------------------------------
# Metrics (definitions and their 0/0 conventions: docs/calibration.md). Each takes tp, fp, tn, fn arrays of one
# shape and returns scores of that shape.


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # num / den, defined as 0 where num == 0 (upstream's convention; den > 0 whenever num > 0)
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    out = np.zeros(num.shape)
    np.divide(num, den, out=out, where=num != 0)
    return out


def cti(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Critical success index (threat score): TP / (TP + FP + FN), 0 when TP = 0.

    The Jaccard index of predicted and true positives; the default metric and the one the extension
    trainer reports.
    """
    return _ratio(tp, np.add(tp, fp) + fn)


def informedness(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Youden's J (bookmaker informedness): TPR + TNR - 1, each ratio 0 when its numerator is 0."""
    return _ratio(tp, np.add(tp, fn)) + _ratio(tn, np.add(tn, fp)) - 1


def p4(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """P4 metric (Sitarz 2022): 4·TP·TN / (4·TP·TN + (TP + TN)(FP + FN)), 0 when TP·TN = 0."""
    num = 4 * np.multiply(tp, tn, dtype=np.float64)
    return _ratio(num, num + np.add(tp, tn) * np.add(fp, fn))


def f_beta(beta: float) -> Metric:
    """F-beta as upstream computes it: CTI of (TP·(1+β²), FP, TN, FN·β²).

    That equals (1+β²)TP / ((1+β²)TP + FP + β²FN): β > 1 favours recall, β < 1 precision.
    """
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"F-beta needs a beta > 0, got {beta}")
    b2 = beta * beta
    return lambda tp, fp, tn, fn: cti(np.multiply(tp, 1 + b2), fp, tn, np.multiply(fn, b2))


def custom_metric(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """`-m custom`: write your own score here (arrays in, same-shape array out; higher is better)."""
    raise NotImplementedError("the 'custom' metric is a placeholder: write your own score "
                              "in custom_metric() in hydra/calibration/thresholds.py")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


METRIC_CHOICES = ("cti (or ts, csi), csi<w> (CSI with false positives weighted w), j (or bmi), p4, f<beta> such "
                  "as f1, f0.5 or f2 (f alone = f1), custom; any of them with @P for a precision floor P")


def get_metric(name: str) -> Metric:
    """The metric function for a `-m` name (case-insensitive).

    Raises:
        ValueError: for an unknown name or an F-beta with beta <= 0, listing the valid choices.
    """
    key = name.lower()
    named: dict[str, Metric] = {"cti": cti, "ts": cti, "csi": cti, "j": informedness, "bmi": informedness,
                                "p4": p4, "custom": custom_metric}
    if key in named:
        return named[key]
    if key.startswith("f") and _is_float(key[1:]):
        beta = float(key[1:])
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"metric {name!r}: F-beta needs a beta > 0 (e.g. f1, f0.5, f2)")
        return f_beta(beta)
    if key.startswith("csi") and _is_float(key[3:]):
        w = float(key[3:])
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"metric {name!r}: the false-positive weight must be >= 0 (e.g. csi1.0, csi2.0)")
        return lambda tp, fp, tn, fn: cti(tp, np.multiply(fp, w), tn, fn)  # TP / (TP + w FP + FN)
    raise ValueError(f"unknown metric {name!r}; choose one of: {METRIC_CHOICES}")


# ---------------------------------------------------------------------------------------------------
# Selection (upstream calibrate.py's rule; docs/calibration.md)


def split_floor(metric: str) -> tuple[str, float | None]:
    """`f1.0@0.1` -> ("f1.0", 0.1): upstream Hydra 3.5's metric syntax puts the precision floor after `@`.

    Raises:
        ValueError: the floor is not a number in [0, 1).
    """
    name, at, floor = metric.partition("@")
    if not at:
        return name, None
    try:
        value = float(floor)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise ValueError(f"metric {metric!r}: the precision floor after '@' must be a number from 0 to below 1")
    return name, value


def candidate_mask(
    thresholds: np.ndarray, counts: np.ndarray, scores: np.ndarray, *,
    min_score: float | None = None, threshold_range: tuple[float, float] | None = None,
    min_precision: float = DEFAULT_MIN_PRECISION, min_recall: float = DEFAULT_MIN_RECALL,
) -> np.ndarray:
    """Which candidates pass the filters.

    Args:
        thresholds: (K,) candidate thresholds.
        counts: (K, 4) tp, fp, tn, fn.
        scores: (K,) metric values.
        min_score: keep score >= this (None = no filter).
        threshold_range: keep MIN <= threshold <= MAX (None = no filter).
        min_precision, min_recall: keep TP/(TP+FP) >= P and TP/(TP+FN) >= R. A candidate with TP = 0
            passes only if both are <= 0 (upstream's rule: precision and recall are not defined there).

    Returns:
        (K,) bool.
    """
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 3]
    keep = np.ones(len(thresholds), bool)
    if min_score is not None:
        keep &= scores >= min_score
    if threshold_range is not None:
        keep &= (thresholds >= threshold_range[0]) & (thresholds <= threshold_range[1])
    hit = tp > 0
    safe_tp = np.where(hit, tp, 1.0)  # avoids 0/0 in rows that np.where discards anyway
    pr_ok = (safe_tp / (safe_tp + fp) >= min_precision) & (safe_tp / (safe_tp + fn) >= min_recall)
    return keep & np.where(hit, pr_ok, min_precision <= 0 and min_recall <= 0)


def select_thresholds(
    curves: Mapping[str, Curve], metric: str | Metric = DEFAULT_METRIC, *,
    min_score: float | None = None, threshold_range: tuple[float, float] | None = None,
    min_precision: float = DEFAULT_MIN_PRECISION, min_recall: float = DEFAULT_MIN_RECALL,
    exclude: Iterable[str] = (), epsilon: float = DEFAULT_EPSILON,
) -> dict[str, Choice]:
    """Choose each tag's threshold: the surviving candidate that maximises (score, -threshold).

    So the best score wins and ties go to the lowest threshold. Tags without a surviving candidate are
    left out (inference then never outputs them when this calibration is used).

    Args:
        curves: tag -> Curve.
        metric: a `-m` name or a metric function.
        min_score, threshold_range, min_precision, min_recall: filters, see `candidate_mask`.
        exclude: tags to leave out entirely (exact e621 spelling).
        epsilon: added to each chosen threshold, which is then clamped to [0, 1].

    Returns:
        tag -> Choice, sorted by tag.
    """
    score_fn = get_metric(metric) if isinstance(metric, str) else metric
    excluded = set(exclude)
    tags = [tag for tag in curves if tag not in excluded and len(curves[tag].thresholds)]
    if not tags:
        return {}
    thresholds = np.concatenate([curves[t].thresholds for t in tags])  # (R,)
    counts = np.concatenate([curves[t].counts for t in tags])  # (R, 4)
    owner = np.repeat(np.arange(len(tags)), [len(curves[t].thresholds) for t in tags])  # (R,)
    scores = np.broadcast_to(np.asarray(score_fn(*counts.T), np.float64), owner.shape)  # (R,)
    keep = np.flatnonzero(candidate_mask(thresholds, counts, scores, min_score=min_score,
                                         threshold_range=threshold_range, min_precision=min_precision,
                                         min_recall=min_recall))
    # sort survivors by tag, then score descending, then threshold ascending; the first row of each tag wins
    order = keep[np.lexsort((thresholds[keep], -scores[keep], owner[keep]))]
    first = np.ones(len(order), bool)
    first[1:] = owner[order[1:]] != owner[order[:-1]]
    choices = {}
    for i in order[first].tolist():
        thr = float(thresholds[i])
        choices[tags[owner[i]]] = Choice(min(max(thr + epsilon, 0.0), 1.0), float(scores[i]), thr)
    return dict(sorted(choices.items()))


def write_calibration(file: TextIO, choices: Mapping[str, Choice], metric: str) -> None:
    """Write the calibration CSV: header `tag,threshold,<metric lower-cased>`, rows sorted by tag, `%.4f`.

    Args:
        file: a text file opened with `newline=""` and UTF-8 (csv default dialect: CRLF rows).
        choices: tag -> Choice from `select_thresholds`.
        metric: the metric name as the user typed it.
    """
    writer = csv.writer(file)
    writer.writerow(["tag", "threshold", metric.lower()])
    for tag in sorted(choices):
        writer.writerow([tag, f"{choices[tag].threshold:.4f}", f"{choices[tag].score:.4f}"])


# ---------------------------------------------------------------------------------------------------
# Extensions: an extension's label replaces any CSV entry of that tag (docs/calibration.md)


def extension_curve(validation: Any) -> Curve:
    """Curve of an extension's `validation` counts, (T_v, 4) tp, fp, tn, fn (torch tensor or array)."""
    if hasattr(validation, "detach"):
        validation = validation.detach().cpu().double().numpy()
    counts = np.asarray(validation, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != 4 or not len(counts):
        raise ValueError(f"extension validation counts must have shape (T, 4), got {counts.shape}")
    return Curve(extension_thresholds(len(counts)), counts)


def add_extensions(
    curves: Mapping[str, Curve], extensions: Iterable[Any], log: Callable[[str], None] | None = None,
    rename: Callable[[str], str] | None = None,
) -> dict[str, Curve]:
    """Add (or replace) the curves of extension tags.

    Args:
        curves: tag -> Curve from the validation CSV.
        extensions: objects with `path`, `label` and `validation` (None or (T_v, 4)), e.g.
            `hydra.models.extensions.Extension`.
        log: where to report which extensions are used or skipped (default: stderr).
        rename: the family's caption rename (JTP-3: vulva -> pussy); an extension tag it makes equal to another
            tag of the data (`big_vulva`, `big_pussy`) is refused, as inference refuses it.

    Returns:
        A new tag -> Curve; an extension's label replaces any CSV curve of that tag.

    Raises:
        ValueError: when two extensions have the same label, or (with `rename`) one gets another tag's name.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out, seen = dict(curves), {}
    renamed = {rename(tag): tag for tag in reversed(list(curves))} if rename is not None else {}
    for ext in extensions:
        if ext.label in seen:
            raise ValueError(f"extensions '{seen[ext.label]}' and '{ext.path}' both define the tag "
                             f"'{ext.label}'; remove one of them")
        seen[ext.label] = ext.path
        if rename is not None and (other := renamed.setdefault(rename(ext.label), ext.label)) != ext.label \
                and ext.label not in curves:
            raise ValueError(f"{ext.path}: tag '{ext.label}' is written '{rename(ext.label)}' in captions and CSV "
                             f"columns, as is the tag '{other}' of the validation data or another extension; name "
                             f"it '{rename(ext.label)}' to replace that tag, or choose another name")
        if ext.validation is None:
            log(f"Skipping extension '{ext.path}' (tag '{ext.label}'): it has no validation data.")
            continue
        out[ext.label] = extension_curve(ext.validation)
        log(f"Calibrating tag '{ext.label}' from extension '{ext.path}'.")
    return out


# ---------------------------------------------------------------------------------------------------
# Plots


def plot_curve(path: str, tag: str, curve: Curve, metric: str, choice: Choice | None = None) -> None:
    """Save a PNG of precision, recall and the metric against the threshold, marking the chosen threshold.

    Args:
        path: output .png path.
        tag: the tag name (title).
        curve: its validation curve.
        metric: the metric name as typed (legend).
        choice: the chosen threshold, or None when the tag got none.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state; PNGs render with Agg

    tp, fp, _, fn = curve.counts.T
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / (tp + fp), tp / (tp + fn)  # NaN where undefined: gaps in the plot
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot(curve.thresholds, precision, label="precision")
    ax.plot(curve.thresholds, recall, label="recall")
    ax.plot(curve.thresholds, get_metric(metric)(*curve.counts.T), label=metric.lower(), linewidth=2)
    if choice is None:
        ax.set_title(f"{tag} (no threshold passed the filters)")
    else:
        ax.axvline(choice.threshold, color="black", linestyle="--", linewidth=1,
                   label=f"threshold {choice.threshold:.4f}")
        ax.plot([choice.candidate], [choice.score], "o", color="black")
        ax.set_title(f"{tag}: {metric.lower()} {choice.score:.4f} at {choice.threshold:.4f}")
    ax.set(xlabel="threshold (probability)", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path)
