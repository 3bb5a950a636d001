"""The interactive classifier (inference.py without paths): commands through stdin.

    venv/bin/python -m pytest tests/test_interactive.py -q
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, noise_image

SCRIPT = str(ROOT / "inference.py")


@pytest.fixture
def repl_files(small_model, tmp_path):
    path, names = small_model
    img = tmp_path / "my pic.png"
    noise_image(80, 60).save(img)
    meta = tmp_path / "meta.csv"  # general tags, one species and one meta tag
    cats = {"tag_10": 5, "tag_11": 7}
    meta.write_text("tag,category,implications\n" + "".join(f"{n},{cats.get(n, 0)},\n" for n in names))
    return path, meta, img, names


def repl(files, *lines):
    path, meta, *_ = files
    proc = subprocess.run([sys.executable, SCRIPT, "--interactive", "-M", path, "-m", meta], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_unknown_commands_and_missing_arguments_are_named(repl_files):
    out = repl(repl_files, "thresold 0.3", "threshold", "exclude", "nosuchfile.png", "q")
    assert "Unknown command 'thresold'; type 'h' for help" in out
    assert "'threshold' needs an argument" in out and "'exclude' needs an argument" in out
    assert "'nosuchfile.png': file not found" in out  # a file name is still a file


def test_every_setting_change_is_confirmed(repl_files):
    out = repl(repl_files, "threshold 0.2", "exclude meta", "include meta", "implications off", "seqlen 256", "q")
    assert "Threshold 0.2 (p >= 0.600) for every tag." in out
    assert "Excluding meta; excluded categories: meta." in out
    assert "Including meta; excluded categories: none." in out
    assert "Implications: off." in out and "Sequence length 256." in out


def test_quoted_paths_and_images_with_no_passing_tag(repl_files):
    *_, img, names = repl_files
    out = repl(repl_files, "threshold -1", f"'{img}'", "threshold 1", f'"{img}"', "q")
    tagged = [line for line in out.splitlines() if line.endswith(tuple(names))]
    assert len(tagged) == len(names)
    assert "No tag passes the current settings" in out


def test_help_lists_the_models_categories(repl_files):
    out = repl(repl_files, "h", "q")
    assert "exclude CATEGORY (general species meta color rating)" in out
