"""Tests for hydra/calibration/thresholds.py and validation_csv.py: metrics, CSV parsing, selection, counting.

Covers: every metric on hand-computed counts (and its zero conventions); line-numbered CSV errors;
every selection rule on a 3-candidate tag whose winners were worked out by hand; a property test that
the choice is the best allowed candidate; the calibration CSV byte for byte; counts_from_scores and the
validation CSV writer; extension thresholds (bf16-rounded logits) and merging. The extension-file test
at the end needs torch and safetensors; everything before it is pure numpy.

Run: venv/bin/python -m pytest tests/test_calibration.py -q
"""

import io
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra.calibration import thresholds as cal
from hydra.calibration import validation_csv
from hydra.calibration.grid import VALIDATION_THRESHOLDS, extension_thresholds
from hydra.calibration.thresholds import Curve
from hydra.calibration.validation_csv import read_validation_csv, write_validation_csv

REPO = Path(__file__).resolve().parents[1]


def curve(*rows: tuple[float, int, int, int, int]) -> Curve:
    """Curve from (threshold, tp, fp, tn, fn) rows."""
    a = np.array(rows, dtype=np.float64)
    return Curve(a[:, 0], a[:, 1:])


# Tag "a": 10 positives, 90 negatives, three candidates. Per-candidate values (worked by hand):
#   thr  tp fp tn fn   prec  rec   cti     f1      f2      f0.5    j       p4
#   0.2  10 10 80  0   0.5   1.0   0.5     0.6667  0.8333  0.5556  0.8889  0.7805
#   0.5   8  4 86  2   0.667 0.8   0.5714  0.7273  0.7692  0.6897  0.7556  0.8299
#   0.8   4  0 90  6   1.0   0.4   0.4     0.5714  0.4545  0.7692  0.4     0.7186
A = curve((0.2, 10, 10, 80, 0), (0.5, 8, 4, 86, 2), (0.8, 4, 0, 90, 6))
WINNERS = {  # metric -> (threshold, score)
    "cti": (0.5, 8 / 14), "f1": (0.5, 16 / 22), "f2": (0.2, 50 / 60), "f0.5": (0.8, 5 / 6.5),
    "j": (0.2, 8 / 9), "p4": (0.5, 2752 / 3316),
}


def choose(curves, metric="cti", **kw):
    kw.setdefault("epsilon", 0.0)
    return cal.select_thresholds(curves, metric, **kw)


# ---------------------------------------------------------------------------------------------------
# metrics


def test_metrics_match_hand_computed_values():
    tp, fp, tn, fn = 6, 3, 10, 1
    assert cal.cti(tp, fp, tn, fn) == pytest.approx(6 / 10)
    assert cal.informedness(tp, fp, tn, fn) == pytest.approx(6 / 7 + 10 / 13 - 1)
    assert cal.p4(tp, fp, tn, fn) == pytest.approx(240 / (240 + 16 * 4))
    assert cal.get_metric("f1")(tp, fp, tn, fn) == pytest.approx(12 / 16)
    assert cal.get_metric("f2")(tp, fp, tn, fn) == pytest.approx(30 / 37)
    assert cal.get_metric("f0.5")(tp, fp, tn, fn) == pytest.approx(7.5 / 10.75)


def test_metrics_are_zero_where_upstream_defines_them_zero():
    assert cal.cti(0, 0, 5, 0) == 0  # TP = 0, even with an all-zero denominator
    assert cal.informedness(0, 0, 0, 0) == -1  # both ratios 0
    assert cal.informedness(2, 0, 0, 2) == pytest.approx(0.5 - 1)  # TN = 0 -> TNR taken as 0
    assert cal.p4(3, 1, 0, 1) == 0  # TP·TN = 0
    assert cal.get_metric("f1")(0, 4, 4, 4) == 0


def test_metrics_vectorise_and_f_beta_has_its_closed_form():
    rng = np.random.default_rng(0)
    tp, fp, tn, fn = rng.integers(0, 50, (4, 200)).astype(float)
    for beta in (0.5, 1.0, 2.0, 3.7):
        b2 = beta * beta
        expect = np.where(tp > 0, (1 + b2) * tp / np.maximum((1 + b2) * tp + fp + b2 * fn, 1e-300), 0)
        np.testing.assert_allclose(cal.f_beta(beta)(tp, fp, tn, fn), expect, rtol=1e-12)
    assert cal.cti(tp, fp, tn, fn).shape == (200,)


