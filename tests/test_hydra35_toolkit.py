"""Hydra 3.5 in every tool, end to end on a tiny random-weight file in the exact format: inference.py's captions
(calibrated by default with f1.0@0.1, inherit, model order, upstream's spelling) and every new tag rule and
spelling flag, CSV with a header on stdout, --format, the REPL, the web service and its API fields, CAM through
the mid-block, and calibrate.py from the embedded counts.

Expected outputs are recomputed here from the model's probabilities with the documented rules written out plainly
(thresholds from the counts, the ten modes' tag sets), not with the toolkit's classification code.

Run: venv/bin/python -m pytest tests/test_hydra35_toolkit.py -q
"""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import app
from hydra.tagger import Tagger
from hydra.testing.hydra35 import write_hydra35_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "inference.py")
# label, category, direct implications (fox -> canine -> mammal; a consequent that is not a label ends a chain)
TABLE = [
    ("mammal", "species", []), ("canine", "species", ["mammal"]), ("fox", "species", ["canine"]),
    ("red_fox", "species", ["fox"]), ("wolf", "species", ["canine", "not_a_label"]),
    ("male", "general", []), ("female", "general", []), ("solo", "general", []), ("anthro", "general", []),
    ("blue_eyes", "general", []), ("blue_background", "general", []), ("safe", "meta", []),
    ("explicit", "meta", []), ("by_someone", "artist", []), ("text_(meta)", "meta", []), ("16:9", "meta", []),
    ("zootopia", "copyright", []), ("nick_wilde", "character", ["fox", "zootopia"]),
]
LABELS = [t for t, _, _ in TABLE]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("h35") / "hydra-3.5-test.safetensors"
    return write_hydra35_model(path, LABELS, categories=[c for _, c, _ in TABLE], implies=[i for _, _, i in TABLE],
                               seed=3, background="white", resize="mks2013-linear")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pics")
    for i in range(4):
        img = Image.new("RGB", (160 + 40 * i, 120), (30 + 50 * i, 200 - 40 * i, 90))
        ImageDraw.Draw(img).ellipse((20, 10, 90 + 10 * i, 100), fill=(250 - 30 * i, 120, 20 * i))
        img.save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def tagger(model) -> Tagger:
    return Tagger(model, device="cpu", dtype="fp32")


def cli(*args, stdin=None, check_rc=None):
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, input=stdin,
                          timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


# -- the documented rules (docs/calibration.md, docs/tag-rules.md), written out plainly ---------------------


def grid(n: int) -> np.ndarray:
    """sigmoid(bf16(logit((i + 1) / (n + 1)))) in float32, from the torch reference."""
    import torch

    x = torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)
    return torch.sigmoid(torch.logit(x).to(torch.bfloat16).float()).numpy()


def thresholds(validation: np.ndarray, beta: float = 1.0, floor: float = 0.1) -> dict[str, float]:
    out = {}
    for tag, rows in zip(LABELS, validation.astype(np.float64)):
        tp, fp, _, fn = rows.T
        b2 = beta * beta
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.nan_to_num((1 + b2) * tp / ((1 + b2) * tp + fp + b2 * fn))
            precision = tp / (tp + fp)
        if floor > 0:  # rows under the precision floor (or with no positive prediction) never win
            f = np.where(np.nan_to_num(precision, nan=-1.0) >= floor, f, -np.inf)
        if np.isfinite(f.max()):
            out[tag] = float(grid(len(rows))[int(np.argmax(f))])
    return out


def descendants(tag: str) -> set[str]:
    direct = {t: [c for c in i if c in LABELS] for t, _, i in TABLE}
    seen, todo = set(), list(direct[tag])
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo += direct[c]
    return seen


def inherit_caption(probs: np.ndarray, thr: dict[str, float]) -> str:
    passing = {t for t, p in zip(LABELS, probs) if t in thr and p >= thr[t]}
    present = passing | {d for t in passing for d in descendants(t)}
    return ", ".join(t.replace("_", " ") for t in LABELS if t in present)  # model order, spaces, no escapes


# -- inference.py ------------------------------------------------------------------------------------------


def test_default_captions_are_upstreams(model, images, tagger, tmp_path):
    run = cli("-M", model, "--dtype", "fp32", "-w", "0", images, check_rc=0)
    assert "Calibrating with f1.0@0.1" in run.stderr
    thr = thresholds(tagger.model.validation)
    assert thr, "the fixture's counts give no tag a threshold"
    for path in sorted(images.glob("*.png")):
        probs = tagger.predict_samples([tagger.preprocess(str(path))])[0]
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == inherit_caption(probs, thr), path.name


