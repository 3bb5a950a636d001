"""bench.py smoke run on a tiny random model: the table prints, the JSON has its fields, the naive re-creation
of the original and ours agree on the probabilities within the bf16 bar, and the load probe reports memory.
Speed itself is measured by running bench.py, never asserted here.

    venv/bin/python -m pytest tests/test_bench.py -q      # ~30 s: three fresh processes import torch
"""

from __future__ import annotations

import json
import math

import pytest

import bench

RUN_FIELDS = {"device", "folder", "seqlen", "mode", "batch", "images", "images_per_s", "first_result_s", "total_s",
              "peak_rss_gb", "useful_tflop_per_image", "fraction_of_peak", "speedup", "first_result_ratio",
              "wall_speedup", "error"}


def _args(*argv: str):
    return bench._finish_args(bench.build_parser().parse_args(list(argv)))


def test_help_parses():
    with pytest.raises(SystemExit) as e:
        bench.build_parser().parse_args(["--help"])
    assert e.value.code == 0


def test_generated_folders_are_deterministic_and_mixed():
    a, b = bench.image_sizes("mixed", 24), bench.image_sizes("mixed", 24)
    assert a == b
    pixels = sorted(w * h for w, h, _, _ in a)
    assert pixels[0] < 256 * 256 and pixels[-1] > 1024 * 1024  # thumbnails to photos
    assert len({round(w / h, 1) for w, h, _, _ in a}) > 5
    assert {ext for _, _, ext, _ in a} == {"jpg", "png", "webp"}
    assert set(bench.image_sizes("uniform", 3)) == {(*bench.UNIFORM_SIZE, "jpg", "RGB")}


def test_flop_count_matches_the_issue_for_the_real_shapes():
    dims = {"width": 1152, "patch": 768, "depth": 27, "mlp": 4304, "tags": 7504, "attn": 2048, "ff": 6144}
    backbone_linear = 2 * 1024 * (768 * 1152 + 27 * 1152 * (4 * 1152 + 2 * 4304))
    assert 0.84e12 < backbone_linear < 0.86e12  # "backbone ~0.85 TFLOP plus attention"
    total = bench.image_flops(1024, dims)
    head_ff = 2 * 7504 * 2048 * 3 * 6144
    assert 0.56e12 < head_ff < 0.58e12 and 1.55e12 < total < 1.65e12
    assert bench.image_flops(256, dims) > head_ff  # the head does not shrink with the sequence


def test_smoke_run_table_json_and_agreement(tmp_path, capsys):
    code = bench.main(_args("--tiny", "--images", "2", "--seqlen", "64", "--batch-size", "2", "--folders", "mixed",
                            "--no-load-probe", "--out", str(tmp_path)))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "img/s" in out and "x naive" in out and "naive" in out and "ours" in out
    report = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert {"machine", "matmul_peak_gflops", "folders", "runs", "agreement", "load", "dims"} <= set(report)
    assert report["matmul_peak_gflops"]["cpu"]["bf16"] > 0
    runs = report["runs"]
    assert [r["mode"] for r in runs] == ["naive", "ours"] and all(RUN_FIELDS <= set(r) for r in runs)
    for r in runs:
        assert r["images"] == 2 and not r["error"] and r["first_result_s"] > 0 and r["peak_rss_gb"] > 0
    assert runs[0]["speedup"] == 1.0 and math.isfinite(runs[1]["speedup"])
    (check,) = report["agreement"]
    assert check["images"] == 2
    assert check["mean_abs_dp"] < 0.01 and check["max_abs_dp"] < 0.1  # the bf16 bar of tests/test_model.py