@pytest.mark.parametrize("name, same_as", [("ts", "cti"), ("CSI", "cti"), ("bmi", "j"), ("J", "j"),
                                           ("P4", "p4"), ("F1", "f1"), ("f.5", "f0.5")])
def test_metric_aliases_and_case(name, same_as):
    counts = (6, 3, 10, 1)
    assert cal.get_metric(name)(*counts) == cal.get_metric(same_as)(*counts)


@pytest.mark.parametrize("name", ["auc", "f", "fx", "f0", "f-1", "finf", "fnan", ""])
def test_unknown_metric_lists_the_choices(name):
    with pytest.raises(ValueError, match="f<beta>|beta > 0"):
        cal.get_metric(name)


def test_custom_metric_says_the_user_must_write_it():
    fn = cal.get_metric("custom")
    with pytest.raises(NotImplementedError, match=r"custom_metric\(\) in hydra/calibration/thresholds.py"):
        fn(*np.ones((4, 3)))


# ---------------------------------------------------------------------------------------------------
# reading validation CSVs

GOOD = "tag,threshold,tp,fp,tn,fn\nb,0.5,1,2,3,4\na,0.9,1,0,5,6\nb,0.25,2.5,3,2,3\n"


def write(tmp_path, text, name="val.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


@pytest.fixture(params=[None, 2], ids=["one-chunk", "2-row-chunks"])
def chunks(request, monkeypatch):
    """Parse in one piece, or in 2-row chunks so that tags, blank lines and errors straddle chunk edges."""
    if request.param:
        monkeypatch.setattr(validation_csv, "_CHUNK_ROWS", request.param)


def test_read_groups_rows_per_tag_sorted_by_threshold(tmp_path, chunks):
    curves = read_validation_csv(write(tmp_path, GOOD))
    assert list(curves) == ["b", "a"]  # first appearance
    np.testing.assert_array_equal(curves["b"].thresholds, [0.25, 0.5])
    np.testing.assert_array_equal(curves["b"].counts, [[2.5, 3, 2, 3], [1, 2, 3, 4]])  # floats allowed
    assert curves["a"].counts.dtype == np.float64


def test_read_accepts_reordered_and_extra_columns_bom_crlf_and_blank_lines(tmp_path, chunks):
    text = "\ufefffn,tn,fp,tp,threshold,tag,note\r\n4,3,2,1,0.5,b,x\r\n\r\n6,5,0,1,0.9,a,\r\n"
    curves = read_validation_csv(write(tmp_path, text))
    np.testing.assert_array_equal(curves["b"].counts, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(curves["a"].thresholds, [0.9])


@pytest.mark.parametrize("text, message", [
    ("tag,threshold,tp,fp,tn\nb,0.5,1,2,3\n", r"val.csv:1: missing column fn"),
    ("tag,thr,tp,fp,tn,fn\n", r"val.csv:1: missing column threshold"),
    ("", r"val.csv: the file is empty"),
    (GOOD + "c,0.5,1,2,3\n", r"val.csv:5: expected 6 fields like the header, got 5"),
    (GOOD + "c,0.5,1,2,3,4,5\n", r"val.csv:5: expected 6 fields"),
    (GOOD + "c,0.5,1,x,3,4\n", r"val.csv:5: fp 'x' is not a number"),
    (GOOD + "c,,1,2,3,4\n", r"val.csv:5: threshold '' is not a number"),
    (GOOD + "c,1.5,1,2,3,4\n", r"val.csv:5: threshold 1.5 is outside \[0, 1\]"),
    (GOOD + "c,-0.1,1,2,3,4\n", r"val.csv:5: threshold -0.1 is outside"),
    (GOOD + "c,nan,1,2,3,4\n", r"val.csv:5: threshold nan is outside"),
    (GOOD + "c,0.5,1,2,-3,4\n", r"val.csv:5: counts must be finite and >= 0, got tp=1.0, fp=2.0, tn=-3.0"),
    (GOOD + "c,0.5,1,inf,3,4\n", r"val.csv:5: counts must be finite"),
    (GOOD + ",0.5,1,2,3,4\n", r"val.csv:5: empty tag"),
    # blank lines and a quoted multi-line field still give the physical line of the bad row
    (GOOD + "\n\n\"c\nd\",0.5,1,2,3,4\nc,0.5,1,2,3,z\n", r"val.csv:9: fn 'z' is not a number"),
])
def test_read_errors_name_the_file_and_line(tmp_path, chunks, text, message):
    with pytest.raises(ValueError, match=message):
        read_validation_csv(write(tmp_path, text))


def test_read_rejects_non_utf8(tmp_path):
    with pytest.raises(ValueError, match="not UTF-8"):
        read_validation_csv(write(tmp_path, "tag,threshold,tp,fp,tn,fn\nc\xe9,0.5,1,2,3,4\n", encoding="latin-1"))


def test_read_header_only_gives_no_curves(tmp_path):
    assert read_validation_csv(write(tmp_path, "tag,threshold,tp,fp,tn,fn\n")) == {}


# ---------------------------------------------------------------------------------------------------
# selection


@pytest.mark.parametrize("metric", sorted(WINNERS))
def test_each_metric_picks_the_hand_computed_winner(metric):
    got = choose({"a": A}, metric, min_precision=0, min_recall=0)["a"]
    thr, score = WINNERS[metric]
    assert got.candidate == thr and got.threshold == thr
    assert got.score == pytest.approx(score)


@pytest.mark.parametrize("kw, thr", [
    ({}, 0.5),                                   # defaults p 0.098, r 0.198 let every row through
    ({"min_precision": 0.7}, 0.8),               # precisions 0.5, 0.667, 1.0
    ({"min_precision": 1.0}, 0.8),               # >= : exactly 1.0 passes
    ({"min_recall": 0.9}, 0.2),                  # recalls 1.0, 0.8, 0.4
    ({"min_recall": 1.0}, 0.2),                  # >= : exactly 1.0 passes
    ({"min_score": 0.55}, 0.5),                  # cti 0.5, 0.571, 0.4
    ({"min_score": 0.5, "metric": "j"}, 0.2),
    ({"threshold_range": (0.6, 1.0)}, 0.8),
    ({"threshold_range": (0.2, 0.5)}, 0.5),      # inclusive at both ends
    ({"threshold_range": (0.5, 0.5)}, 0.5),
    ({"threshold_range": (0.0, 0.3)}, 0.2),
    ({"exclude": ["b"]}, 0.5),                   # excluding another tag changes nothing
])
def test_filters(kw, thr):
    assert choose({"a": A}, kw.pop("metric", "cti"), **kw)["a"].candidate == thr


@pytest.mark.parametrize("kw", [{"min_score": 0.6}, {"min_precision": 0.7, "min_recall": 0.5},
                                {"threshold_range": (0.6, 0.7)}, {"exclude": ["a"]}])
def test_tags_without_a_surviving_candidate_are_omitted(kw):
    assert choose({"a": A, "z": A}, **kw).keys() == ({"z"} if kw.get("exclude") else set())


def test_default_precision_and_recall_minimums_are_inclusive():
    # precision 98/1000 == 0.098 and recall 198/1000 == 0.198 pass; one count less fails
    curves = {"p_ok": curve((0.5, 98, 902, 0, 0)), "p_low": curve((0.5, 97, 903, 0, 0)),
              "r_ok": curve((0.5, 198, 0, 0, 802)), "r_low": curve((0.5, 197, 0, 0, 803))}
    assert list(cal.select_thresholds(curves)) == ["p_ok", "r_ok"]
    assert list(choose(curves, min_recall=0)) == ["p_ok", "r_low", "r_ok"]
    assert list(choose(curves, min_precision=0)) == ["p_low", "p_ok", "r_ok"]
    assert cal.DEFAULT_MIN_PRECISION == 0.098 and cal.DEFAULT_MIN_RECALL == 0.198


def test_ties_go_to_the_lowest_threshold_whatever_the_row_order():
    tied = curve((0.7, 5, 1, 9, 1), (0.3, 5, 1, 9, 1), (0.5, 5, 1, 9, 1), (0.9, 1, 0, 10, 5))
    assert choose({"t": tied})["t"].candidate == 0.3
    # and the unsorted input is handled the same way as a sorted one
    order = np.argsort(tied.thresholds)
    assert choose({"t": Curve(tied.thresholds[order], tied.counts[order])})["t"].candidate == 0.3


def test_rows_with_tp_zero_pass_only_when_both_minimums_are_at_most_zero():
    zero = curve((0.4, 0, 3, 7, 5), (0.2, 0, 5, 5, 5))
    assert choose({"z": zero}) == {}  # defaults
    assert choose({"z": zero}, min_precision=0, min_recall=0.1) == {}
    assert choose({"z": zero}, min_precision=0.1, min_recall=0) == {}
    got = choose({"z": zero}, min_precision=0, min_recall=-1)["z"]
    assert (got.candidate, got.score) == (0.2, 0.0)  # all score 0: the lowest threshold
    # a TP = 0 row with a J of 0 loses to a TP > 0 row with J > 0 once both are allowed
    mixed = curve((0.1, 0, 0, 10, 5), (0.6, 1, 0, 10, 4))
    assert choose({"m": mixed}, "j", min_precision=0, min_recall=0)["m"].candidate == 0.6


@pytest.mark.parametrize("eps, written", [(-0.0001, 0.4999), (0.0, 0.5), (0.3, 0.8), (0.6, 1.0), (-0.9, 0.0)])
def test_epsilon_is_added_then_clamped(eps, written):
    got = cal.select_thresholds({"a": A}, "cti", epsilon=eps)["a"]
    assert got.threshold == pytest.approx(written) and got.candidate == 0.5
    assert 0.0 <= got.threshold <= 1.0


def test_default_epsilon():
    assert cal.DEFAULT_EPSILON == -0.0001
    assert cal.select_thresholds({"a": A})["a"].threshold == pytest.approx(0.4999)


def test_select_accepts_a_metric_function():
    got = cal.select_thresholds({"a": A}, lambda tp, fp, tn, fn: -fp, epsilon=0)["a"]
    assert (got.candidate, got.score) == (0.8, 0.0)


ROW = st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]),
                *[st.integers(0, 6)] * 4)


