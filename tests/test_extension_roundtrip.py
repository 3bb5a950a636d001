"""End to end: train a new tag on CPU, build it, tag images with it, calibrate it, rename it, replace a tag.

A tiny random JTP-3 model and generated images: the positives show a large red square on a noisy
background, the negatives do not. The chain: train_extension.py (features cached by a loader worker) ->
build_extension.py -> inference.py -e (held-out positives score clearly higher than held-out negatives)
-> calibrate.py (uses the extension's validation) -> edit_metadata.py (rename) -> inference.py (the new
name; and a tag replaced through an extension). inference.py and calibrate.py run as subprocesses; the
three new scripts run in this process through their `main(args)` (each subprocess costs ~5 s of imports
on this CPU). Also: Ctrl-C in a real training process stops at the end of the epoch and saves, -r resumes
from that checkpoint; the CLI's sanity checks and --no-train.

Run: venv/bin/python -m pytest tests/test_extension_roundtrip.py -q      (about 30-60 s on 2 CPU cores)
"""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import build_extension
import edit_metadata
import train_extension
from hydra.testing.jtp3 import write_model

REPO = Path(__file__).resolve().parents[1]
TAGS = ["alpha", "beta", "gamma"]
TAG = "red_square"
N_TRAIN, N_HELD = 40, 8  # per class
TRAIN_FLAGS = ["-b", "8", "-v", "8", "--force", "--lr", "2e-2", "--warmup-steps", "5"]


def make_image(path, positive: bool, rng: random.Random) -> None:
    """A noisy, never-red background; positives get a red square covering 25-65% of the image."""
    w, h = rng.choice([(64, 64), (80, 64), (64, 96), (96, 96)])
    base = np.array([rng.randrange(20, 110), rng.randrange(40, 200), rng.randrange(40, 200)], dtype=np.float32)
    arr = base + np.random.default_rng(rng.randrange(1 << 30)).normal(0, 20, (h, w, 3))
    if positive:
        s = rng.randrange(int(0.5 * min(w, h)), int(0.8 * min(w, h)))
        y, x = rng.randrange(0, h - s), rng.randrange(0, w - s)
        arr[y:y + s, x:x + s] = [255, 0, 0]
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    rng = random.Random(0)
    for sub, positive in (("positive", True), ("negative", False)):
        folder = root / "train" / TAG / sub
        folder.mkdir(parents=True)
        for i in range(N_TRAIN):
            make_image(folder / f"{i:03d}.png", positive, rng)
    (root / "held").mkdir()
    for i in range(N_HELD):
        make_image(root / "held" / f"pos{i}.png", True, rng)
        make_image(root / "held" / f"neg{i}.png", False, rng)
    write_model(root / "model.safetensors", TAGS)
    return root