def test_hydra35_naive_re_creation_runs_and_agrees_with_ours(tmp_path, capsys):
    code = bench.main(_args("--tiny", "--family", "hydra35", "--images", "2", "--seqlen", "64", "--batch-size", "1",
                            "--folders", "mixed", "--no-load-probe", "--no-stage-probe", "--out", str(tmp_path)))
    out = capsys.readouterr().out
    assert code == 0, out
    runs = json.loads(next(tmp_path.glob("bench-*.json")).read_text())["runs"]
    assert [(r["family"], r["mode"]) for r in runs] == [("hydra35", "naive"), ("hydra35", "ours")]
    assert all(r["images"] == 2 and not r["error"] for r in runs)
    assert runs[0]["wall_speedup"] == 1.0 and runs[1]["wall_speedup"] > 0
    (check,) = json.loads(next(tmp_path.glob("bench-*.json")).read_text())["agreement"]
    # padded to seqlen with the mask, unfolded and unchunked against ours: bf16 rounding only
    assert check["images"] == 2 and check["mean_abs_dp"] < 0.01 and check["max_abs_dp"] < 0.1


def test_no_fold_adds_an_unfolded_twin_of_every_ours_row(tmp_path, monkeypatch):
    runs = bench.plan(_args("--no-fold", "--seqlen", "256", "--batch-size", "1", "4", "--folders", "mixed"), ["cpu"])
    assert sorted((r.mode, r.batch, r.fold) for r in runs) == [("naive", 1, True), ("ours", 1, False),
                                                               ("ours", 1, True), ("ours", 4, False), ("ours", 4, True)]
    seen = []
    monkeypatch.setattr(bench, "execute", lambda cmd, timeout, cwd, env=None: seen.append(env) or ([], {
        "total_s": 1.0, "exit_code": 0, "peak_rss_gb": None, "stderr": ""}))
    monkeypatch.setattr(bench, "folder_tokens", lambda folder, seqlen: {})
    report = {"dims": {"jtp3": {}}, "folders": {}}
    args = _args("--no-fold", "--seqlen", "256", "--batch-size", "1", "--modes", "ours", "--folders", "mixed")
    bench.run_all(args, bench.plan(args, ["cpu"]), {"jtp3": "m"}, {"mixed": tmp_path}, {"cpu": {"bf16": 1.0}},
                  tmp_path, report)
    assert seen == [None, {"HYDRA_NO_FOLD": "1"}]  # the twin runs the heads as stored


def test_upstream35_default_workers():
    # min(ceil(cores / 3), 16), at most half the images, at least one
    assert [bench.upstream35_workers(c, 100) for c in (1, 2, 3, 4, 48, 64)] == [1, 1, 1, 2, 16, 16]
    assert bench.upstream35_workers(8, 2) == 1 and bench.upstream35_workers(8, 0) == 1


@pytest.mark.parametrize("family", ["jtp3", "hydra35"])
def test_load_probe_reports_memory(tmp_path, capsys, family):
    model = bench.prepare_model(_args("--tiny"), tmp_path, family)
    for kind in ("load-ours", "load-naive"):
        assert bench.main(_args("--child", kind, "--model", model, "--device", "cpu")) == 0
        probe = json.loads(capsys.readouterr().out)
        assert probe["weights_gb"] > 0 and probe["peak_rss_gb"] >= probe["rss_before_gb"] > 0
        assert probe["dtype"] in ("bfloat16", "float32")


def test_compile_adds_a_compiled_twin_of_every_ours_row():
    args = _args("--compile", "--seqlen", "256", "--batch-size", "1", "4", "--folders", "mixed")
    runs = bench.plan(args, ["cpu"])
    ours = [r for r in runs if r.mode == "ours"]
    assert sorted((r.batch, r.compile) for r in ours) == [(1, False), (1, True), (4, False), (4, True)]
    assert [r for r in runs if r.mode == "naive" and r.compile] == []
    commands = {r.compile: bench.run_command(r, "m.safetensors", bench.Path("f"), bench.Path(".")) for r in ours}
    assert "-c" in commands[True] and "-c" not in commands[False]
    assert not any(r.compile for r in bench.plan(_args("--seqlen", "256"), ["cpu"]))