@settings(max_examples=150, deadline=None)
@given(
    tags=st.dictionaries(st.sampled_from("abcd"), st.lists(ROW, min_size=1, max_size=7), min_size=1),
    metric=st.sampled_from(["cti", "j", "p4", "f1", "f0.5", "f2"]),
    min_score=st.sampled_from([None, 0.0, 0.2, 0.5]),
    rng=st.sampled_from([None, (0.0, 1.0), (0.1, 0.5), (0.5, 0.75), (0.3, 0.3)]),
    min_p=st.sampled_from([-0.1, 0.0, 0.098, 0.5]),
    min_r=st.sampled_from([-0.1, 0.0, 0.198, 0.5]),
    exclude=st.lists(st.sampled_from("abcd"), max_size=2),
)
def test_choice_is_the_best_allowed_candidate(tags, metric, min_score, rng, min_p, min_r, exclude):
    curves = {t: curve(*rows) for t, rows in tags.items()}
    got = cal.select_thresholds(curves, metric, min_score=min_score, threshold_range=rng,
                                min_precision=min_p, min_recall=min_r, exclude=exclude, epsilon=0)
    score_fn = cal.get_metric(metric)
    for tag, rows in tags.items():
        allowed = []
        for (thr, tp, fp, _tn, fn), s in zip(rows, score_fn(*np.array(rows, float)[:, 1:].T), strict=True):
            if tag in exclude or (min_score is not None and s < min_score):
                continue
            if rng is not None and not rng[0] <= thr <= rng[1]:
                continue
            if not (tp / (tp + fp) >= min_p and tp / (tp + fn) >= min_r if tp else min_p <= 0 and min_r <= 0):
                continue
            allowed.append((float(s), -thr))
        if not allowed:
            assert tag not in got
            continue
        best_score, neg_thr = max(allowed)
        assert got[tag].candidate == -neg_thr and got[tag].score == best_score
        # nothing allowed scores higher, and equal scores sit at higher thresholds
        assert all(s < best_score or -t >= got[tag].candidate for s, t in allowed)
    assert list(got) == sorted(got)


