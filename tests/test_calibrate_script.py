"""Tests for calibrate.py: flags and defaults, output bytes, errors, first-use download, extensions, plots.

Every run uses a small local validation CSV (--data) or a monkeypatched downloader: nothing touches the
network. Extension files are built with safetensors in a temporary folder.

Run: venv/bin/python -m pytest tests/test_calibrate_script.py -q
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import calibrate
from hydra.models.jtp3 import JTP3

REPO = Path(__file__).resolve().parents[1]

# hand-worked (see tests/test_calibration.py for tag "a"): with the defaults (cti, p >= 0.098,
# r >= 0.198, epsilon -0.0001), a -> 0.5 (cti 8/14), b -> its lowest tied threshold 0.3 (cti 5/7),
# c (TP = 0 everywhere) is omitted, ":3" -> 0.5 (cti 3/5).
VAL = """tag,threshold,tp,fp,tn,fn
b,0.7,5,1,9,1
b,0.3,5,1,9,1
a,0.2,10,10,80,0
a,0.5,8,4,86,2
a,0.8,4,0,90,6
c,0.4,0,3,7,5
:3,0.5,3,1,5,1
"""
DEFAULT_OUT = b"tag,threshold,cti\r\n:3,0.4999,0.6000\r\na,0.4999,0.5714\r\nb,0.2999,0.7143\r\n"


@pytest.fixture
def val(tmp_path, monkeypatch):
    # the project folder (default data and extensions) and the current directory (outputs) are both
    # tmp_path, so no test reads or writes the real checkout
    from hydra.models import resources

    monkeypatch.setattr(resources, "ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "val.csv").write_text(VAL, encoding="utf-8")
    return "val.csv"


def run(capsys, *argv):
    code = calibrate.main(calibrate.build_parser().parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_and_defaults():
    parser = calibrate.build_parser()
    text = parser.format_help()
    flags = {s for action in parser._actions for s in action.option_strings}
    assert flags >= {"--data", "-o", "--output", "-m", "--metric", "-s", "--min-score", "-R", "--range",
                     "-p", "--min-precision", "-r", "--min-recall", "-x", "--exclude-tags", "--epsilon",
                     "-e", "--extension", "-E", "--no-default-extensions", "--plot", "--plot-dir",
                     "--from-dataset", "--data-out", "--recursive", "--metadata", "--min-positives", "--refresh",
                     "-M", "--model", "--vocab", "-S", "--seqlen", "-d", "--device", "--dtype", "-b", "--batch",
                     "-w", "--workers", "--no-shm", "--max-size", "--exif", "--white-background"}
    for default in ("data/jtp-3-hydra-val.csv", "calibration.csv", "0.098", "0.198", "-0.0001",
                    "extensions/jtp-3-hydra", "calibration-plots"):
        assert default in text, default
    args = parser.parse_args([])
    assert (args.data, args.output, args.metric, args.plot_dir) == (
        None, "calibration.csv", None, "calibration-plots")  # None: the project's data file; the model's metric
    # the library defaults apply: cti for a validation CSV (embedded counts get upstream's f1.0@0.1)
    assert calibrate.selection_options(args, JTP3) == ("cti", {"metric": "cti", "exclude": []})
    args = parser.parse_args(["-x", "a", "b", "-x", "c", "--epsilon", "-0.01", "-R", "0.1", "0.9"])
    assert args.exclude_tags == ["a", "b", "c"] and args.epsilon == -0.01 and args.range == [0.1, 0.9]


def test_default_run_writes_calibration_csv(val, capsys, tmp_path):
    code, out, err = run(capsys, "--data", val)
    assert code == 0 and out == ""
    assert (tmp_path / "calibration.csv").read_bytes() == DEFAULT_OUT
    assert err.strip().splitlines()[-1] == "Calibrated 3 tags."


def test_output_to_stdout(val, capsys, tmp_path):
    code, out, err = run(capsys, "--data", val, "-o", "-")
    assert code == 0 and out.encode() == DEFAULT_OUT and "Calibrated 3 tags." in err
    assert not (tmp_path / "calibration.csv").exists()


@pytest.mark.parametrize("argv, expect", [
    (["-m", "F0.5"], "tag,threshold,f0.5\r\n:3,0.4999,0.7500\r\na,0.7999,0.7692\r\nb,0.2999,0.8333\r\n"),
    (["-m", "j"], "tag,threshold,j\r\n:3,0.4999,0.5833\r\na,0.1999,0.8889\r\nb,0.2999,0.7333\r\n"),
    (["-m", "p4", "-x", ":3", "b"], "tag,threshold,p4\r\na,0.4999,0.8299\r\n"),
    (["-p", "0.7", "-x", ":3", "b"], "tag,threshold,cti\r\na,0.7999,0.4000\r\n"),
    (["-r", "0.9", "-x", ":3", "b"], "tag,threshold,cti\r\na,0.1999,0.5000\r\n"),
    (["-s", "0.65"], "tag,threshold,cti\r\nb,0.2999,0.7143\r\n"),
    (["-R", "0.6", "1"], "tag,threshold,cti\r\na,0.7999,0.4000\r\nb,0.6999,0.7143\r\n"),
    (["-R", "0.2", "0.2"], "tag,threshold,cti\r\na,0.1999,0.5000\r\n"),
    (["--epsilon", "0", "-x", ":3", "b"], "tag,threshold,cti\r\na,0.5000,0.5714\r\n"),
    (["--epsilon=-0.6", "-x", ":3", "b"], "tag,threshold,cti\r\na,0.0000,0.5714\r\n"),
    (["-p", "0", "-r", "0", "-x", ":3", "a", "b"], "tag,threshold,cti\r\nc,0.3999,0.0000\r\n"),
])
def test_flags(val, capsys, argv, expect):
    code, out, err = run(capsys, "--data", val, "-o", "-", *argv)
    assert code == 0, err
    assert out == expect


def test_a_metric_floor_alone_or_p_alone_is_accepted(val, capsys):
    floor = run(capsys, "--data", val, "-o", "-", "-m", "cti@0.7")
    p = run(capsys, "--data", val, "-o", "-", "-m", "cti", "-p", "0.7")
    assert floor[0] == p[0] == 0 and floor[1].splitlines()[1:] == p[1].splitlines()[1:]
    assert "a,0.7999" in p[1]  # a's best threshold 0.5 has precision 8/12 < 0.7: 0.8 is chosen


def test_plot_dir_without_plot_is_noted(val, capsys, tmp_path):
    code, out, err = run(capsys, "--data", val, "-o", "-", "--plot-dir", "plots")
    assert code == 0 and out.startswith("tag,threshold,cti")
    assert "Note: --plot-dir does not apply without --plot." in err and not (tmp_path / "plots").exists()


def test_excluding_an_unknown_tag_is_noted(val, capsys):
    code, _, err = run(capsys, "--data", val, "-o", "-", "-x", "pussy")
    assert code == 0 and "'pussy' is not in the validation data" in err


@pytest.mark.parametrize("argv, message", [
    (["-m", "auc"], "unknown metric 'auc'; choose one of: cti"),
    (["-m", "f0"], "beta > 0"),
    (["-m", "custom"], "custom_metric() in hydra/calibration/thresholds.py"),
    (["-R", "0.8", "0.2"], "MIN 0.8 is greater than MAX 0.2"),
    (["--plot", "nope"], "--plot: no validation data for 'nope'"),
    (["--data", "missing.csv"], "validation data 'missing.csv' not found"),
    (["--data", "bad.csv"], "bad.csv:3: tp 'x' is not a number"),
    (["-o", "no/such/dir/out.csv"], "No such file or directory"),
    (["-M", "m.safetensors", "-w", "0", "--refresh"], "--refresh, -w: only meaningful with --from-dataset DIR"),
    # checked before the model is looked for (m.safetensors does not exist)
    (["-M", "m.safetensors", "-m", "f1@0.2", "-p", "0.3"],
     "-m f1@0.2 and --min-precision cannot be combined: both set the minimum precision (METRIC@P is -p P)"),
])
def test_user_errors_are_one_line_and_exit_2(val, capsys, tmp_path, argv, message):
    (tmp_path / "bad.csv").write_text("tag,threshold,tp,fp,tn,fn\na,0.5,1,1,1,1\na,0.6,x,1,1,1\n")
    argv = ["--data", val, *argv] if "--data" not in argv else argv
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("calibrate.py: error: ") and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["-p", "0.99", "-r", "0.95"],
     "no threshold of any of the 4 tags meets the minimums (precision >= 0.99, recall >= 0.95)"),
    (["-s", "0.9", "-R", "0.1", "0.6"],
     "(precision >= 0.098, recall >= 0.198, cti score >= 0.9, threshold in [0.1, 0.6])"),
    (["-x", "a", "b", "c", ":3"], "-x/--exclude-tags leaves out every tag"),
])
@pytest.mark.parametrize("output", ["out.csv", "-"])
def test_a_calibration_of_zero_tags_is_refused(val, capsys, tmp_path, argv, message, output):
    """A 0-tag calibration would make inference output no tag at all: refuse it, write nothing."""
    (tmp_path / "out.csv").write_text("previous", encoding="utf-8") if output == "out.csv" else None
    code, out, err = run(capsys, "--data", val, "-o", output, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "no calibration written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out.csv", "val.csv"] if output == "out.csv"
                                                          else ["val.csv"])
    if output == "out.csv":
        assert (tmp_path / "out.csv").read_text(encoding="utf-8") == "previous"


def test_script_entry_point_exits_2_without_a_traceback(val, tmp_path):
    bad = subprocess.run([sys.executable, str(REPO / "calibrate.py"), "--data", val, "-m", "nope", "-E"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr
    assert bad.stderr.startswith("calibrate.py: error: unknown metric 'nope'") and bad.stderr.count("\n") == 1


def test_a_run_without_extensions_does_not_import_torch(val, tmp_path):
    code = ("import sys, calibrate; "
            "code = calibrate.main(calibrate.build_parser().parse_args(['--data', 'val.csv', '-o', 'out.csv'])); "
            "assert code == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert (tmp_path / "out.csv").read_bytes() == DEFAULT_OUT


# ---------------------------------------------------------------------------------------------------
# first-use download of the default data


def test_default_data_is_fetched_through_the_hub_helper(val, capsys, tmp_path, monkeypatch):
    from hydra import hub

    calls = []

    def fake_ensure_file(path, repo_file, *, sha256, size, what):
        calls.append((path, repo_file, sha256, size, what))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(VAL, encoding="utf-8")
        return Path(path)

    monkeypatch.setattr(hub, "ensure_file", fake_ensure_file)
    code, out, _ = run(capsys, "-o", "-")
    assert code == 0 and out.encode() == DEFAULT_OUT
    assert calls == [("data/jtp-3-hydra-val.csv", "data/jtp-3-hydra-val.csv",
                      "c7e9901ae3dec04942ed5ecb7dda0fbbf01afc4d27b1b5f80d509b664952ff77", 42_149_079,
                      "validation data")]


def test_download_failure_is_one_line(val, capsys, monkeypatch):
    from hydra import hub

    def offline(*args, **kwargs):
        raise hub.DownloadError("validation data 'data/jtp-3-hydra-val.csv' is missing and HF_HUB_OFFLINE is set.")

    monkeypatch.setattr(hub, "ensure_file", offline)
    code, out, err = run(capsys, "-o", "-")
    assert code == 2 and out == "" and err.count("\n") == 1 and "HF_HUB_OFFLINE" in err


def test_an_explicit_data_path_is_never_downloaded(val, capsys, monkeypatch):
    from hydra import hub

    monkeypatch.setattr(hub, "ensure_file", lambda *a, **k: pytest.fail("must not download"))
    assert run(capsys, "--data", val, "-o", "-")[0] == 0
    assert run(capsys, "--data", "other.csv", "-o", "-")[0] == 2


# ---------------------------------------------------------------------------------------------------
# plots


def test_plot_writes_one_png_per_tag(val, capsys, tmp_path):
    code, _, err = run(capsys, "--data", val, "-o", "-", "--plot", "a", ":3", "--plot", "c",
                       "--plot-dir", "plots")
    assert code == 0, err
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["%3A3.png", "a.png", "c.png"]  # ':' is percent-encoded; c has no threshold
    for name in pngs:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


# ---------------------------------------------------------------------------------------------------
# extensions (need torch and safetensors; kept last)


def write_extension(path, label, validation=None):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {"q": torch.zeros(2, 1, 4, dtype=torch.bfloat16),
               "out_proj.weight": torch.zeros(1, 8, 2, dtype=torch.bfloat16)}
    if validation is not None:
        tensors["validation"] = torch.tensor(validation, dtype=torch.int32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={
        "modelspec.implementation": "redrocket.extension.label.v1",
        "modelspec.architecture": "naflexvit_so400m_patch16_siglip+rr_hydra",
        "classifier.label": label, "classifier.label.category": "general"})


# three rows -> thresholds sigmoid(bf16(logit(i/4))) = 0.2494, 0.5, 0.7506; cti 4/8, 3/5, 1/4 -> 0.5
EXT_COUNTS = [[4, 4, 2, 0], [3, 1, 5, 1], [1, 0, 6, 3]]


def test_extensions_replace_and_add_tags(val, capsys, tmp_path):
    write_extension(tmp_path / "exts" / "a.safetensors", "a", EXT_COUNTS)
    write_extension(tmp_path / "exts" / "new.safetensors", "new_tag", [[4, 4, 2, 0], [1, 0, 6, 3]])
    write_extension(tmp_path / "exts" / "plain.safetensors", "plain")  # no validation: skipped
    write_extension(tmp_path / "exts" / ".hidden.safetensors", "hidden", EXT_COUNTS)
    code, out, err = run(capsys, "--data", val, "-o", "-", "-e", "exts")
    assert code == 0, err
    assert out == ("tag,threshold,cti\r\n:3,0.4999,0.6000\r\na,0.4999,0.6000\r\nb,0.2999,0.7143\r\n"
                   "new_tag,0.3336,0.5000\r\n")  # 1/3: logit -0.6931 -> bf16 -0.69140625 -> 0.33372
    assert "Skipping extension" in err and "plain" in err and "Calibrated 4 tags." in err
    assert "hidden" not in out


def test_default_extension_folder_and_no_default_flag(val, capsys, tmp_path):
    write_extension(tmp_path / "extensions" / "jtp-3-hydra" / "x.safetensors", "x_tag", EXT_COUNTS)
    assert "x_tag,0.4999,0.6000" in run(capsys, "--data", val, "-o", "-")[1]
    assert "x_tag" not in run(capsys, "--data", val, "-o", "-", "-E")[1]


def test_two_extensions_with_one_label_are_an_error(val, capsys, tmp_path):
    write_extension(tmp_path / "one.safetensors", "dup", EXT_COUNTS)
    write_extension(tmp_path / "two.safetensors", "dup", EXT_COUNTS)
    code, out, err = run(capsys, "--data", val, "-o", "-", "-e", "one.safetensors", "-e", "two.safetensors")
    assert code == 2 and out == "" and "both define tag 'dup'" in err


def test_an_extension_the_caption_rename_makes_equal_to_a_tag_is_an_error(val, capsys, tmp_path):
    """`b_vulva` is written `b_pussy`, a tag of the validation data: two rows of one name in the calibration."""
    (tmp_path / "val.csv").write_text(VAL + "b_pussy,0.5,3,1,5,1\n", encoding="utf-8")
    path = tmp_path / "b_vulva.safetensors"
    write_extension(path, "b_vulva", EXT_COUNTS)
    code, out, err = run(capsys, "--data", val, "-o", "-", "-e", str(path))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"{path}: tag 'b_vulva' is written 'b_pussy'" in err and "the tag 'b_pussy'" in err
    write_extension(path, "b_pussy", EXT_COUNTS)  # replacing the tag itself is fine
    assert run(capsys, "--data", val, "-o", "-", "-e", str(path))[0] == 0


def test_bad_extension_file_is_one_line(val, capsys, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run(capsys, "--data", val, "-o", "-", "-e", "junk.safetensors")
    assert code == 2 and err.startswith("calibrate.py: error: ") and err.count("\n") == 1, err
