"""The candidate threshold grids that validation counts are taken at.

Two grids are in use (docs/calibration.md):
- The bf16 logit grid, bf16(logit(i / (n + 1))) for i = 1..n. The extension trainer validates at these logit
  thresholds (`hydra/train/loop.py`), extension files store their counts at them, and a Hydra 3.5 file's
  `validation` table (T, n, 4) is taken at them. `grid_logits` is the one definition; `threshold_grid` and
  `extension_thresholds` are its probabilities as Hydra 3.5 and as our extension calibration compute them.
- The probability grid 0.01..0.99 (`VALIDATION_THRESHOLDS`) of the validation CSVs we write ourselves.

Pure numpy, no torch: bf16 rounding is done on the float32 bit pattern.
"""

from __future__ import annotations

import numpy as np

# The grid we write for our own validation files: 0.01 .. 0.99, the same 99 points the extension trainer uses
# by default (i / 100 for i = 1..99) and most likely the grid of RedRocket's validation CSV, whose thresholds
# are not published (docs/calibration.md).
VALIDATION_THRESHOLDS = np.arange(1, 100) / 100  # (99,)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (round to nearest, ties to even) and return them as float32.

    Matches torch's `.bfloat16()` for finite values: bf16 is the top 16 bits of a float32, so adding
    0x7FFF plus the lowest kept bit and truncating rounds to nearest with ties to even.
    """
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def grid_logits(n: int) -> np.ndarray:
    """bf16(logit(i / (n + 1))) for i = 1..n, as float32: the float32 quotient, float32 logit, bf16 rounding.

    The quotient is the correctly rounded float32 i / (n + 1), as Hydra 3.5 computes it. The JTP-3 trainer
    writes `torch.linspace(0, 1, n + 2)[1:-1]` instead, whose float32 values come from torch's vectorised
    kernel and are often an ulp off the quotient. After the bf16 rounding the two agree at n = 99 (the
    default); for n <= 200 they differ only for some odd n, in the middle value: 0 here, -6e-8 (the logit of
    a linspace value just below 0.5) there.

    Returns:
        (n,) float32, ascending; every value is exactly representable in bf16.
    """
    x = np.arange(1, n + 1, dtype=np.float32) / np.float32(n + 1)  # exactly rounded quotients
    return bf16_round(np.log(x / (np.float32(1) - x)))  # float32 log(x / (1 - x)), as torch.logit


def threshold_grid(n: int) -> np.ndarray:
    """The n candidate thresholds sigmoid(bf16(logit(i / (n + 1)))), computed in float32 as Hydra 3.5 does.

    exp is rounded once to float32 (computed in float64: the correctly rounded float32 exp), then 1 / (1 + e)
    in float32. This reproduces all 99 values of upstream's grid; numpy's and torch's vectorised float32
    exp/sigmoid are each off by an ulp on some of them.

    Returns:
        (n,) float32, ascending.
    """
    e = np.exp(-grid_logits(n).astype(np.float64)).astype(np.float32)
    return np.float32(1) / (np.float32(1) + e)


def extension_thresholds(n: int) -> np.ndarray:
    """The probabilities behind an extension's `validation` rows: sigmoid(bf16(logit(i / (n + 1)))) in float64.

    The trainer compares logits with the bf16 logit grid, so these are the probability thresholds its counts
    were taken at. Unlike `threshold_grid` the sigmoid is taken in float64: these candidates only lead to a
    calibration CSV threshold (4 decimals), so there is no float32 computation to replay bit for bit.

    Returns:
        (n,) float64, ascending.
    """
    return 1 / (1 + np.exp(-grid_logits(n).astype(np.float64)))