def test_write_calibration_byte_for_byte():
    choices = {
        "b": cal.Choice(0.4999, 0.571428, 0.5), "a": cal.Choice(1.0, 1.0, 1.0), "_c": cal.Choice(0.0, 0.0, 0.0),
        "Z": cal.Choice(0.123449, 0.98765, 0.1235), "3d_(artwork)": cal.Choice(0.25, 1 / 3, 0.25),
        "quote\"comma,": cal.Choice(0.5, 0.5, 0.5),
    }
    buf = io.StringIO(newline="")
    cal.write_calibration(buf, choices, "F0.5")
    assert buf.getvalue() == (
        "tag,threshold,f0.5\r\n"
        "3d_(artwork),0.2500,0.3333\r\n"
        "Z,0.1234,0.9877\r\n"
        "_c,0.0000,0.0000\r\n"
        "a,1.0000,1.0000\r\n"
        "b,0.4999,0.5714\r\n"
        "\"quote\"\"comma,\",0.5000,0.5000\r\n"
    )


# ---------------------------------------------------------------------------------------------------
# counting on your own images


def test_counts_from_scores_by_hand():
    probs = np.array([[0.9, 0.1], [0.5, 0.6], [0.2, 0.6]], np.float32)  # (N=3, T=2)
    labels = np.array([[1, 0], [0, 1], [1, 1]], bool)
    got = cal.counts_from_scores(probs, labels, np.array([0.2, 0.5, 0.95]))
    assert got.shape == (2, 3, 4) and got.dtype == np.int64
    # tag 0: p = 0.9 (pos), 0.5 (neg), 0.2 (pos); p == threshold counts as predicted
    np.testing.assert_array_equal(got[0], [[2, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 2]])
    # tag 1: p = 0.1 (neg), 0.6 (pos), 0.6 (pos); float32 0.6 > 0.5
    np.testing.assert_array_equal(got[1], [[2, 0, 1, 0], [2, 0, 1, 0], [0, 0, 1, 2]])