def test_csv_to_stdout_has_a_header(model, images):
    out = cli("-M", model, "--dtype", "fp32", "-w", "0", "-o", "-", images / "img0.png", check_rc=0).stdout
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["filename", *LABELS] and len(rows) == 2 and len(rows[1]) == 1 + len(LABELS)


def test_metric_changes_the_thresholds(model, images, tagger):
    probs = tagger.predict_samples([tagger.preprocess(str(images / "img1.png"))])[0]
    run = cli("-M", model, "--dtype", "fp32", "-w", "0", "--metric", "f2.0@0.05", "--format", "tags",
              images / "img1.png", check_rc=0)
    thr = thresholds(tagger.model.validation, beta=2.0, floor=0.05)
    expected = sorted(t for t in inherit_caption(probs, thr).split(", ") if t)
    assert sorted(t.replace("_", " ") for t in run.stdout.strip().split(", ") if t) == expected
    assert cli("-M", model, "--metric", "f1", images, check_rc=2).stderr.count("error:") == 1  # upstream's syntax


def test_rules_and_spelling_flags(model, images):
    img = images / "img2.png"
    everything = ["-M", model, "--dtype", "fp32", "-w", "0", "-t", "-1", "-i", "off"]  # p >= 0: every tag
    base = cli(*everything, img, check_rc=0)
    assert (images / "img2.txt").read_text(encoding="utf-8") == ", ".join(t.replace("_", " ") for t in LABELS)
    cli(*everything, "-g", "male", "female", "-C", "rating", "--exclude-tag", "solo", "-a", "fox", "vulpine",
        "-B", "artist", "by ", "-P", img, check_rc=0)
    caption = (images / "img2.txt").read_text(encoding="utf-8").split(", ")
    assert ("male" in caption) != ("female" in caption)  # one group member survives
    assert "safe" not in caption and "explicit" not in caption and "solo" not in caption
    assert "vulpine" in caption and "fox" not in caption and "by by someone" in caption
    assert "text \\(meta\\)" in caption and "16\\:9" in caption
    cli(*everything, "-u", img, check_rc=0)
    assert (images / "img2.txt").read_text(encoding="utf-8") == " ".join(LABELS)
    assert base.returncode == 0


@pytest.mark.parametrize("mode", ["preserve", "inherit", "constrain", "enforce", "enforce-inherit",
                                  "enforce-constrain", "enforce-remove", "remove", "constrain-remove", "off"])
def test_every_implication_mode_gives_upstreams_tag_set(model, images, tagger, mode):
    probs = tagger.predict_samples([tagger.preprocess(str(images / "img3.png"))])[0]
    thr = thresholds(tagger.model.validation)
    s0 = {t for t, p in zip(LABELS, probs) if t in thr and p >= thr[t]}
    desc = lambda tags: {d for t in tags for d in descendants(t)}  # noqa: E731
    enforced = {t for t in s0 if descendants(t) <= s0}
    expected = {"preserve": s0 | desc(s0), "inherit": s0 | desc(s0), "constrain": s0 | desc(s0), "off": s0,
                "remove": s0 - desc(s0), "constrain-remove": s0 - desc(s0), "enforce": enforced,
                "enforce-inherit": enforced, "enforce-constrain": enforced,
                "enforce-remove": enforced - desc(enforced)}[mode]
    run = cli("-M", model, "--dtype", "fp32", "-w", "0", "-i", mode, "--format", "jsonl", images / "img3.png",
              check_rc=0)
    import json

    assert {t["tag"] for t in json.loads(run.stdout)["tags"]} == expected


def test_repl_takes_the_ten_modes(model, images):
    script = f"h\nimplications enforce-remove\nseqlen 128\n{images / 'img0.png'}\nq\n"
    out = cli("-M", model, "--dtype", "fp32", "--interactive", stdin=script, check_rc=0).stdout
    assert out.startswith("Hydra 3.5 Interactive Classifier")
    assert "implications MODE (preserve inherit constrain enforce" in out
    assert "Unknown implications mode" not in out


# -- the web service ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web(model):
    service = app.make_web(app.build_parser().parse_args(["-M", model, "--dtype", "fp32"]))
    yield service
    service.close()