def script(ws, name, *argv, check=True):
    proc = subprocess.run([sys.executable, str(REPO / name), *map(str, argv)], cwd=ws, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def main(module, *argv):
    """Run a script's main() in this process, as `python script.py ARGV...` would."""
    code = module.main(module.build_parser().parse_args([str(a) for a in argv]))
    assert code == 0, f"{module.__name__} {argv} returned {code}"


def probabilities(ws, *extensions):
    """{column: {image name: p}} from `inference.py -o out.csv` on the held-out images."""
    ext_flags = [a for e in extensions for a in ("-e", e)]
    script(ws, "inference.py", "-M", "model.safetensors", "-E", *ext_flags, "-m", "", "-t", "0.5", "-d", "cpu",
           "-w", "0", "-o", "out.csv", "held")
    with open(ws / "out.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {col: {os.path.basename(r["filename"]): float(r[col]) for r in rows} for col in rows[0] if col != "filename"}


def test_train_build_tag_calibrate_rename_replace(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    # 1. train on CPU; features cached by one loader worker
    main(train_extension, "-M", "model.safetensors", "-d", "cpu", "-e", "12", "-c", "5", "-W", "1", *TRAIN_FLAGS, TAG)
    out, err = capsys.readouterr()
    epochs = [line for line in out.splitlines() if line.startswith("EPOCH ")]
    assert len(epochs) == 12 and epochs[-1].startswith("EPOCH 12 VALIDATION: loss=")
    assert "Loading 'model.safetensors' ... 3 tags" in err and "caching: 100%" in err
    assert "80 computed" in err and "failed=0" in err
    ckpts = sorted(os.listdir(ws / "train" / TAG / "checkpoints"))
    assert sorted(int(c.split("_e")[1][:-3]) for c in ckpts) == [5, 10, 12]  # every 5 epochs and the last
    ckpt = ws / "train" / TAG / "checkpoints" / next(c for c in ckpts if c.endswith("_e12.pt"))

    # 2. build; 3. tag held-out images with it
    main(build_extension, "-o", ".", ckpt, TAG, "general")
    probs = probabilities(ws, f"{TAG}.safetensors")
    assert list(probs) == [*TAGS, TAG]
    pos = [p for name, p in probs[TAG].items() if name.startswith("pos")]
    neg = [p for name, p in probs[TAG].items() if name.startswith("neg")]
    assert np.mean(pos) > 0.6 and np.mean(pos) - np.mean(neg) > 0.4, (pos, neg)
    assert np.median(pos) > max(np.median(neg), 0.5), (pos, neg)

    # 4. calibrate picks up the extension's validation counts
    (ws / "val.csv").write_text("tag,threshold,tp,fp,tn,fn\nalpha,0.5,8,4,86,2\n", encoding="utf-8")
    cal = script(ws, "calibrate.py", "--data", "val.csv", "-E", "-e", f"{TAG}.safetensors", "-o", "cal.csv")
    assert f"Calibrating tag '{TAG}'" in cal.stderr
    rows = {r["tag"]: r for r in csv.DictReader(open(ws / "cal.csv", newline="", encoding="utf-8"))}
    assert set(rows) == {"alpha", TAG} and 0.0 <= float(rows[TAG]["threshold"]) <= 1.0

    # 5. rename it; 6. replace an existing tag ("beta") with the same weights through another extension
    main(edit_metadata, f"{TAG}.safetensors", "classifier.label=crimson_box")
    assert (ws / f"{TAG}.safetensors.bak").is_file()
    (ws / "replace").mkdir()
    main(build_extension, "-o", "replace", ckpt, "beta", "general")
    probs2 = probabilities(ws, f"{TAG}.safetensors", "replace")
    assert list(probs2) == [*TAGS, "crimson_box"]
    assert probs2["crimson_box"] == probs[TAG] and probs2["beta"] == probs[TAG]
    assert probs2["alpha"] == probs["alpha"] and probs2["gamma"] == probs["gamma"]


def test_ctrl_c_saves_at_the_end_of_the_epoch_and_resume_continues(ws, capsys, monkeypatch):
    argv = [sys.executable, str(REPO / "train_extension.py"), "-M", "model.safetensors", "-d", "cpu", "-W", "0",
            "-D", "train", *TRAIN_FLAGS, TAG]
    proc = subprocess.Popen(argv, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        line = proc.stdout.readline()
        while not line.startswith("EPOCH 1 ") and time.monotonic() < deadline:
            assert line or proc.poll() is None, proc.stderr.read()
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Interrupted. Stopping at the end of this epoch." in err
    saved = err.split("Saved checkpoint '")[-1].split("'")[0]
    epoch = int(saved.rsplit("_e", 1)[1][:-3])
    # The signal may land between epoch 1's EPOCH line and its stop check, so count that line too.
    assert (line + out).splitlines()[-1].startswith(f"EPOCH {epoch} VALIDATION")

    monkeypatch.chdir(ws)
    capsys.readouterr()
    main(train_extension, "-M", "model.safetensors", "-d", "cpu", "-W", "0", "-b", "8", "-v", "8", "--force",
         "-r", os.path.basename(saved), "-e", epoch + 2, TAG)
    lines = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert lines == [f"EPOCH {epoch + 1} VALIDATION", f"EPOCH {epoch + 2} VALIDATION"]
    args = train_extension.build_parser().parse_args(["-r", os.path.basename(saved), "--lr", "1", TAG])
    assert train_extension.main(args) == 2 and "--resume" in capsys.readouterr().err


def test_sanity_checks_stop_training_without_force(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    args = train_extension.build_parser().parse_args(["-M", "model.safetensors", "-d", "cpu", "-W", "0", TAG])
    assert train_extension.main(args) == 2
    err = capsys.readouterr().err
    assert "Training dataset of size 40 is too small" in err and "Use --force to train anyway." in err


def test_no_train_only_builds_the_cache(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    bad = ws / "train" / TAG / "negative" / "zz_broken.png"
    bad.write_bytes(b"not an image")
    try:
        args = train_extension.build_parser().parse_args(
            ["-M", "model.safetensors", "-d", "cpu", "-W", "0", "--no-train", "--cache-tag", "nt", TAG])
        assert train_extension.main(args) == 1  # one image failed
    finally:
        bad.unlink()
    out, err = capsys.readouterr()
    assert out == "" and "zz_broken.png" in err and "failed=1" in err and "80 computed" in err
    assert not (ws / "train" / TAG / "checkpoints" / "nt").exists()