def test_counts_from_scores_matches_brute_force_and_honours_valid():
    rng = np.random.default_rng(1)
    probs = np.round(rng.random((40, 5)), 2)  # ties with the 0.01 grid on purpose
    labels = rng.random((40, 5)) < 0.3
    valid = rng.random((40, 5)) < 0.8
    got = cal.counts_from_scores(probs, labels, VALIDATION_THRESHOLDS, valid)
    pred = probs[:, :, None] >= VALIDATION_THRESHOLDS  # (N, T, K)
    y, ok = labels[:, :, None], valid[:, :, None]
    brute = np.stack([(pred & y & ok).sum(0), (pred & ~y & ok).sum(0),
                      (~pred & ~y & ok).sum(0), (~pred & y & ok).sum(0)], -1)  # (T, K, 4)
    np.testing.assert_array_equal(got, brute)


def test_validation_grid_is_the_99_point_grid():
    grid = VALIDATION_THRESHOLDS
    assert len(grid) == 99 and grid[0] == 0.01 and grid[-1] == 0.99
    assert [repr(float(t)) for t in grid[:3]] == ["0.01", "0.02", "0.03"]
    assert grid[6] == float("0.07")


def test_own_images_round_trip_through_the_validation_csv(tmp_path):
    rng = np.random.default_rng(2)
    probs, labels = rng.random((30, 3)), rng.random((30, 3)) < 0.5
    curves = cal.curves_from_counts(["x", "y", "z"], cal.counts_from_scores(probs, labels))
    path = tmp_path / "own.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        write_validation_csv(f, curves)
    text = path.read_bytes().decode("utf-8")
    assert text.startswith("tag,threshold,tp,fp,tn,fn\r\nx,0.01,")
    assert text.count("\r\n") == 1 + 3 * 99
    back = read_validation_csv(str(path))
    for tag in curves:
        np.testing.assert_array_equal(back[tag].thresholds, curves[tag].thresholds)
        np.testing.assert_array_equal(back[tag].counts, curves[tag].counts)
    assert cal.select_thresholds(back) == cal.select_thresholds(curves)


