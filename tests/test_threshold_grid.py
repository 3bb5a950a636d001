"""The one bf16 logit threshold grid (hydra/calibration/grid.py) and the one CTI, shared by training and calibration.

Covers: the grid is bf16(logit(i / (n + 1))), ascending, and what the extension trainer validated at (its
former torch.linspace definition, bit for bit at the default n = 99); extension calibration and Hydra 3.5
calibration replay the trainer's grid; the trainer's best CTI equals calibration's `cti` maximum, with
TP = 0 rows scoring 0 and ties going to the lowest threshold. The grid module is torch-free.

Run: venv/bin/python -m pytest tests/test_threshold_grid.py -q
"""

import subprocess
import sys

import numpy as np
import pytest

from hydra.calibration import thresholds as cal
from hydra.calibration.grid import bf16_round, extension_thresholds, grid_logits, threshold_grid
from hydra.calibration.thresholds import Curve


def test_grid_is_bf16_logits_of_i_over_n_plus_1():
    i = np.arange(1, 100, dtype=np.float64)
    want = bf16_round(np.log(i / (100 - i)).astype(np.float32))  # float64 logit(i / 100), then bf16
    got = grid_logits(99)
    assert got.dtype == np.float32 and got.shape == (99,)
    np.testing.assert_array_equal(got, want)
    assert got[49] == 0.0 and np.array_equal(bf16_round(got), got)  # bf16 values already


@pytest.mark.parametrize("n", [1, 2, 3, 13, 99])
def test_grid_is_strictly_ascending_and_centred(n):
    g = grid_logits(n).astype(np.float64)
    assert (np.diff(g) > 0).all() and np.isfinite(g).all()
    # logit(1 - x) = -logit(x); exact for these n (a rounded float32 quotient can cost a bf16 ulp, e.g. n = 98)
    np.testing.assert_array_equal(g, -g[::-1])


def test_probability_grids_are_the_sigmoid_of_the_one_logit_grid():
    for n in (3, 13, 99):
        p64 = 1 / (1 + np.exp(-grid_logits(n).astype(np.float64)))
        np.testing.assert_array_equal(extension_thresholds(n), p64)
        np.testing.assert_allclose(threshold_grid(n), p64, rtol=0, atol=1e-7)  # Hydra 3.5's float32 sigmoid


def test_training_validates_at_the_grid_calibration_replays():
    torch = pytest.importorskip("torch")
    from hydra.train import loop

    for n in (1, 3, 13, 99, 250):
        t = loop.validation_thresholds(n)
        assert t.dtype == torch.bfloat16 and t.shape == (n,)
        np.testing.assert_array_equal(t.float().numpy(), grid_logits(n))
        # the same probabilities as torch's float64 sigmoid, up to its last bit
        np.testing.assert_allclose(extension_thresholds(n), torch.sigmoid(t.double()).numpy(), rtol=0, atol=1e-15)
    # the trainer's earlier torch.linspace grid, which upstream's trainer writes, at the default -T 99
    upstream = torch.logit(torch.linspace(0, 1, 101)[1:-1]).to(torch.bfloat16)
    assert torch.equal(loop.validation_thresholds(99), upstream)


# rows tp, fp, tn, fn at 5 ascending thresholds; CTI = 0 (tp = 0), 0.4, 0.5, 0.5 (tie: lower wins), 0 (0/0)
COUNTS = np.array([[0, 5, 10, 3], [2, 2, 10, 1], [3, 3, 9, 0], [2, 1, 12, 1], [0, 0, 15, 0]])


def test_cti_is_zero_where_tp_is_zero():
    np.testing.assert_array_equal(cal.cti(*COUNTS.T), [0.0, 0.4, 0.5, 0.5, 0.0])


def test_best_cti_is_the_calibration_cti_maximum():
    torch = pytest.importorskip("torch")
    from hydra.train import loop

    thresholds = loop.validation_thresholds(len(COUNTS))
    best, thr = loop.best_cti(torch.from_numpy(COUNTS).to(torch.int32), thresholds)
    assert best == float(cal.cti(*COUNTS.T).max()) == 0.5
    assert thr == pytest.approx(float(extension_thresholds(5)[2]), abs=1e-7)  # the first of the tied rows
    # the same choice through calibration's selection, with its filters off
    choice = cal.select_thresholds({"t": Curve(extension_thresholds(5), COUNTS.astype(np.float64))}, "cti",
                                   min_precision=0, min_recall=0, epsilon=0)["t"]
    assert choice.score == best and choice.candidate == pytest.approx(thr, abs=1e-7)


def test_best_cti_without_any_true_positive_is_zero_at_the_lowest_threshold():
    torch = pytest.importorskip("torch")
    from hydra.train import loop

    counts = torch.tensor([[0, 4, 6, 2], [0, 1, 9, 2], [0, 0, 10, 2]], dtype=torch.int32)
    thresholds = loop.validation_thresholds(3)
    assert loop.best_cti(counts, thresholds) == (0.0, float(torch.sigmoid(thresholds[0].float())))


def test_grid_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import hydra.calibration.grid, hydra.calibration.thresholds, hydra.calibration.validation_csv\n"
            "print(hydra.calibration.grid.grid_logits(3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("[")
