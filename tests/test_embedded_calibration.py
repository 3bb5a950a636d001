"""Hydra 3.5 thresholds from embedded validation counts: metric syntax, the bf16 logit grid, scoring, argmax.

Pure numpy (torch is only used, when installed, as a second opinion on bf16 rounding).

    venv/bin/python -m pytest tests/test_embedded_calibration.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra.calibration.embedded import (
    DEFAULT_METRIC,
    Metric,
    embedded_thresholds,
    parse_metric,
    scores,
    simple_slider,
)
from hydra.calibration.grid import bf16_round, grid_logits, threshold_grid

GRID_FILE = Path("/work/shared/reference-data/hydra35-thresholds-grid99.txt")  # on the build machine only
# Upstream's 99 thresholds (float32 values, printed as float64), from the reference grid.
GRID99 = (
    0.010013570077717304, 0.020023440942168236, 0.030214587226510048, 0.04023794084787369, 0.05033063143491745,
    0.060086652636528015, 0.06954174488782883, 0.08035746961832047, 0.09009299427270889, 0.09947021305561066,
    0.10970577597618103, 0.1200256198644638, 0.13028541207313538, 0.14033626019954681, 0.15002882480621338,
    0.16026602685451508, 0.169956237077713, 0.18010666966438293, 0.18952108919620514, 0.200557678937912,
    0.20946967601776123, 0.22000709176063538, 0.22953519225120544, 0.23934932053089142, 0.24944725632667542,
    0.2598256468772888, 0.26971012353897095, 0.2798284888267517, 0.2901756167411804, 0.2999247610569,
    0.30985841155052185, 0.3199707567691803, 0.3302551507949829, 0.33982762694358826, 0.35042136907577515,
    0.36026397347450256, 0.37022536993026733, 0.37983831763267517, 0.3900110721588135, 0.39981165528297424,
    0.4101654887199402, 0.4201236963272095, 0.43014734983444214, 0.4399879574775696, 0.45011767745018005,
    0.46004632115364075, 0.4700067341327667, 0.4799911677837372, 0.48999154567718506, 0.5, 0.5100084543228149,
    0.5200088620185852, 0.5299932360649109, 0.5399536490440369, 0.5498823523521423, 0.5600120425224304,
    0.5698526501655579, 0.5798763036727905, 0.5898345112800598, 0.6001883149147034, 0.6099889278411865,
    0.6201616525650024, 0.6297746300697327, 0.6397360563278198, 0.6495786309242249, 0.6601723432540894,
    0.6697448492050171, 0.6800292134284973, 0.6901415586471558, 0.7000752091407776, 0.7098243832588196,
    0.7201715111732483, 0.730289876461029, 0.740174412727356, 0.7505527138710022, 0.7606506943702698,
    0.7704647779464722, 0.7799928784370422, 0.7905303239822388, 0.7994422912597656, 0.8104788661003113,
    0.8198933005332947, 0.8300437331199646, 0.8397339582443237, 0.8499711751937866, 0.859663724899292,
    0.869714617729187, 0.879974365234375, 0.8902942538261414, 0.9005298018455505, 0.9099069833755493,
    0.9196425676345825, 0.9304582476615906, 0.9399133324623108, 0.949669361114502, 0.9597620368003845,
    0.9697853922843933, 0.9799765348434448, 0.9899863600730896,
)
# n = 4 (thresholds 0.2 / 0.4 / 0.6 / 0.8): F1 .305 / .571 / .667 / .455, precision .184 / .444 / .75 / .9375
ROWS = np.array([[[90, 400, 500, 10], [80, 100, 800, 20], [60, 20, 880, 40], [30, 2, 898, 70]]])


@pytest.mark.parametrize("text, expected", [
    ("default", Metric("f", 1.0, 0.1)),
    ("f", Metric("f", 1.0, 0.0)),
    ("csi", Metric("csi", 1.0, 0.0)),
    ("f1.0@0.1", Metric("f", 1.0, 0.1)),
    ("f0.5", Metric("f", 0.5, 0.0)),
    ("f2.0@0.3", Metric("f", 2.0, 0.3)),
    ("csi2.0@0.5", Metric("csi", 2.0, 0.5)),
    ("f@0.25", Metric("f", 1.0, 0.25)),
    ("f10.25@0.0", Metric("f", 10.25, 0.0)),
    ("csi0.0@0.999", Metric("csi", 0.0, 0.999)),
])
def test_parse_metric_valid(text, expected):
    assert parse_metric(text) == expected


@pytest.mark.parametrize("text", [
    "f1", "f1.", "f.5", "csi2", "f1.0@1.0", "f1.0@.1", "f1.0@0", "f1.0@0.", "f@1", "F1.0", "g1.0", "",
    " f1.0", "f1.0 ", "f-1.0", "f1.0@0.1@0.2", "Default", "csi@", "fcsi1.0", "f1e3",
])
def test_parse_metric_invalid_shows_syntax(text):
    with pytest.raises(ValueError, match=r"invalid metric.*\(f\|csi\).*e\.g\. default"):
        parse_metric(text)


@pytest.mark.parametrize("text", ["f1.0@0.1", "f0.5", "csi2.0@0.5", "f10.25", "csi0.001@0.999"])
def test_metric_str_is_canonical_and_round_trips(text):
    assert str(parse_metric(text)) == text
    assert parse_metric(str(parse_metric(text))) == parse_metric(text)


def test_metric_str_normalises_spellings():
    assert str(parse_metric("default")) == DEFAULT_METRIC == "f1.0@0.1"
    assert str(parse_metric("f")) == "f1.0"
    assert str(parse_metric("f1.0@0.0")) == "f1.0"  # a zero floor is no floor
    assert str(parse_metric("f01.50@0.10")) == "f1.5@0.1"


@given(st.floats(0, 100, allow_nan=False), st.floats(0, 0.999, allow_nan=False), st.sampled_from(["f", "csi"]))
def test_metric_str_round_trips_any_value(param, floor, kind):
    m = Metric(kind, param, floor)
    assert parse_metric(str(m)) == m


def test_simple_slider_is_f1_in_the_middle():
    assert simple_slider(0.5) == Metric("f", 1.0, 0.1)
    assert simple_slider(0.0).parameter == 4.0 and simple_slider(1.0).parameter == 0.25


# ---------------------------------------------------------------------------------------------------
# The grid


def test_grid_matches_upstream_exactly():
    grid = threshold_grid(99)
    assert grid.dtype == np.float32 and grid.shape == (99,)
    np.testing.assert_array_equal(grid.astype(np.float64), GRID99)


@pytest.mark.skipif(not GRID_FILE.exists(), reason="reference data not available")
def test_grid_matches_reference_file_exactly():
    ref = np.loadtxt(GRID_FILE)  # index, nominal (i+1)/100, float32 value
    np.testing.assert_array_equal(ref[:, 0], np.arange(1, 100))
    np.testing.assert_array_equal(threshold_grid(99).astype(np.float64), ref[:, 2])


def test_grid_known_values():
    grid = threshold_grid(99).astype(np.float64)
    for i, v in [(0, 0.0100135701), (1, 0.0200234409), (2, 0.0302145872), (49, 0.5), (59, 0.600188315),
                 (98, 0.98998636)]:
        assert grid[i] == pytest.approx(v, abs=5e-10)
    assert threshold_grid(4).astype(np.float64)[1:3] == pytest.approx([0.3998116553, 0.6001883149], abs=1e-10)
    assert float(threshold_grid(3)[0]) == pytest.approx(0.2494472563, abs=1e-10)
    assert float(threshold_grid(5)[0]) == pytest.approx(0.1666754037, abs=1e-10)


def test_grid_is_ascending_and_symmetric():
    for n in (1, 2, 3, 99, 1000):
        g = threshold_grid(n).astype(np.float64)
        # bf16 keeps 8 significant bits of the logit, so a fine grid has repeated values
        assert ((np.diff(g) > 0) if n <= 99 else (np.diff(g) >= 0)).all() and 0 < g[0] and g[-1] < 1
        np.testing.assert_allclose(g + g[::-1], 1.0, atol=1e-7)


def test_bf16_round_ties_to_even():
    one = np.float32(1.0)
    ulp = 2.0**-7  # bf16 spacing at 1.0
    x = np.array([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2**-20, -(1 + ulp / 2), 0.0, np.inf], dtype=np.float32)
    np.testing.assert_array_equal(bf16_round(x), [one, 1 + 2 * ulp, 1 + ulp, -one, 0.0, np.inf])


def test_bf16_round_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    bits[:1000] = (bits[:1000] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exact ties
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    np.testing.assert_array_equal(bf16_round(x), torch.from_numpy(x).bfloat16().float().numpy())


def test_grid_matches_torch_within_two_ulps():
    """Same logits as torch's float32 logit + bf16. torch's vectorised CPU sigmoid is a little less accurate
    (up to 2 ulps here); the reference file, which we match exactly, agrees with a correctly rounded exp."""
    torch = pytest.importorskip("torch")
    for n in (3, 4, 99, 5000):
        x = torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)
        logit = torch.logit(x).bfloat16().float()
        np.testing.assert_array_equal(grid_logits(n), logit.numpy())
        ours = threshold_grid(n)
        ulps = np.abs(ours.view(np.int32) - torch.sigmoid(logit).numpy().view(np.int32))
        assert ulps.max() <= 2, n


# ---------------------------------------------------------------------------------------------------
# Scores and thresholds


def test_scores_formulas():
    f1 = scores(ROWS, Metric("f", 1.0))[0]
    np.testing.assert_allclose(f1, [180 / 590, 160 / 280, 120 / 180, 60 / 132])
    csi2 = scores(ROWS, Metric("csi", 2.0))[0]
    np.testing.assert_allclose(csi2, [90 / 900, 80 / 300, 60 / 140, 30 / 104])
    f05_floor = scores(ROWS, Metric("f", 0.5, 0.5))[0]
    assert f05_floor[:2].tolist() == [-math.inf, -math.inf]
    np.testing.assert_allclose(f05_floor[2:], [1.25 * 60 / (1.25 * 60 + 20 + 0.25 * 40), 1.25 * 30 / (37.5 + 2 + 17.5)])


def test_scores_nan_is_zero_and_undefined_precision_fails_the_floor():
    empty = np.array([[[0, 0, 100, 0], [0, 0, 100, 5]]])
    assert scores(empty, Metric("f", 1.0)).tolist() == [[0.0, 0.0]]
    assert scores(empty, Metric("csi", 1.0)).tolist() == [[0.0, 0.0]]
    assert scores(empty, Metric("f", 1.0, 0.1)).tolist() == [[-math.inf, -math.inf]]


@pytest.mark.parametrize("metric, expected", [
    ("f1.0@0.1", 0.6001883149), ("default", 0.6001883149), ("f1.0", 0.6001883149), ("f0.5", 0.6001883149),
    ("csi1.0", 0.6001883149), ("csi2.0@0.5", 0.6001883149), ("f2.0@0.3", 0.3998116553),
    ("f1.0@0.9", 0.7994422913),
])
def test_upstream_vectors(metric, expected):
    t = embedded_thresholds(ROWS, metric)
    assert t.dtype == np.float64 and t.shape == (1,)
    assert t[0] == pytest.approx(expected, abs=1e-10)
    assert t[0] in threshold_grid(4).astype(np.float64)  # exactly a float32 grid value


def test_identical_rows_take_the_lowest_threshold():
    rows = np.tile(np.array([10, 5, 80, 5]), (1, 5, 1))
    assert embedded_thresholds(rows, "f1.0@0.1")[0] == pytest.approx(0.1666754037, abs=1e-10)


def test_no_true_positives():
    rows = np.array([[[0, 50, 900, 50], [0, 10, 940, 50], [0, 0, 950, 50]]])
    for floored in ("f1.0@0.1", "csi1.0@0.01", "f2.0@0.5"):
        assert embedded_thresholds(rows, floored)[0] == math.inf
    # without a floor every score is 0: the first (lowest) threshold wins, an upstream quirk
    assert embedded_thresholds(rows, "f1.0")[0] == pytest.approx(0.2494472563, abs=1e-10)


def test_decision_with_float32_probabilities_matches_float32_comparison():
    grid32 = threshold_grid(99)
    rows = np.zeros((99, 99, 4), dtype=np.int64)
    rows[np.arange(99), np.arange(99)] = [10, 0, 90, 0]  # tag i is perfect at row i only
    thresholds = embedded_thresholds(rows, "f1.0@0.1")
    np.testing.assert_array_equal(thresholds, grid32.astype(np.float64))
    for t32, t in zip(grid32, thresholds):
        p = np.array([np.nextafter(t32, np.float32(0)), t32, np.nextafter(t32, np.float32(1))], dtype=np.float32)
        assert (p >= t).tolist() == (p >= t32).tolist() == [False, True, True]


def test_accepts_float_counts_and_many_tags():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 50, size=(64, 99, 4))
    a = embedded_thresholds(counts, "f1.0@0.1")
    b = embedded_thresholds(counts.astype(np.float32), parse_metric("f1.0@0.1"))
    np.testing.assert_array_equal(a, b)
    s = scores(counts, parse_metric("f1.0@0.1"))
    for t in range(64):
        best = s[t].max()
        want = math.inf if best == -math.inf else float(threshold_grid(99)[list(s[t]).index(best)])
        assert a[t] == want


@settings(max_examples=200)
@given(st.lists(st.tuples(*[st.integers(0, 30)] * 4), min_size=1, max_size=6),
       st.sampled_from(["f", "f0.5", "f2.0@0.3", "csi", "csi2.0@0.5", "f1.0@0.1"]))
def test_threshold_is_first_best_row_by_exact_arithmetic(rows, text):
    """Against exact rational arithmetic (fractions), first maximum, -inf -> +inf."""
    from fractions import Fraction

    m = parse_metric(text)
    beta2 = Fraction(m.parameter) ** 2
    floor = Fraction(str(m.min_precision))

    def score(tp, fp, tn, fn):
        if floor > 0 and (tp + fp == 0 or Fraction(tp, tp + fp) < floor):
            return None
        num, den = ((1 + beta2) * tp, (1 + beta2) * tp + fp + beta2 * fn) if m.kind == "f" else \
            (Fraction(tp), tp + Fraction(m.parameter) * fp + fn)
        return Fraction(0) if den == 0 else num / den

    s = [score(*r) for r in rows]
    valid = [x for x in s if x is not None]
    got = embedded_thresholds(np.array([rows]), m)[0]
    if not valid:
        assert got == math.inf
    else:
        assert got == float(threshold_grid(len(rows))[s.index(max(valid))])


def test_runs_without_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import hydra.calibration.embedded as e\n"
            "print(e.embedded_thresholds(e.np.zeros((1, 3, 4)), 'f1.0') > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[ True]"
