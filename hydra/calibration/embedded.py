"""Hydra 3.5 thresholds from the validation counts embedded in the model file.

A Hydra 3.5 file carries a `validation` tensor (T, n, 4): for every tag and every candidate threshold
(i + 1) / (n + 1), the confusion counts `[tp, fp, tn, fn]` on RedRocket's validation set. At start-up
upstream scores every row with a metric chosen by `-m METRIC`, keeps the best row per tag, and uses that
row's threshold, rounded through a bf16 logit (`hydra.calibration.grid.threshold_grid`; docs/calibration.md).

Metric syntax (upstream's, exactly): `f` or `csi`, an optional parameter with a decimal point, and an
optional precision floor `@0.xxx`, e.g. `f1.0@0.1` (the default), `f0.5`, `csi2.0@0.5`, `f`; or
`default`. Pure numpy, no torch. Shapes: T = tags, n = candidate thresholds per tag.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from hydra.calibration.grid import threshold_grid

DEFAULT_METRIC = "f1.0@0.1"
METRIC_SYNTAX = "(f|csi)[PARAMETER][@MIN_PRECISION]"
METRIC_EXAMPLES = ("default", "f", "f1.0@0.1", "f0.5", "f2.0@0.3", "csi1.0", "csi2.0@0.5")
_METRIC_RE = re.compile(r"(f|csi)([0-9]+\.[0-9]+)?(?:@(0\.[0-9]+))?")


@dataclass(frozen=True)
class Metric:
    """How a row of confusion counts is scored.

    Attributes:
        kind: "f" (F-beta) or "csi" (critical success index with a false-positive weight).
        parameter: beta for "f", the false-positive weight w for "csi".
        min_precision: rows with a lower (or undefined) precision never win; 0 disables the floor.
    """

    kind: str = "f"
    parameter: float = 1.0
    min_precision: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("f", "csi"):
            raise ValueError(f"unknown metric kind {self.kind!r}; choose 'f' or 'csi'")
        if not (self.parameter >= 0 and 0 <= self.min_precision < 1):
            raise ValueError(f"metric parameter must be >= 0 and min_precision in [0, 1), got {self}")

    def __str__(self) -> str:
        floor = f"@{_decimal(self.min_precision)}" if self.min_precision > 0 else ""
        return f"{self.kind}{_decimal(self.parameter)}{floor}"


def _decimal(x: float) -> str:
    """Positional notation that always has a decimal point and round-trips (1.0, 0.5, 0.00001)."""
    return np.format_float_positional(float(x), trim="0")


def parse_metric(text: str) -> Metric:
    """Parse `-m METRIC` with upstream's syntax.

    The parameter needs a decimal point (`f1` is invalid, `f` means `f1.0`) and the floor must be written
    `0.xxx` (`@1.0` and `@.1` are invalid). `default` is `f1.0@0.1`.

    Raises:
        ValueError: the text does not match; the message shows the syntax and examples.
    """
    m = _METRIC_RE.fullmatch("f1.0@0.1" if text == "default" else text)
    if m is None:
        raise ValueError(f"invalid metric {text!r}: expected {METRIC_SYNTAX}, where PARAMETER has a decimal "
                         f"point and MIN_PRECISION is written 0.xxx; e.g. {', '.join(METRIC_EXAMPLES)}")
    kind, parameter, floor = m.groups()
    return Metric(kind, float(parameter or 1.0), float(floor or 0.0))


def simple_slider(value: float, min_precision: float = 0.1, scale: float = 4.0) -> Metric:
    """Upstream's one-knob metric for its GUI: F-beta with beta = scale^(1 - 2 value).

    value 0.5 is F1; towards 0 recall weighs more (lower thresholds), towards 1 precision does.
    """
    return Metric("f", scale ** (1.0 - 2.0 * value), min_precision)


def scores(counts: np.ndarray, metric: Metric) -> np.ndarray:
    """Score every row of confusion counts.

    F-beta = (1 + b²) TP / ((1 + b²) TP + FP + b² FN); CSI = TP / (TP + w FP + FN); 0/0 scores 0. With a
    floor, rows whose precision TP / (TP + FP) is below it or undefined (TP + FP = 0) score -inf.

    Args:
        counts: (..., n, 4) columns tp, fp, tn, fn (int or float).
        metric: the metric.

    Returns:
        (..., n) float64.
    """
    c = np.asarray(counts, dtype=np.float64)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric.kind == "f":
            b2 = metric.parameter**2
            s = (1 + b2) * tp / ((1 + b2) * tp + fp + b2 * fn)
        else:
            s = tp / (tp + metric.parameter * fp + fn)
        s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
        if metric.min_precision > 0:
            precision = tp / (tp + fp)  # NaN when nothing was predicted positive
            s[~(precision >= metric.min_precision)] = -math.inf
    return s


def embedded_thresholds(counts: np.ndarray, metric: Metric | str = DEFAULT_METRIC) -> np.ndarray:
    """Per-tag thresholds: the grid value of each tag's best-scoring row.

    Ties go to the first (lowest) threshold. A tag whose best score is -inf (no row meets the precision
    floor) gets +inf and is never output. The values are float32 grid values held exactly in float64, so
    `p >= threshold` with a float32 p decides exactly as upstream's float32 comparison.

    Args:
        counts: (T, n, 4) validation counts `[tp, fp, tn, fn]` in model label order.
        metric: a Metric or its text (`parse_metric` syntax).

    Returns:
        (T,) float64.
    """
    if isinstance(metric, str):
        metric = parse_metric(metric)
    counts = np.asarray(counts)
    assert counts.ndim == 3 and counts.shape[1] > 0 and counts.shape[2] == 4, \
        f"expected (T, n >= 1, 4) counts, got {counts.shape}"
    s = scores(counts, metric)  # (T, n)
    best = np.argmax(s, axis=1)  # first maximum
    out = threshold_grid(counts.shape[1]).astype(np.float64)[best]
    out[np.take_along_axis(s, best[:, None], axis=1)[:, 0] == -math.inf] = math.inf
    return out
