"""inference.py end to end on tiny fixture models: every original flag in --help, captions (content,
recursion, skipped files, prefix), CSV to a file and to stdout, the interactive REPL fed through stdin,
extensions, calibration files, unreadable files and exit codes, and the first-use download message.

    venv/bin/python -m pytest tests/test_inference.py -q
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, noise_image

from hydra.tags.rules import caption_tag, load_metadata
from hydra.testing.jtp3 import write_extension

SCRIPT = str(ROOT / "inference.py")


def cli(*args, cwd=None, stdin=None, check_rc=None):
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, input=stdin, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def read_csv(text):
    return list(csv.reader(io.StringIO(text, newline="")))


def test_help_lists_every_original_flag():
    out = cli("--help", check_rc=0).stdout
    for flag in ["-t", "--threshold", "-i", "--implications", "-x", "--exclude", "-p", "--prefix", "-o", "--output",
                 "-O", "--original-tags", "-M", "--model", "-m", "--metadata", "-e", "--extension", "-E",
                 "--no-default-extensions", "-b", "--batch", "-w", "--workers", "--no-shm", "-S", "--seqlen",
                 "-d", "--device", "-r", "--recursive", "THRESHOLD_OR_PATH", "BATCH_SIZE", "N_WORKERS", "TORCH_DEVICE"]:
        assert flag in out, flag
    assert "JTP-3 Hydra Classifier by Project RedRocket" in out
    assert "constrain-remove" in out and "general artist copyright character species meta lore" in out


def test_captions_match_csv_probabilities(tiny_model, image_folder, tmp_path):
    """Caption mode and CSV mode agree: the caption holds exactly the tags whose raw p passes the cutoff."""
    table = tmp_path / "p.csv"
    csv_run = cli("-M", tiny_model, "-w", "0", "-r", "-o", table, image_folder, check_rc=0)
    assert csv_run.stdout == ""
    rows = read_csv(table.read_text(encoding="utf-8"))
    header, body = rows[0], rows[1:]
    assert header[0] == "filename" and len(header) == 7505 and "spread_pussy" in header
    assert sorted(r[0] for r in body) == sorted(str(image_folder / n) for n in ["a.png", "b.jpg", "sub/c.webp"])
    assert table.read_bytes().count(b"\r\n") == 4  # csv default dialect
    assert all(len(v.split(".")[1]) == 4 for v in body[0][1:50])

    cli("-M", tiny_model, "-w", "0", "-r", "-i", "off", "-t", "0.2", image_folder, check_rc=0)
    for row in body:
        probs = np.array(row[1:], dtype=float)
        caption = open(row[0][: row[0].rindex(".")] + ".txt", encoding="utf-8").read()
        expected = {caption_tag(t) for t, p in zip(header[1:], probs) if p >= 0.6 + 5e-5}
        borderline = {caption_tag(t) for t, p in zip(header[1:], probs) if abs(p - 0.6) <= 5e-5}
        got = set(caption.split(", ")) if caption else set()
        assert expected <= got <= expected | borderline
        assert not caption.endswith("\n")
    assert not (image_folder / "notes.txt").read_text() != "not an image"
    assert not list(image_folder.glob(".*.tmp")) and not (image_folder / ".hidden.txt").exists()


def test_recursion_is_opt_in_and_summary(tiny_model, image_folder):
    run = cli("-M", tiny_model, "-w", "0", image_folder, check_rc=0)
    assert (image_folder / "a.txt").exists() and not (image_folder / "sub" / "c.txt").exists()
    assert "Tagged 2 images, 0 failed." in run.stderr


def test_inherit_implications_and_exclusion(tiny_model, image_folder, tmp_path):
    meta = load_metadata(ROOT / "data" / "jtp-3-hydra-tags.csv")
    cli("-M", tiny_model, "-w", "0", "-t", "-0.2", "-x", "species", image_folder / "a.png", check_rc=0)
    tags = set((image_folder / "a.txt").read_text(encoding="utf-8").split(", "))
    spelled = {caption_tag(t): t for t in meta.category}
    assert tags and all(meta.category[spelled[t]] != 5 for t in tags)
    for t in tags:  # inherit: every consequent of an output tag is output too (unless excluded)
        for c in meta.implies[spelled[t]]:
            assert caption_tag(c) in tags or meta.category[c] == 5


def test_prefix_and_original_tags(tiny_model, image_folder):
    cli("-M", tiny_model, "-w", "0", "-t", "-1", "-p", "my style", "-O", image_folder / "a.png", check_rc=0)
    caption = (image_folder / "a.txt").read_text(encoding="utf-8")
    assert caption.startswith("my style, ") and "spread vulva" in caption and "spread pussy" not in caption


def test_csv_to_stdout_has_no_header_and_logs_stay_on_stderr(tiny_model, image_folder):
    run = cli("-M", tiny_model, "-w", "2", "-b", "2", "-o", "-", image_folder, check_rc=0)
    rows = read_csv(run.stdout)
    assert len(rows) == 2 and all(len(r) == 7505 for r in rows)
    assert {r[0] for r in rows} == {str(image_folder / "a.png"), str(image_folder / "b.jpg")}
    assert "Loading" in run.stderr and "Loading" not in run.stdout


def test_unreadable_files_are_reported_and_the_run_goes_on(tiny_model, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    noise_image(100, 100).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    run = cli("-M", tiny_model, "-w", "0", folder, folder / "missing.png", check_rc=1)
    for name in ["broken.jpg", "empty.png", "missing.png"]:
        assert f"'{folder / name}': " in run.stderr
        assert not (folder / name).with_suffix(".txt").exists()
    assert (folder / "good.txt").exists()
    assert "Tagged 1 image, 3 failed." in run.stderr


def test_extensions_append_and_default_folder(small_model, tmp_path):
    path, names = small_model
    ext_dir = tmp_path / "exts"
    write_extension(ext_dir / "e.safetensors", "brand_new_tag", category="meta")
    img = tmp_path / "x.png"
    noise_image(64, 64).save(img)
    run = cli("-M", path, "-m", "", "-w", "0", "-e", ext_dir, "-o", "-", img, check_rc=0)
    assert len(read_csv(run.stdout)[0]) == 1 + len(names) + 1
    assert "Using tag 'brand_new_tag' (meta) from extension" in run.stderr
    out = tmp_path / "h.csv"
    cli("-M", path, "-m", "", "-w", "0", "-e", ext_dir, "-o", out, img, check_rc=0)
    assert read_csv(out.read_text())[0][-1] == "brand_new_tag"
    # with a calibration that lacks the tag, the extension's tag is ignored (never output)
    cal = tmp_path / "calibration.csv"
    cal.write_text("tag,threshold\ntag_01,0.0\n")
    run = cli("-M", path, "-m", "", "-w", "0", "-e", ext_dir, img, cwd=tmp_path, check_rc=0)
    assert "Ignoring tag 'brand_new_tag' from uncalibrated extension" in run.stderr
    assert "Thresholds: per tag from 'calibration.csv' (current folder): 1 tags can be output." in run.stderr
    assert (tmp_path / "x.txt").read_text() == "tag 01"


def test_errors_are_one_clear_line(small_model, tmp_path):
    path, _ = small_model
    noise_image(32, 32).save(tmp_path / "a.png")  # inputs are checked first: give the model errors a real one
    run = cli("-M", path, "-m", "", "-x", "meta", tmp_path, check_rc=2)
    assert "requires tag metadata" in run.stderr and "Traceback" not in run.stderr
    run = cli("-M", tmp_path / "nope.safetensors", tmp_path, check_rc=2)
    assert "does not exist" in run.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("tag,threshold\na,7\n")
    run = cli("-M", path, "-t", bad, tmp_path, check_rc=2)
    assert "bad.csv: line 2: 'threshold' must be between 0.0 and 1.0" in run.stderr
    assert cli("-S", "32", tmp_path).returncode == 2


def test_missing_default_model_offline_says_what_to_do(tmp_path, monkeypatch):
    import hydra.models.resources as res

    if (res.ROOT / res.DEFAULT_MODEL).exists():
        pytest.skip("a real model is installed in models/")
    noise_image(32, 32).save(tmp_path / "a.png")
    run = cli(tmp_path, check_rc=2)
    assert "HF_HUB_OFFLINE" in run.stderr and "huggingface.co/RedRocket/JTP-3" in run.stderr


def test_interactive_mode_through_stdin(small_model, tmp_path):
    path, names = small_model
    img = tmp_path / "i.png"
    noise_image(80, 60).save(img)
    meta = tmp_path / "meta.csv"
    meta.write_text("tag,category,implications\n" + "".join(f"{n},0,\n" for n in names))
    script = "\n".join(["h", "threshold 2", "threshold -1", str(img), "seqlen 10", "seqlen 128",
                        "exclude general", str(img), "nonexistent.png", "q"]) + "\n"
    run = cli("-M", path, "-m", meta, "--interactive", stdin=script, check_rc=0)
    out = run.stdout
    assert out.startswith("JTP-3 Hydra Interactive Classifier\nType 'q' to quit, or 'h' for help.")
    assert "implications MODE (inherit constrain remove constrain-remove off)" in out
    assert "Threshold must be between -1.0 and 1.0." in out
    assert "Sequence length must be between 64 and 2048." in out
    # stdin is not echoed, so an answer follows the "> " prompt on the same line
    lines = [re.sub(r"^(> )+", "", line) for line in out.splitlines() if line.endswith(tuple(names))]
    assert len(lines) == len(names)  # threshold -1: every tag, once (then all excluded)
    scores = [float(line.split("%")[0].split()[-1]) for line in lines]
    assert scores == sorted(scores, reverse=True) and all(line.startswith("  ") for line in lines)
    assert all(0 <= s <= 100 for s in scores)  # p as a percentage, not the symmetric score (negative below p 0.5)
    assert "'nonexistent.png': file not found" in out


@pytest.mark.slow
def test_full_size_model_tags_a_folder(full_size_model, image_folder):
    """The exact real file format, loaded strictly by the CLI, captions a folder on CPU."""
    run = cli("-M", full_size_model, "-w", "0", "-S", "256", "-r", "-t", "-1", image_folder, check_rc=0)
    assert "7504 tags" in run.stderr and "Tagged 3 images, 0 failed." in run.stderr
    assert len((image_folder / "sub" / "c.txt").read_text(encoding="utf-8").split(", ")) > 100