def test_write_validation_csv_keeps_fractional_counts():
    buf = io.StringIO(newline="")
    write_validation_csv(buf, {"t": curve((0.5, 2.5, 3, 4, 1e6))})
    assert buf.getvalue() == "tag,threshold,tp,fp,tn,fn\r\nt,0.5,2.5,3,4,1000000\r\n"


# ---------------------------------------------------------------------------------------------------
# extensions


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_extension_thresholds_are_bf16_rounded_logits():
    # linspace(0, 1, 5)[1:-1] = 0.25, 0.5, 0.75; logit(0.25) = -1.0986 -> bf16 -1.1015625 (= -1 - 13/128)
    np.testing.assert_allclose(extension_thresholds(3),
                               [sigmoid(-1.1015625), 0.5, sigmoid(1.1015625)], rtol=0, atol=1e-12)


def test_extension_thresholds_match_the_trainer_printouts_in_the_model_card():
    # "thr=" values printed by upstream's train_extension.py (T = 99) in the JTP-3 model card
    thr = extension_thresholds(99)
    printed = {45: 0.4501, 48: 0.4800, 55: 0.5499, 8: 0.0804, 9: 0.0901, 10: 0.0995, 11: 0.1097}
    for i, value in printed.items():
        assert f"{thr[i - 1]:.4f}" == f"{value:.4f}", i
    assert np.all(np.diff(thr) > 0)


def ext(path, label, validation):
    return SimpleNamespace(path=path, label=label, validation=validation)


def test_add_extensions_replaces_appends_skips_and_refuses_conflicts():
    counts = np.array([[3, 1, 5, 1], [2, 0, 6, 2], [1, 0, 6, 3]])
    logged = []
    out = cal.add_extensions({"a": A, "b": A}, [ext("x.safetensors", "a", counts),
                                                 ext("y.safetensors", "new", counts),
                                                 ext("z.safetensors", "none", None)], logged.append)
    assert list(out) == ["a", "b", "new"]
    np.testing.assert_array_equal(out["a"].counts, counts)
    np.testing.assert_allclose(out["a"].thresholds, extension_thresholds(3))
    assert out["b"] is A
    assert any("z.safetensors" in m and "no validation" in m for m in logged)
    with pytest.raises(ValueError, match="'x.safetensors' and 'w.safetensors' both define the tag 'a'"):
        cal.add_extensions({}, [ext("x.safetensors", "a", counts), ext("w.safetensors", "a", None)], logged.append)
    with pytest.raises(ValueError, match=r"shape \(T, 4\)"):
        cal.add_extensions({}, [ext("x.safetensors", "a", np.zeros((3, 5)))], logged.append)


def test_module_imports_without_torch_or_matplotlib():
    # load the file on its own: hydra/__init__.py (the tagger API) may import torch, this module must not
    code = ("import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('calibration', 'hydra/calibration/thresholds.py'); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "heavy = {'torch', 'matplotlib'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_extension_file_validation_tensor_is_calibrated(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    extensions = pytest.importorskip("hydra.models.extensions")
    path = tmp_path / "e.safetensors"
    counts = torch.tensor([[4, 4, 2, 0], [3, 1, 5, 1], [1, 0, 6, 3]], dtype=torch.int32)
    save_file({"q": torch.zeros(2, 1, 4, dtype=torch.bfloat16),
               "out_proj.weight": torch.zeros(1, 8, 2, dtype=torch.bfloat16), "validation": counts},
              str(path), metadata={"modelspec.implementation": "redrocket.extension.label.v1",
                                   "modelspec.architecture": "naflexvit_so400m_patch16_siglip+rr_hydra",
                                   "classifier.label": "new_tag", "classifier.label.category": "general"})
    curves = cal.add_extensions({}, [extensions.read_extension(path)], lambda msg: None)
    got = cal.select_thresholds(curves, epsilon=0)["new_tag"]
    # cti 4/8, 3/5, 1/4: the middle row, at i = 2 of 3 -> 0.5 exactly
    assert (got.candidate, got.score) == (0.5, pytest.approx(0.6))