def test_web_defaults_to_the_model_calibration(web, images, tagger):
    from hydra.web.model import SOURCE_MODEL

    m = web.default
    assert m.default_source == SOURCE_MODEL and SOURCE_MODEL in m.sources and m.embedded
    health = web.health()
    assert health["family"] == "hydra35" and health["calibration"] and health["cam"] and health["seqlen"] == 1024
    data = (images / "img0.png").read_bytes()
    out = web.tag_request({}, data)
    probs = tagger.predict_samples([tagger.preprocess(data)])[0]
    assert out["caption"] == inherit_caption(probs, thresholds(tagger.model.validation))
    stricter = web.tag_request({"metric": "f0.5@0.5", "implications": "off"}, data)
    thr = thresholds(tagger.model.validation, 0.5, 0.5)
    assert {t["tag"] for t in stricter["tags"]} == {t for t, p in zip(LABELS, probs) if t in thr and p >= thr[t]}
    from hydra.web.model import UserError

    with pytest.raises(UserError, match="metric"):
        web.tag_request({"metric": "f1"}, data)
    with pytest.raises(UserError, match="Unknown implications mode"):
        web.tag_request({"implications": "sideways"}, data)


def test_cam_runs_through_the_mid_block(web, images):
    m = web.default
    key = web.add_image((images / "img1.png").read_bytes(), "img1.png")
    overlay = web.cam(m, key, 1024, "fox", 2)
    assert overlay.size == web.entry(key).display.size and m.cam_depth == 2


# -- calibrate.py -----------------------------------------------------------------------------------------


def test_calibrate_writes_the_embedded_calibration(model, tagger, tmp_path):
    out = tmp_path / "cal.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "calibrate.py"), "-M", model, "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert list(rows[0]) == ["tag", "threshold", "f1.0@0.1"]
    expected = thresholds(tagger.model.validation)
    got = {r["tag"]: float(r["threshold"]) for r in rows}
    assert set(got) == set(expected)
    for tag, thr in expected.items():  # %.4f of the chosen grid value, minus the CSV's epsilon
        assert math.isclose(got[tag], round(thr - 0.0001, 4), abs_tol=1e-9), tag


def test_a_replacing_extension_keeps_the_tags_category_and_implications(model, images, tmp_path):
    from hydra.testing.hydra35 import write_hydra35_extension

    ext = write_hydra35_extension(tmp_path / "ext" / "fox.safetensors", "fox", category=None, seed=5)
    run = cli("-M", model, "--dtype", "fp32", "-w", "0", "-e", ext, "-t", "-1", "--format", "tags",
              images / "img0.png", check_rc=0)
    assert "Using tag 'fox' (species)" in run.stderr
    assert "fox" in run.stdout.split(", ")
    run = cli("-M", model, "--dtype", "fp32", "-w", "0", "-e", ext, "-t", "-1", "-C", "species", "--format", "tags",
              images / "img0.png", check_rc=0)
    assert not {"fox", "canine", "mammal"} & set(run.stdout.strip().split(", "))


def test_a_category_beyond_e621s_is_matched_by_name(images, tmp_path):
    path = write_hydra35_model(tmp_path / "own.safetensors", ["plain", "odd_tag"], categories=["general", "foo"],
                               seed=2)
    pic = tmp_path / "pic.png"
    pic.write_bytes((images / "img0.png").read_bytes())
    cli("-M", path, "--dtype", "fp32", "-w", "0", "-t", "-1", "-B", "foo", "FOO:", "--", pic, check_rc=0)
    assert set(pic.with_suffix(".txt").read_text(encoding="utf-8").split(", ")) == {"plain", "FOO:odd tag"}
    run = cli("-M", path, "--dtype", "fp32", "-w", "0", "-t", "-1", "-C", "foo", "--format", "tags",
              images / "img0.png", check_rc=0)
    assert run.stdout.strip() == "plain"
    run = cli("-M", path, "--dtype", "fp32", "-w", "0", "-C", "bar", images / "img0.png", check_rc=2)
    assert "unknown category 'bar'; choose from general" in run.stderr and " foo " in run.stderr
    assert "Traceback" not in run.stderr


def test_an_empty_folder_is_an_error(model, tmp_path):
    (tmp_path / "empty").mkdir()
    run = cli("-M", model, "-w", "0", tmp_path / "empty", check_rc=1)
    assert run.stderr.strip().splitlines()[-1].startswith("error: no image files found in ")
