"""inference.py refuses usage mistakes before the model loads (no silent traps): folders whose images sit in
sub-folders, a forgotten path without a terminal, options that cannot combine, unusable -d and -o, and the
one log line naming the thresholds in use (calibration.csv also found in the project folder).

    venv/bin/python -m pytest tests/test_cli_traps.py -q
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest
from conftest import ROOT, noise_image

SCRIPT = str(ROOT / "inference.py")


def cli(*args, cwd=None, stdin=subprocess.DEVNULL):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          stdin=stdin, timeout=300)


@pytest.fixture
def model(small_model):
    return small_model[0]


def test_images_only_in_sub_folders_say_add_r_before_loading(model, tmp_path):
    for i in range(3):
        (tmp_path / "top" / f"s{i}").mkdir(parents=True)
        noise_image(32, 32).save(tmp_path / "top" / f"s{i}" / "a.png")
    run = cli("-M", model, "-m", "", tmp_path / "top")
    assert run.returncode == 1 and "Loading" not in run.stderr
    assert run.stderr.strip() == f"error: '{tmp_path / 'top'}' has no images; 3 in sub-folders: add -r"


def test_the_sub_folder_count_is_capped(model, tmp_path, monkeypatch):
    import inference

    (tmp_path / "top" / "s").mkdir(parents=True)
    for i in range(6):
        (tmp_path / "top" / "s" / f"{i}.png").write_bytes(b"")
    monkeypatch.setattr(inference, "SUBFOLDER_CAP", 4)
    errors: list[str] = []
    assert inference.scan([str(tmp_path / "top")], False, errors) == [] and errors == []


def test_missing_inputs_are_reported_before_loading(model, tmp_path):
    run = cli("-M", model, "-m", "", tmp_path / "nope.png")
    assert run.returncode == 1 and "file not found" in run.stderr and "Loading" not in run.stderr


def test_a_forgotten_path_without_a_terminal_is_an_error(model):
    run = cli("-M", model, "-m", "", "-t", "0.2", "-r")
    assert run.returncode == 2 and run.stdout == "" and "Loading" not in run.stderr
    assert "no PATH given, and standard input is not a terminal" in run.stderr
    assert "--recursive does not apply to the interactive classifier" in run.stderr


def test_a_forgotten_path_on_a_terminal_says_it_starts_the_repl(model):
    main, child = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, SCRIPT, "-M", model, "-m", ""], stdin=child,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(main, b"q\n")
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(main)
        os.close(child)
    assert proc.returncode == 0 and "Interactive Classifier" in out
    assert "No PATH given: starting the interactive classifier" in err


@pytest.mark.parametrize("flags, message", [
    (["-o", "x.csv", "--format", "tags"], "--output and --format cannot be combined"),
    (["--topk", "3", "-t", "0.2"], "--topk and --threshold cannot be combined"),
    (["--max-size", "512"], "--max-size does not apply to"),
    (["--exif"], "--exif is for the DINOv3 tagger"),
    (["-d", "ash.png"], "-d ash.png: not usable here"),
    (["-d", "meta"], "-d meta: not usable here"),
])
def test_options_that_cannot_work_are_refused_before_loading(model, tmp_path, flags, message):
    noise_image(32, 32).save(tmp_path / "a.png")
    run = cli("-M", model, "-m", "", *flags, tmp_path / "a.png", cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert "12 tags" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_dash_file_names_get_the_double_dash_hint(model, tmp_path):
    noise_image(32, 32).save(tmp_path / "-dash.png")
    run = cli("-M", model, "-m", "", "-dash.png", cwd=tmp_path)
    assert run.returncode == 2 and "available: cpu" in run.stderr and "-- -dash.png" in run.stderr
    run = cli("-M", model, "-m", "", "-w", "0", "--format", "tags", "--", "-dash.png", cwd=tmp_path)
    assert run.returncode == 0, run.stderr


def test_max_pixels_inf_is_a_usage_error(model, tmp_path):
    run = cli("-M", model, "--max-pixels", "inf", tmp_path)
    assert run.returncode == 2 and "not a pixel count: 'inf'" in run.stderr and "Traceback" not in run.stderr


def test_ignored_options_get_one_note(model, tmp_path):
    noise_image(32, 32).save(tmp_path / "a.png")
    run = cli("-M", model, "-m", "", "-w", "0", "-o", "-", "-t", "0.3", "-p", "x", "-s", "--ray-batch", "4",
              tmp_path / "a.png")
    assert run.returncode == 0, run.stderr
    notes = [line for line in run.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: --threshold --prefix --shuffle do not apply to -o's CSV (the raw probability of "
                     "every tag); --ray-batch does not apply without --ray"]


@pytest.mark.parametrize("target", ["missing/x.csv", "folder"])
def test_unwritable_output_is_refused_before_loading(model, tmp_path, target):
    (tmp_path / "folder").mkdir()
    noise_image(32, 32).save(tmp_path / "a.png")
    run = cli("-M", model, "-m", "", "-o", target, "a.png", cwd=tmp_path)
    assert run.returncode == 2 and "Loading" not in run.stderr
    assert ("does not exist" if "missing" in target else "is a folder") in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "folder"]


def test_a_read_only_output_folder_is_refused(tmp_path, monkeypatch):
    from hydra import cli as hcli

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, who may write anyway
    with pytest.raises(ValueError, match="is not writable"):
        hcli.check_output(str(tmp_path / "x.csv"))
    hcli.check_output("-")  # stdout is always fine


def test_thresholds_line_and_the_project_calibration(model, tmp_path, monkeypatch):
    from hydra.models import resources

    noise_image(32, 32).save(tmp_path / "a.png")
    run = cli("-M", model, "-m", "", "-w", "0", "--format", "tags", tmp_path / "a.png", cwd=tmp_path)
    assert "Thresholds: 0.5 for every tag (default; symmetric scale, p >= 0.75)" in run.stderr
    # the wizard saves calibration.csv in the project folder: found from any current folder
    project = tmp_path / "project"
    project.mkdir()
    (project / "calibration.csv").write_text("tag,threshold\ntag_01,0.0\n")
    monkeypatch.setattr(resources, "ROOT", project)
    monkeypatch.chdir(tmp_path)
    assert os.path.samefile(resources.find_calibration(), project / "calibration.csv")
    (tmp_path / "calibration.csv").write_text("tag,threshold\n")
    assert resources.find_calibration() == "calibration.csv"  # the current folder's wins, as the original
