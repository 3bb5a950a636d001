"""The interactive classifier (inference.py without paths): commands through stdin, and line editing, history
and tab completion through a pseudo-terminal.

    venv/bin/python -m pytest tests/test_interactive.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, Terminal, noise_image

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


@pytest.fixture
def tty_repl(repl_files):
    """inference.py without paths on a pseudo-terminal, in the image's folder; each key is typed only once the
    prompt is back (keys typed earlier are echoed by the terminal itself before readline reads them)."""
    pytest.importorskip("readline")
    path, meta, img, names = repl_files
    env = {**os.environ, "TERM": "xterm"}
    term = Terminal([sys.executable, SCRIPT, "-M", str(path), "-m", str(meta)], img.parent, env)
    term.expect("> ", timeout=180)  # the model loads first
    yield term
    term.kill()


def test_up_arrow_recalls_and_edits_earlier_commands(tty_repl):
    term = tty_repl
    term.type("threshold 0.3")
    term.expect("Threshold 0.3 (p >= 0.650) for every tag.")
    term.expect("> ")
    term.type("\x1b[A")  # up: the previous line, run again as it is
    term.expect("Threshold 0.3 (p >= 0.650) for every tag.")
    term.expect("> ")
    term.type("thresold 0.3")
    term.expect("Unknown command 'thresold'; type 'h' for help")
    term.expect("> ")
    term.type("\x1b[A\x1b[A\x7f4")  # two lines back, and its last character replaced
    term.expect("Threshold 0.4 (p >= 0.700) for every tag.")
    term.expect("> ")
    term.type("q")
    assert term.finish() == 0
    assert "^[[A" not in term.seen  # the arrows reached readline, not the terminal's echo


def test_tab_completes_commands_categories_and_paths(tty_repl, repl_files):
    term, (*_, img, names) = tty_repl, repl_files
    (img.parent / "sub dir").mkdir()
    noise_image(64, 64, 5).save(img.parent / "sub dir" / "other.png")
    term.type("thr\t", end="")
    term.expect("threshold ")  # the command, and the space before its argument
    term.type("-1")
    term.expect("Threshold -1 (p >= 0.000) for every tag.")
    term.expect("> ")
    term.type("exclude sp\t")
    term.expect("Excluding species; excluded categories: species.")
    term.expect("> ")
    term.type("my\t")  # a file in the current folder, with a space in its name
    tagged = term.expect("> ")
    assert "my pic.png" in tagged and sum(line.endswith(tuple(names)) for line in tagged.splitlines()) == 11
    term.type("su\tot\t")  # a folder (completed up to its separator), then a file in it after the space
    tagged = term.expect("> ")
    assert "sub dir/other.png" in tagged and "file not found" not in tagged
    assert sum(line.endswith(tuple(names)) for line in tagged.splitlines()) == 11
    term.type("q")
    assert term.finish() == 0
