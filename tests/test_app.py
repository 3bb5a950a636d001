"""app.py and hydra/web/: the web UI's logic in-process, then the real server over HTTP.

In-process (a `WebService` loaded by `app.make_web`, as `python app.py` does, with a JTP-3 model and two DINOv3
taggers, one vocabulary with categories and one without): the UI and the CLI give the same tags for both
families, calibrations compare probabilities with per-tag thresholds, control changes and model switches
re-filter without running a model twice, top-k selection, DINOv3 categories and exclusion, CAM (and its
refusal for DINOv3), batch zips, the flag checks made before loading, and clear errors for bad files or
an unknown model. Then `app.py` runs as a subprocess on a free local port (default host 127.0.0.1, a
calibration.csv in its folder, an extension, a JTP-3 + DINOv3 pair) and is driven with `gradio_client`
and the JSON API: results, the `model` field, 4xx errors, URL fetching from a local server, concurrent
requests, and the server surviving bad requests. Tiny fixture models; no internet.

Run: venv/bin/python -m pytest tests/test_app.py -q   (about 1 minute on 2 CPU cores)
"""

from __future__ import annotations

import csv
import html
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

import app
from hydra.tags.rules import TagSettings, format_caption, from_symmetric, load_calibration, load_metadata
from hydra.testing.dinov3 import write_dinov3_checkpoint, write_vocab
from hydra.testing.jtp3 import write_extension, write_model
from hydra.web.model import SOURCE_DEFAULT, SOURCE_TOPK, SOURCE_UPLOAD, UserError
from hydra.web.service import FETCH_ERROR, NO_CAM, Limits

ROOT = Path(__file__).resolve().parent.parent
TAGS_CSV = ROOT / "data" / "jtp-3-hydra-tags.csv"
# Real tags (safe for a screenshot), with implication chains (red_fox -> true_fox -> fox -> canine -> canid
# -> mammal) and several categories (species, character, copyright, meta).
FIXTURE_TAGS = sorted([
    "4_toes", "ambiguous_gender", "black_nose", "canid", "canine", "cloud", "day", "detailed",
    "detailed_background", "digital_media_(artwork)", "dipstick_tail", "english_text", "explicit", "feet",
    "feral", "flower", "fluffy", "fluffy_tail", "fox", "fur", "grass", "green_eyes", "judy_hopps", "lagomorph",
    "landscape", "looking_at_viewer", "mammal", "mountain", "multicolored_tail", "nature", "nick_wilde",
    "open_mouth", "orange_body", "orange_fur", "outside", "paws", "plant", "quadruped", "questionable",
    "red_fox", "safe", "signature", "simple_background", "sky", "smile", "snout", "solo", "standing", "sun",
    "tail", "tail_markings", "teeth", "text", "toes", "tongue", "tree", "true_fox", "water", "whiskers",
    "white_background", "white_body", "yellow_eyes", "zootopia",
])
EXTENSION_TAG = "glowing_tail"
# The DINOv3 fixture's vocabulary: the same tags in its spelling (spaces) plus some Danbooru ones. Categories are
# the real e621 ones, except a few left out of the mapping or set to -1 (both shown as "unassigned").
DINO_TAGS = [t.replace("_", " ") for t in FIXTURE_TAGS] + ["1girl", "hi res", "fate (series)", "\\m/"]
DINO_CATEGORIES = {**{t.replace("_", " "): c for t, c in load_metadata(TAGS_CSV).category.items()
                      if t in FIXTURE_TAGS and t not in ("zootopia", "sky")},
                   "1girl": 0, "hi res": 7, "fate (series)": 3, "\\m/": -1}
DINO = "tagger_proto.safetensors"  # its name in the selector and the API


def cartoon(width: int = 640, height: int = 480) -> Image.Image:
    """A deterministic cartoon: a fox on a hill under a sunny sky, with a tree (for tests and the README)."""
    w, h = width, height
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for y in range(h):  # sky gradient
        t = y / h
        d.line([(0, y), (w, y)], fill=(int(80 + 120 * t), int(150 + 80 * t), int(230 + 20 * t)))
    d.ellipse((0.78 * w, 0.06 * h, 0.92 * w, 0.06 * h + 0.14 * w), fill=(255, 214, 64))
    for cx, cy, rx, ry in ((0.25, 0.55, 0.2, 0.06), (0.6, 0.3, 0.14, 0.045)):
        d.ellipse(((cx - rx) * w, (cy - ry) * h, (cx + rx) * w, (cy + ry) * h), fill=(245, 248, 255))
    d.ellipse((-0.3 * w, 0.62 * h, 0.8 * w, 1.6 * h), fill=(98, 178, 82))
    d.ellipse((0.35 * w, 0.7 * h, 1.4 * w, 1.7 * h), fill=(76, 152, 70))
    d.rectangle((0.12 * w, 0.42 * h, 0.16 * w, 0.72 * h), fill=(110, 72, 40))
    d.ellipse((0.03 * w, 0.22 * h, 0.25 * w, 0.52 * h), fill=(46, 120, 58))
    # the fox: tail, body, head, ears, muzzle, eyes, nose
    orange, white, dark = (230, 120, 40), (250, 245, 235), (30, 24, 20)
    d.ellipse((0.36 * w, 0.58 * h, 0.56 * w, 0.72 * h), fill=orange)
    d.ellipse((0.35 * w, 0.58 * h, 0.41 * w, 0.66 * h), fill=white)
    d.ellipse((0.48 * w, 0.55 * h, 0.72 * w, 0.8 * h), fill=orange)
    d.ellipse((0.52 * w, 0.66 * h, 0.66 * w, 0.8 * h), fill=white)
    d.polygon([(0.56 * w, 0.33 * h), (0.59 * w, 0.18 * h), (0.63 * w, 0.33 * h)], fill=orange)
    d.polygon([(0.67 * w, 0.33 * h), (0.71 * w, 0.18 * h), (0.74 * w, 0.33 * h)], fill=orange)
    d.ellipse((0.54 * w, 0.27 * h, 0.76 * w, 0.57 * h), fill=orange)
    d.polygon([(0.57 * w, 0.45 * h), (0.73 * w, 0.45 * h), (0.65 * w, 0.58 * h)], fill=white)
    for ex in (0.6, 0.7):
        d.ellipse(((ex - 0.015) * w, 0.37 * h, (ex + 0.015) * w, 0.41 * h), fill=dark)
    d.ellipse((0.635 * w, 0.53 * h, 0.665 * w, 0.57 * h), fill=dark)
    return img


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def make_fixture(folder: Path) -> dict[str, Path]:
    """Model, extension, images and calibration files for a server running in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "model": Path(write_model(folder / "model.safetensors", FIXTURE_TAGS, seed=7)),
        "extension": Path(write_extension(folder / "ext" / f"{EXTENSION_TAG}.safetensors", EXTENSION_TAG,
                                          implies=["tail"], seed=2)),
        "image": folder / "fox.png", "other": folder / "other.jpg", "corrupt": folder / "corrupt.png",
        "calibration": folder / "calibration.csv", "bad_calibration": folder / "bad.csv",
        # DINOv3: one checkpoint with its vocabulary beside it (found without --vocab), one without
        "dino": folder / "dino" / DINO, "dino_vocab": folder / "dino" / "tagger_vocab_with_categories.json",
        "dino_plain": folder / "dino-plain.safetensors", "plain_vocab": folder / "plain-vocab.json",
    }
    files["dino"].parent.mkdir()
    write_dinov3_checkpoint(files["dino"], DINO_TAGS, head="lowrank", seed=5)
    write_vocab(files["dino_vocab"], DINO_TAGS, DINO_CATEGORIES)
    write_dinov3_checkpoint(files["dino_plain"], DINO_TAGS, seed=6)
    write_vocab(files["plain_vocab"], DINO_TAGS)
    cartoon().save(files["image"])
    cartoon(300, 420).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(files["other"], quality=90)
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0garbage" * 50)
    # thresholds for a handful of tags only: every other tag must never pass
    rows = ["tag,threshold,cti", "canine,0.2,0.5", "fox,0.1,0.5", "sky,0.05,0.5", "tail,0.3,0.5",
            "safe,0.5,0.5", "zootopia,,0.5"]
    files["calibration"].write_text("\n".join(rows) + "\n", encoding="utf-8")
    files["bad_calibration"].write_text("tag,threshold\ncanine,1.5\n", encoding="utf-8")
    return files


def server_args(files: dict[str, Path], *extra: str, models: tuple[str, ...] = ("model", "dino")) -> list[str]:
    """The JTP-3 fixture model (with metadata and an extension) and the DINOv3 one, in this order."""
    return [*(a for m in models for a in ("-M", str(files[m]))), "-m", str(TAGS_CSV), "-E",
            "-e", str(files["extension"].parent), "--dtype", "fp32", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, args: list[str], timeout: float = 240) -> tuple[subprocess.Popen, str]:
    """Run `python app.py` in `folder` on a free port; returns (process, base URL) once it answers."""
    port = free_port()
    log = open(folder / "server.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *args], cwd=folder,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{(folder / 'server.log').read_text()}")
        try:
            if requests.get(url + "/api/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"app.py did not answer within {timeout} s:\n{(folder / 'server.log').read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- in-process: the WebTagger behind the UI ------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory) -> dict[str, Path]:
    return make_fixture(tmp_path_factory.mktemp("webui"))


@pytest.fixture(scope="module")
def web(fixture_files):
    folder = fixture_files["model"].parent
    old = os.getcwd()
    os.chdir(folder)  # calibration.csv is looked up in the current folder, as by the CLI
    try:
        # the first DINOv3 model gets --vocab, the second finds its vocabulary beside its checkpoint
        args = app.build_parser().parse_args(server_args(
            fixture_files, "--vocab", str(fixture_files["plain_vocab"]), "--max-upload-mb", "1",
            models=("model", "dino_plain", "dino")))
        web = app.make_web(args)
    finally:
        os.chdir(old)
    yield web
    web.close()


def test_parser_defaults_bind_localhost():
    args = app.build_parser().parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert args.model is None and args.extension == [] and not args.no_default_extensions
    assert args.vocab == [] and args.max_size is None and args.seqlen is None and not args.exif  # None: not given
    assert "Repeat to serve several" in " ".join(app.build_parser().format_help().split())
    with pytest.raises(SystemExit):
        app.build_parser().parse_args(["--help"])


@pytest.fixture(scope="module")
def jtp(web):
    return web.model()


@pytest.fixture(scope="module")
def dino(web):
    return web.model(DINO)


def test_loads_every_model_like_the_cli(web, jtp, dino, fixture_files):
    assert list(web.models) == ["model.safetensors", "dino-plain.safetensors", DINO]
    plain = web.model("dino-plain.safetensors")
    assert web.default is jtp and jtp.family.name == "jtp3" and dino.family.name == plain.family.name == "dinov3"
    assert jtp.labels == [*FIXTURE_TAGS, EXTENSION_TAG]
    assert jtp.default_calibration == load_calibration(fixture_files["calibration"])
    assert jtp.settings.mode == "inherit" and jtp.has_implications and jtp.default_source == SOURCE_DEFAULT
    assert [e.label for e in jtp.tagger.model.extensions] == [EXTENSION_TAG]
    # DINOv3: --vocab went to the first DINOv3 model, the second found its own; calibration.csv is JTP-3's only
    assert plain.tagger.model.vocab_path == str(fixture_files["plain_vocab"])
    assert dino.tagger.model.vocab_path == str(fixture_files["dino_vocab"])
    assert dino.labels == plain.labels == DINO_TAGS
    assert dino.has_categories and not plain.has_categories and not dino.has_implications
    assert dino.default_calibration is None and dino.default_mode == "off"
    assert (dino.default_source, dino.default_topk, dino.default_size) == (SOURCE_TOPK, 30, 1024)
    assert SOURCE_DEFAULT not in dino.sources


def test_ui_tags_equal_cli_tags(web, jtp, fixture_files):
    data = fixture_files["image"].read_bytes()
    key = web.add_image(data, "fox.png")
    probs = web.probabilities(jtp, key, 1024)
    cli_probs = jtp.tagger.predict_samples([jtp.tagger.preprocess(str(fixture_files["image"]))])[0]
    np.testing.assert_array_equal(probs, cli_probs)
    for threshold in (-0.5, 0.0, 0.3):
        cli = TagSettings(jtp.labels, jtp.settings.metadata, jtp.settings.rewrite, from_symmetric(threshold),
                          "inherit", [7]).rules()  # what `inference.py -t T -x meta` applies
        ui = jtp.classify(probs, jtp.rules(threshold, mode="inherit", exclude=["meta"]))
        assert dict(ui) == cli.classify(probs)
        assert [p for _, p in ui] == sorted((p for _, p in ui), reverse=True)
        assert not any(jtp.category_name(t) == "meta" for t, _ in ui)


def test_dinov3_tags_equal_cli_tags(web, dino, fixture_files):
    key = web.add_image(fixture_files["image"].read_bytes(), "fox.png")
    probs = web.probabilities(dino, key, 1024)
    cli_probs = dino.tagger.predict_samples([dino.tagger.preprocess(str(fixture_files["image"]))])[0]
    np.testing.assert_array_equal(probs, cli_probs)  # no EXIF, alpha dropped: the published preprocessing
    top = dino.classify(probs, dino.rules(source=dino.default_source))
    assert len(top) == 30 and dict(top) == dino.settings.rules().classify(probs)  # `inference.py -M ...`: top 30
    cli = TagSettings(dino.labels, dino.settings.metadata, dino.settings.rewrite, from_symmetric(-0.2), "off",
                      [5, 7]).rules()  # `inference.py -M ... -t -0.2 -x species -x meta`
    ui = dino.classify(probs, dino.rules(-0.2, exclude=["species", "meta"]))
    assert dict(ui) == cli.classify(probs) and ui
    assert {dino.category_name(t) for t, _ in ui} <= {"general", "character", "copyright", "lore", "unassigned"}


def test_calibration_compares_probabilities_per_tag(web, jtp, fixture_files):
    key = web.add_image(fixture_files["image"].read_bytes(), "fox.png")
    probs = web.probabilities(jtp, key, 1024)
    cal = jtp.default_calibration
    tags = dict(jtp.classify(probs, jtp.rules(source=SOURCE_DEFAULT, mode="off")))
    expected = {t for t, thr in cal.items() if probs[jtp.position[t]] >= thr}
    assert set(tags) == expected  # p >= threshold (not 2p - 1), and uncalibrated tags never pass
    assert set(tags) <= set(cal)
    uploaded = jtp.load_calibration(str(fixture_files["calibration"]))
    assert dict(jtp.classify(probs, jtp.rules(source=SOURCE_UPLOAD, calibration=uploaded, mode="off"))) == tags


def test_dinov3_calibration_upload(web, dino, fixture_files, tmp_path):
    path = tmp_path / "dino.csv"
    path.write_text("tag,threshold\nred fox,0.01\nfate (series),0.02\nsky,0.99\n", encoding="utf-8")
    cal = dino.load_calibration(str(path))
    probs = web.probabilities(dino, web.add_image(fixture_files["image"].read_bytes(), "fox.png"), 1024)
    tags = dict(dino.classify(probs, dino.rules(source=SOURCE_UPLOAD, calibration=cal)))
    assert set(tags) == {t for t, thr in cal.items() if probs[dino.position[t]] >= thr} and "red fox" in tags
    with pytest.raises(UserError, match="calibration.csv is not used for DINOv3 tagger models"):
        dino.rules(source=SOURCE_DEFAULT)


def test_control_changes_and_model_switches_reuse_the_cached_probabilities(web, jtp, dino, fixture_files):
    data = fixture_files["other"].read_bytes()
    key = web.add_image(data, "other.jpg")
    calls = web.model_calls
    first = web.probabilities(jtp, key, 1024)
    assert web.model_calls == calls + 1
    for threshold, mode, exclude in ((0.9, "off", []), (-1.0, "constrain", ["species"]), (0.1, "remove", [])):
        jtp.classify(web.probabilities(jtp, key, 1024), jtp.rules(threshold, mode=mode, exclude=exclude))
    assert web.add_image(data, "again.jpg") == key
    np.testing.assert_array_equal(web.probabilities(jtp, key, 1024), first)
    assert web.model_calls == calls + 1  # re-filtering never ran the model again
    web.probabilities(jtp, key, 256)  # a new sequence length does
    assert web.model_calls == calls + 2
    # another model runs once for the same image (same size number, different meaning); switching back and
    # forth after that only re-filters
    assert web.probabilities(dino, key, 1024).shape == (len(DINO_TAGS),)
    for model in (jtp, dino, jtp, dino):
        web.probabilities(model, key, 1024)
    assert web.model_calls == calls + 3 and dino.calls >= 1
    web.probabilities(dino, key, 512)  # a new max size runs it again
    assert web.model_calls == calls + 4


def test_topk_selection(web, jtp, fixture_files):
    probs = web.probabilities(jtp, web.add_image(fixture_files["image"].read_bytes(), "fox.png"), 1024)
    top = jtp.classify(probs, jtp.rules(source=SOURCE_TOPK, topk=5, mode="off"))
    assert [t for t, _ in top] == [jtp.labels[i] for i in np.argsort(-probs, kind="stable")[:5]]
    assert len(jtp.classify(probs, jtp.rules(source=SOURCE_TOPK, topk="1000", mode="off"))) == len(jtp.labels)
    for bad in (0, "x", 2.5, float("nan")):
        with pytest.raises(UserError, match="Top k must be a whole number"):
            jtp.rules(source=SOURCE_TOPK, topk=bad)


def test_dinov3_categories_grouping_and_what_is_not_available(web, dino, fixture_files):
    from hydra.web import handlers

    plain = web.model("dino-plain.safetensors")
    assert dino.category_name("red fox") == "species" and dino.category_name("fate (series)") == "copyright"
    assert dino.category_name("\\m/") == dino.category_name("sky") == "unassigned"  # -1, and not in the file
    assert plain.category_name("red fox") is None
    key = web.add_image(fixture_files["image"].read_bytes(), "fox.png")
    every = dino.classify(web.probabilities(dino, key, 1024), dino.rules(-1.0))
    assert len(every) == len(DINO_TAGS)
    groups = handlers.groups_html(dino, every)
    assert "<h4>species (" in groups and "<h4>unassigned (" in groups and "<h4>copyright (1)" in groups
    assert "Categories are unknown" in handlers.groups_html(plain, every)
    with pytest.raises(UserError, match="needs tag categories, which 'dino-plain.safetensors' does not have"):
        plain.rules(exclude=["meta"])
    with pytest.raises(UserError, match="implication data"):
        dino.rules(mode="inherit")
    with pytest.raises(UserError, match=r"CAM is not available for 'tagger_proto.safetensors' \(DINOv3 tagger models have none\)"):
        web.cam(dino, key, 1024, "red fox", 1)
    assert web.cam(dino, key, 1024, NO_CAM, 1) is web.entry(key).display
    with pytest.raises(UserError, match=r"Unknown model 'nope'; choose from 'model.safetensors', 'dino-plain"):
        web.model("nope")


@pytest.mark.parametrize("bad, message", [
    ({"threshold": 1.5}, "between -1 and 1"), ({"threshold": "abc"}, "between -1 and 1"),
    ({"mode": "sideways"}, "Unknown implications mode"), ({"exclude": ["nope"]}, "Unknown category"),
    ({"source": "somewhere"}, "Unknown threshold source"), ({"source": SOURCE_UPLOAD}, "Upload a calibration"),
])
def test_rules_reject_bad_settings(jtp, bad, message):
    with pytest.raises(UserError, match=message):
        jtp.rules(**bad)


def test_bad_inputs_give_clear_errors(web, jtp, fixture_files, tmp_path):
    with pytest.raises(UserError, match="Not a usable image"):
        web.add_image(fixture_files["corrupt"].read_bytes(), "corrupt.png")
    with pytest.raises(UserError, match="No image"):
        web.read_file(None)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (2 * 2**20))
    with pytest.raises(UserError, match="over the 1 MiB limit") as e:
        web.read_file(str(big))
    assert e.value.status == 413
    with pytest.raises(UserError, match=r"Could not fetch the URL \(refused"):
        web.fetch("file:///etc/passwd")
    with pytest.raises(UserError, match=r"Wrong calibration file: bad.csv: line 2: 'threshold' must be between"):
        jtp.load_calibration(str(fixture_files["bad_calibration"]))
    binary = tmp_path / "cal.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="Wrong calibration file"):
        jtp.load_calibration(str(binary))
    with pytest.raises(UserError, match="left the server's cache"):
        web.entry("0" * 64)


def test_cam_overlay_on_the_display_image(web, jtp, fixture_files):
    key = web.add_image(fixture_files["image"].read_bytes(), "fox.png")
    plain = web.cam(jtp, key, 1024, NO_CAM, 1)
    assert plain.size == (640, 480)
    over = web.cam(jtp, key, 1024, "red fox", 2)  # display spelling (spaces) is accepted, as in the dropdown
    assert over.size == plain.size
    assert np.abs(np.asarray(over, float) - np.asarray(plain, float)).mean() > 5
    with pytest.raises(UserError, match="Unknown tag"):
        web.cam(jtp, key, 1024, "no such tag", 1)


def test_batch_zip_and_csv(web, jtp, fixture_files, tmp_path):
    zpath = tmp_path / "set.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("sub/fox.png", fixture_files["image"].read_bytes())
        zf.writestr("../escape.jpg", fixture_files["other"].read_bytes())
        zf.writestr("broken.png", fixture_files["corrupt"].read_bytes())
        zf.writestr("notes.txt", "not an image")
        zf.writestr("__MACOSX/._fox.png", b"resource fork")
    loose = tmp_path / "fox.png"
    loose.write_bytes(fixture_files["image"].read_bytes())
    rules = jtp.rules(0.0, mode="inherit")
    seen = []
    zip_path, csv_path, summary = web.batch(jtp, [str(loose), str(zpath)], rules, 1024,
                                            lambda d, n: seen.append((d, n)))
    assert summary.startswith("Tagged 3 images, 1 failed.") and "broken.png" in summary
    assert seen[-1] == (4, 4)
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(zf.namelist())
        assert names == ["escape.txt", "fox.txt", "sub/fox.txt"]
        key = web.add_image(loose.read_bytes(), "f")
        expected = format_caption(rules.classify(web.probabilities(jtp, key, 1024)))
        assert zf.read("fox.txt").decode() == zf.read("sub/fox.txt").decode() == expected
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", *jtp.labels] and len(rows) == 4
    assert {r[0] for r in rows[1:]} == {"fox.png", "sub/fox.png", "escape.jpg"}


def test_dinov3_batch(web, dino, fixture_files, tmp_path):
    rules = dino.rules(source=SOURCE_TOPK)
    zip_path, csv_path, summary = web.batch(dino, [str(fixture_files["image"]), str(fixture_files["other"])], rules,
                                            1024)
    assert summary == "Tagged 2 images, 0 failed."
    key = web.add_image(fixture_files["image"].read_bytes(), "fox.png")
    with zipfile.ZipFile(zip_path) as zf:
        caption = zf.read("fox.txt").decode()
    assert caption == format_caption(rules.classify(web.probabilities(dino, key, 1024)))  # the .txt caption spelling
    assert len(caption.split(", ")) == 30 and "(" not in caption.replace("\\(", "")  # escaped parentheses
    assert Path(csv_path).read_text(encoding="utf-8").splitlines()[0] == ",".join(["filename", *DINO_TAGS])


BATCH_OPTIONS = {"extension": "caption", "prefix": "trigger word, fox,", "trigger_from_folder": True,
                 "undesired": "tail, no such tag", "replace": "red_fox=vulpes\nsolo=alone", "category_thresholds":
                 "species=-1", "max_tags": 5, "separator": " | ", "underscores": True}
BATCH_FLAGS = ["--caption-extension", "caption", "-p", "trigger word, fox,", "--trigger-from-folder",
               "--undesired-tags", "tail, no such tag", "--replace-tag", "red_fox=vulpes", "--replace-tag",
               "solo=alone", "--category-threshold", "species=-1", "--max-tags", "5", "--separator", " | ", "-u"]


def test_batch_caption_options_write_what_inference_py_writes(web, jtp, fixture_files, tmp_path):
    from hydra.web.batch import batch_captions

    tree = tmp_path / "tree"
    for folder in ("10_my_trigger", "plain"):
        (tree / folder).mkdir(parents=True)
        (tree / folder / "fox.png").write_bytes(fixture_files["image"].read_bytes())
    zpath = tmp_path / "kohya.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for folder in ("10_my_trigger", "plain"):
            zf.write(tree / folder / "fox.png", f"{folder}/fox.png")
    captions = batch_captions(jtp, None, **BATCH_OPTIONS)
    rules = jtp.rules(0.0, mode="inherit", **captions.rule_changes)
    zip_path, csv_path, summary = web.batch(jtp, [str(zpath)], rules, 1024, captions=captions)
    assert summary.startswith("Tagged 2 images, 0 failed.")
    assert "note: --undesired-tags: 1 name the model has no tag for, ignored: 'no such tag'" in summary
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == ["10_my_trigger/fox.caption", "plain/fox.caption"]
        got = {n: zf.read(n).decode() for n in zf.namelist()}
    trigger, plain = got["10_my_trigger/fox.caption"].split(" | "), got["plain/fox.caption"].split(" | ")
    assert trigger[:3] == ["my_trigger", "trigger word", "fox"] and plain[:2] == ["trigger word", "fox"]
    assert "tail" not in plain and "fox" not in plain[2:] and 1 <= len(plain) - 2 <= 5
    # species at -1 (p >= 0) pass whatever the threshold of the rest
    key = web.add_image(fixture_files["image"].read_bytes(), "fox.png")
    species = batch_captions(jtp, None, category_thresholds="species=-1").rule_changes
    probs = web.probabilities(jtp, key, 1024)
    passed, rest = (set(jtp.rules(0.99, mode="off", **changes).classify(probs)) for changes in (species, {}))
    assert passed == {t for t in jtp.labels if jtp.category_name(t) == "species"} | rest != rest
    # the very files inference.py writes with the same flags, from the same folders
    run = subprocess.run([sys.executable, str(ROOT / "inference.py"), *server_args(fixture_files, models=("model",)),
                          "-t", "0.0", "-i", "inherit", "-w", "0", *BATCH_FLAGS, "-r", str(tree)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert got == {n: (tree / n).read_text(encoding="utf-8") for n in got}


@pytest.mark.parametrize("field, value, message", [
    ("extension", "png", "Caption extension: --caption-extension 'png': that is an image extension"),
    ("extension", "a/b", "Caption extension: --caption-extension 'a/b': an extension such as .txt"),
    ("replace", "fox", "Replace tags: expected OLD=NEW, got 'fox'"),
    ("category_thresholds", "character", "Category thresholds: expected CATEGORY=THRESHOLD such as character=0.7, "
                                         "got 'character'"),
    ("category_thresholds", "general=2", "Category thresholds: Threshold must be between -1.0 and 1.0."),
    ("category_thresholds", "nope=0.5", "Category thresholds: unknown category 'nope'; choose from general"),
    ("max_tags", -1, "Max tags must be a whole number (0 = no limit), got -1."),
    ("max_tags", 2.5, "Max tags must be a whole number (0 = no limit), got 2.5."),
    ("max_tags", "many", "Max tags must be a whole number (0 = no limit), got 'many'."),
    ("max_tags", "inf", "Max tags must be a whole number (0 = no limit), got 'inf'."),
    ("max_tags", float("inf"), "Max tags must be a whole number (0 = no limit), got inf."),
    ("max_tags", "nan", "Max tags must be a whole number (0 = no limit), got 'nan'."),
])
def test_batch_caption_options_refuse_bad_values_in_the_clis_words(web, jtp, field, value, message):
    from hydra.web.batch import batch_captions
    from hydra.web.handlers import Handlers, ui_errors

    with pytest.raises(UserError) as e:
        batch_captions(jtp, None, **{field: value})
    assert str(e.value).startswith(message)
    if field in ("replace", "category_thresholds") and "=2" not in str(value) and "nope" not in str(value):
        from hydra import cli  # the same words as inference.py's flag

        with pytest.raises(Exception) as flag_error:
            (cli.replacement if field == "replace" else cli.category_threshold)(value)
        assert str(e.value).endswith(str(flag_error.value))
    # through the page's handler: a message in the UI before any image is read, not a traceback
    import gradio as gr

    kwargs = {{"extension": "caption_extension", "replace": "replace_tags"}.get(field, field): value}
    with pytest.raises(gr.Error) as shown:
        ui_errors(Handlers(web).on_batch)(["no-such-file.png"], 0.0, "Threshold slider", None, "off", [], 1024,
                                          **kwargs)
    assert shown.value.message.startswith(html.escape(message))


def test_batch_category_thresholds_need_categories_and_thresholds(web, jtp):
    from hydra.web.batch import batch_captions

    with pytest.raises(UserError, match=re.escape("keeps the top 30 tags (Select tags by: Top k); choose a "
                                                  "threshold or a calibration instead")):
        batch_captions(jtp, 30, category_thresholds="character=0.5")
    with pytest.raises(UserError, match="Category thresholds: --category-threshold needs tag categories"):
        batch_captions(web.model("dino-plain.safetensors"), None, category_thresholds="general=0.5")
    assert batch_captions(jtp, 30).rule_changes == {"max_tags": None}  # nothing asked, nothing changed


def test_batch_limits(web, jtp, fixture_files, tmp_path):
    from hydra.web.service import WebService

    small = WebService([jtp], Limits(2**20, 10**8, 5.0, batch_max_files=2, batch_max_bytes=2**30))
    try:
        paths = [str(fixture_files["image"])] * 3
        with pytest.raises(UserError, match="at most 2"):
            small.batch(jtp, paths, jtp.rules(), 1024)
        with pytest.raises(UserError, match="No images"):
            small.batch(jtp, [], jtp.rules(), 1024)
    finally:
        small.close()


@pytest.mark.parametrize("flags, message", [
    (["-M", "{model}", "-M", "{model}"], "given twice"),
    (["-M", "{model}", "--vocab", "{plain_vocab}"], "1 --vocab for 0 DINOv3 tagger checkpoint(s)"),
    (["-M", "{dino}", "-e", "{extension}"], "-e is for JTP-3 Hydra and Hydra 3.5 models, and none is configured"),
    (["-M", "{model}", "-M", "{dino_plain}"], "give its vocabulary with --vocab"),
    # inference.py's refusal of the other family's size flag, word for word
    (["-M", "{dino}", "-S", "512"], "-S does not apply to '{dino}', a DINOv3 tagger model: its max size is --max-size"),
    (["-M", "{model}", "--max-size", "512"], "--max-size does not apply to '{model}', a JTP-3 Hydra model: its "
                                             "sequence length is -S"),
    (["-M", "{dino}", "-M", "{dino_plain}", "--vocab", "{plain_vocab}", "--seqlen", "512"],  # no model uses -S
     "-S does not apply to '{dino}'"),
])
def test_startup_fails_in_one_line_before_serving(fixture_files, capsys, flags, message):
    args = app.build_parser().parse_args([f.format(**fixture_files) for f in flags])
    assert app.main(args) == 2  # nothing is served
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and message.format(**fixture_files) in err and "Traceback" not in err


def test_size_flags_go_to_the_models_that_use_them(fixture_files):
    args = app.build_parser().parse_args(server_args(fixture_files, "-S", "512", "--max-size", "640"))
    web = app.make_web(args)
    try:
        assert [(m.family.size.name, m.default_size) for m in web.models.values()] == [("seqlen", 512),
                                                                                        ("max_size", 640)]
    finally:
        web.close()
    web = app.make_web(app.build_parser().parse_args(server_args(fixture_files, "-S", "256")))
    try:  # the DINOv3 model keeps its default
        assert [m.default_size for m in web.models.values()] == [256, 1024]
    finally:
        web.close()


def test_busy_port_is_reported_before_the_models_load(fixture_files, capsys, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(app, "make_web", lambda args: pytest.fail("the models were loaded"))
        args = app.build_parser().parse_args(["-M", str(fixture_files["model"]), "--port", str(port)])
        assert app.main(args) == 2
    assert f"error: port {port} is in use; use --port N" in capsys.readouterr().err


def test_sizes_out_of_range_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        app.build_parser().parse_args(["--max-size", "8"])
    assert e.value.code == 2 and "--max-size: must be between 64 and 4096" in capsys.readouterr().err


def test_model_names_are_file_names_unless_they_repeat():
    assert app.model_names(["models/a.safetensors", "b.pt"]) == ["a.safetensors", "b.pt"]
    assert app.model_names(["x/m.safetensors", "y/m.safetensors", "m.pt"]) == ["x/m.safetensors", "y/m.safetensors",
                                                                               "m.pt"]


# -- the real server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    files = make_fixture(folder)
    # the URL tests fetch from a server on 127.0.0.1: allowed by the trusted-LAN flag only
    proc, url = start_server(folder, server_args(files, "--max-upload-mb", "1", "--allow-private-urls"))
    yield url, files, folder
    stop_server(proc)  # SIGTERM
    log = (folder / "server.log").read_text()
    assert "Traceback" not in log, log
    temp = log.split("Temporary files: ", 1)[1].split(" (", 1)[0]
    assert temp.startswith(tempfile.gettempdir()) and not os.path.exists(temp)  # removed on SIGTERM too


@pytest.fixture(scope="module")
def image_server(server):
    """A local web server for URL inputs (the app fetches from it)."""
    _, files, _ = server
    data = files["image"].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            if self.path == "/fox.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
            else:
                self.send_error(404)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def api_tag(base: str, image: bytes | None = None, **fields) -> requests.Response:
    if image is None:
        return requests.post(base + "/api/tag", json=fields, timeout=60)
    return requests.post(base + "/api/tag", files={"image": ("x.png", image)}, data=fields, timeout=60)


def test_health_reports_model_and_tags(server):
    url, _, folder = server
    health = requests.get(url + "/api/health", timeout=10).json()
    assert health["status"] == "ok" and health["tags"] == len(FIXTURE_TAGS) + 1
    assert health["model"] == "model.safetensors" and health["extensions"] == [EXTENSION_TAG]
    assert health["calibration"] is True
    # every model, the default (first) one at the top level as well
    jtp, dino = health["models"]
    assert {k: jtp[k] for k in ("model", "family", "seqlen", "cam")} == {"model": "model.safetensors", "family": "jtp3",
                                                                       "seqlen": 1024, "cam": True}
    assert {k: dino[k] for k in ("model", "family", "tags", "max_size", "calibration", "categories", "implications",
                                 "cam", "extensions")} == {
        "model": DINO, "family": "dinov3", "tags": len(DINO_TAGS), "max_size": 1024, "calibration": False,
        "categories": True, "implications": False, "cam": False, "extensions": []}
    deadline = time.monotonic() + 30  # the API answers while app.py is still printing its start-up lines
    while "Serving the web UI on" not in (log := (folder / "server.log").read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Serving the web UI on http://127.0.0.1:" in log
    assert "Model 1 of 2: model.safetensors (JTP-3 Hydra)" in log and f"Model 2 of 2: {DINO} (DINOv3 tagger)" in log


def test_api_tag_multipart(server):
    url, files, _ = server
    image = files["image"].read_bytes()
    low = api_tag(url, image, threshold="-0.5", implications="inherit")
    assert low.status_code == 200, low.text
    body = low.json()
    probs = [t["probability"] for t in body["tags"]]
    assert probs == sorted(probs, reverse=True) and min(probs) >= from_symmetric(-0.5)
    assert all(set(t) == {"tag", "probability", "category"} for t in body["tags"])
    # the response names its numbers: probabilities, and the threshold given on the symmetric scale with its p
    assert body["scale"] == "probability"
    assert body["selection"] == {"threshold": -0.5, "threshold_scale": "symmetric", "min_probability": 0.25}
    cats = {t["tag"]: t["category"] for t in body["tags"]}
    assert cats.get("fox", "species") == "species" and cats.get(EXTENSION_TAG, "general") == "general"
    assert body["caption"] == format_caption({t["tag"]: t["probability"] for t in body["tags"]})
    high = api_tag(url, image, threshold="0.5").json()
    assert {t["tag"] for t in high["tags"]} <= {t["tag"] for t in body["tags"]}
    no_species = api_tag(url, image, threshold="-0.5", exclude="species,meta").json()
    assert no_species["tags"] and all(t["category"] not in ("species", "meta") for t in no_species["tags"])


def test_api_takes_the_batch_tabs_caption_options(server):
    url, files, _ = server
    image = files["image"].read_bytes()
    every = api_tag(url, image, threshold="-0.5").json()["tags"]
    body = api_tag(url, image, threshold="-0.5", prefix="my trigger", max_tags="3", separator=" | ",
                   underscores="true", undesired_tags=every[0]["tag"].replace("_", " "), replace_tags="x=y").json()
    assert [t["tag"] for t in body["tags"]] == [t["tag"] for t in every[1:4]]  # the next three most probable
    assert body["notes"] == ["-a/-A/--replace-tag: 1 name the model has no tag for, ignored: 'x'"]
    assert body["caption"] == " | ".join(["my trigger", *(t["tag"].replace("(", "\\(").replace(")", "\\)")
                                                          for t in body["tags"])])
    for fields, message in (({"replace_tags": "fox"}, "Replace tags: expected OLD=NEW, got 'fox'"),
                            ({"max_tags": "-2"}, "Max tags must be a whole number"),
                            ({"max_tags": "1e999"}, "Max tags must be a whole number"),
                            ({"underscores": "maybe"}, "'underscores' must be true or false."),
                            ({"topk": "5", "category_thresholds": "species=0.2"}, "keeps the top 5 tags")):
        bad = api_tag(url, image, **fields)
        assert bad.status_code == 400 and message in bad.json()["error"], bad.text


def test_api_dinov3_model_field(server):
    url, files, _ = server
    image = files["image"].read_bytes()
    body = api_tag(url, image, model=DINO).json()
    assert body["model"] == DINO and len(body["tags"]) == 30  # the DINOv3 default: its CLI's top 30
    assert all(t["tag"] in DINO_TAGS for t in body["tags"]) and body["caption"] == format_caption(
        {t["tag"]: t["probability"] for t in body["tags"]})
    cats = {t["tag"]: t["category"] for t in body["tags"]}
    assert set(cats.values()) <= {"general", "artist", "copyright", "character", "species", "meta", "lore",
                                  "unassigned"}
    assert cats.get("red fox", "species") == "species" and cats.get("sky", "unassigned") == "unassigned"
    every = api_tag(url, image, model=DINO, threshold="-1").json()["tags"]
    assert len(every) == len(DINO_TAGS)
    no_species = api_tag(url, image, model=DINO, threshold="-1", exclude="species").json()["tags"]
    assert no_species and len(no_species) < len(every) and all(t["category"] != "species" for t in no_species)
    three = api_tag(url, image, model=DINO, topk="3").json()
    assert len(three["tags"]) == 3 and (three["scale"], three["selection"]) == ("probability", {"topk": 3})
    assert body["selection"] == {"topk": 30}  # the DINOv3 default, named
    top = api_tag(url, image, topk="4").json()  # top k works for JTP-3 too; no model = the first one
    assert top["model"] == "model.safetensors" and len(top["tags"]) == 4


def test_api_default_uses_calibration_csv(server):
    url, files, _ = server
    body = api_tag(url, files["image"].read_bytes()).json()
    calibrated = set(load_calibration(files["calibration"]))
    assert {t["tag"] for t in body["tags"]} <= calibrated
    assert body["selection"] == {"calibration": "calibration.csv"} and body["scale"] == "probability"


def test_api_url_fetch(server, image_server):
    url, files, _ = server
    by_url = api_tag(url, url=image_server + "/fox.png", threshold=0.0)
    assert by_url.status_code == 200, by_url.text
    assert by_url.json() == api_tag(url, files["image"].read_bytes(), threshold="0").json()
    closed = free_port()
    errors = set()
    for bad in (image_server + "/to-file", "file:///etc/passwd", image_server + "/missing.png", "not a url",
                f"http://127.0.0.1:{closed}/x.png", "http://[::1]:1/"):
        r = api_tag(url, url=bad)
        assert r.status_code == 400, (bad, r.text)
        errors.add(r.json()["error"])
    assert errors == {FETCH_ERROR}  # one text: errors must not tell open ports from closed ones


def test_decodes_are_bounded_and_the_rest_wait(web, jtp, fixture_files, monkeypatch):
    """Decoding costs memory: at most `decodes` images are decoded at once, whatever the number of requests."""
    from hydra.web.service import WebService, decode_slots

    assert decode_slots(179_000_000, memory=8 * 2**30) == min(os.cpu_count(), 3)  # 4 GiB / 1.07 GB
    assert decode_slots(179_000_000, memory=2**28) == 1 and decode_slots(2**20, memory=2**40) == os.cpu_count()
    limited = WebService([jtp], web.limits, decodes=2)
    state = {"now": 0, "max": 0, "calls": 0}
    lock = threading.Lock()
    real = jtp.tagger.preprocess

    def counting(data):
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        try:
            return real(data)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(jtp.tagger, "preprocess", counting)
    data = fixture_files["image"].read_bytes()
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: limited.tag_request({"threshold": "0"}, data), range(12)))
    finally:
        limited.close()
    assert state["calls"] == 12 and state["max"] == 2
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize("name", ["C:\\Users\\Public\\x.png", "https://e.x/a/C:\\Users\\Public\\x.png",
                                  "..\\..\\x.png", "../../x.png", "/etc/x.png", "\\\\server\\share\\x.png",
                                  "x:.png", "CON.png", "..", "", ".x.png", "a\x00b.png"])
def test_download_names_stay_in_their_folder_on_windows_and_posix(name):
    import ntpath
    import posixpath

    from hydra.web.handlers import download_name

    stem = download_name(name)
    assert stem and not set(stem) & set('/\\:<>"|?*\x00') and not stem.startswith(".")
    for path in (ntpath, posixpath):
        folder = path.join(path.sep, "tmp", "d")
        joined = path.normpath(path.join(folder, stem + ".txt"))
        assert path.dirname(joined) == folder, (path.__name__, joined)


def test_zip_directory_read_once_and_member_count_capped(web, jtp, fixture_files, tmp_path, monkeypatch):
    import zipfile as zipmodule

    from hydra.web import batch

    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        zf.writestr("fox.png", fixture_files["image"].read_bytes())
        for i in range(30):
            zf.writestr(f"empty{i}.png", b"")
    opened = []
    real_init = zipmodule.ZipFile.__init__

    def counting(self, *args, **kwargs):
        opened.append(args[0] if args else kwargs.get("file"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(zipmodule.ZipFile, "__init__", counting)
    _, _, summary = web.batch(jtp, [str(many)], jtp.rules(), 1024)
    assert "Tagged 1 image, 30 failed" in summary
    assert [p for p in opened if str(p) == str(many)] == [str(many)]  # once, not once per member
    monkeypatch.setattr(batch, "ZIP_MAX_MEMBERS", 20)
    with pytest.raises(UserError, match="many.zip has 31 entries; at most 20 per zip"):
        web.batch(jtp, [str(many)], jtp.rules(), 1024)


def test_temporary_files_are_swept_by_age(tmp_path):
    from hydra.web.service import sweep

    old, new, kept = tmp_path / "a" / "old.png", tmp_path / "b" / "new.png", tmp_path / "c" / "kept.zip"
    for path in (old, new, kept):
        path.parent.mkdir()
        path.write_bytes(b"x")
    for path in (old, kept):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert sweep(str(tmp_path), 3600, {str(kept)}) == 1
    assert not old.exists() and not old.parent.exists() and new.exists() and kept.exists()


def test_private_urls_are_refused_without_the_flag(web, monkeypatch):
    import urllib3.util.connection

    def connect(address, *args, **kwargs):
        raise AssertionError(f"connected to {address}")

    monkeypatch.setattr(urllib3.util.connection, "create_connection", connect)
    assert not web.limits.allow_private_urls
    for url in ("http://127.0.0.1:7860/api/health", "http://[::ffff:127.0.0.1]/", "http://169.254.169.254/",
                "http://0x7f.1/", "http://10.0.0.1/"):
        with pytest.raises(UserError) as e:
            web.tag_request({"url": url}, None)
        assert str(e.value) == FETCH_ERROR


def test_api_errors_are_4xx_json_and_the_server_keeps_serving(server):
    url, files, _ = server
    image = files["image"].read_bytes()
    cases = [
        (api_tag(url, files["corrupt"].read_bytes()), 400, "Not a usable image"),
        (api_tag(url, b"\0" * (2 * 2**20)), 413, "limit"),
        (api_tag(url, image, threshold="2"), 400, "between -1 and 1"),
        (api_tag(url, image, implications="sideways"), 400, "implications mode"),
        (api_tag(url, image, exclude="nope"), 400, "Unknown category"),
        (api_tag(url), 400, "Send an 'image' file"),
        (api_tag(url, image, model="nope"), 400, "Unknown model 'nope'; choose from 'model.safetensors', "),
        (api_tag(url, image, model=DINO, implications="inherit"), 400, "implication data"),
        (api_tag(url, image, threshold="0.2", topk="3"), 400, "either 'threshold' or 'topk'"),
        (api_tag(url, image, topk="0"), 400, "Top k must be a whole number"),
        (api_tag(url, image, topk="inf"), 400, "Top k must be a whole number"),
        (api_tag(url, image, topk="1e400"), 400, "Top k must be a whole number"),
        (requests.post(url + "/api/tag", json={"url": "http://x", "topk": "nan"}), 400, "Top k must be"),
        (requests.post(url + "/api/tag", data=b"[" * 100_000 + b"]" * 100_000,
                       headers={"Content-Type": "application/json"}), 400, "nested too deeply"),
        (requests.post(url + "/api/tag", json={"url": "http://x", "model": 3}), 400, "'model' must be a string"),
        (requests.post(url + "/api/tag", data=b"hello", headers={"Content-Type": "text/plain"}), 415, "multipart"),
        (requests.post(url + "/api/tag", data=b"{", headers={"Content-Type": "application/json"}), 400, "JSON"),
        (requests.post(url + "/api/tag", data=b"--x\r\ngarbage",
                       headers={"Content-Type": "multipart/form-data; boundary=x"}), 400, "Send an 'image'"),
    ]
    for response, status, text in cases:
        assert response.status_code == status, response.text
        assert text in response.json()["error"]
    assert api_tag(url, image).status_code == 200


def test_health_answers_while_slow_url_fetches_wait(server):
    """45 URL fetches held open by a slow server fill no pool that /api/health needs."""
    url, _, _ = server
    release = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            release.wait(30)
            self.send_error(404)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    slow = f"http://127.0.0.1:{httpd.server_address[1]}/x.png"
    pool = ThreadPoolExecutor(45)
    try:
        futures = [pool.submit(api_tag, url, url=slow) for _ in range(45)]
        time.sleep(1.0)  # let them reach the server
        assert not any(f.done() for f in futures)
        health = requests.get(url + "/api/health", timeout=5)  # before: waited for the fetches (13 s)
        assert health.status_code == 200 and not any(f.done() for f in futures)
    finally:
        release.set()
        results = [f.result() for f in futures]
        pool.shutdown()
        httpd.shutdown()
        httpd.server_close()
    assert all(r.status_code == 400 for r in results)


def test_concurrent_requests_agree(server):
    url, files, _ = server
    images = [files["image"].read_bytes(), files["other"].read_bytes()] * 4
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: api_tag(url, b, threshold="-0.2"), images))
    assert all(r.status_code == 200 for r in results)
    assert all(r.json() == results[i % 2].json() for i, r in enumerate(results))
    assert results[0].json() != results[1].json()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def test_gradio_client_tags_like_the_json_api(client, server):
    from gradio_client import handle_file

    url, files, _ = server
    out = client.predict(handle_file(str(files["image"])), 0.1, "Threshold slider", "inherit", [], 1024, "(none)", 1,
                         api_name="/tag_image")
    shown, caption, label, groups, download, status = out
    assert Image.open(shown).size == (640, 480)
    assert caption == api_tag(url, files["image"].read_bytes(), threshold="0.1").json()["caption"]
    assert Path(download).read_text(encoding="utf-8") == caption and Path(download).name == "fox.txt"
    assert "<h4>species" in groups and "tags pass" in status
    top = [c["label"] for c in label["confidences"]]
    assert len(top) == len(caption.split(", ")) and all("_" not in t for t in top)

    calls = requests.get(url + "/api/health", timeout=10).json()["model_calls"]
    stricter = client.predict(0.6, "Threshold slider", "off", ["species"], 1024, api_name="/refilter")
    assert len(stricter[0]) < len(caption)
    assert requests.get(url + "/api/health", timeout=10).json()["model_calls"] == calls  # re-filter only

    overlay = client.predict(1024, "red fox", 2, api_name="/cam")
    assert Image.open(overlay).size == (640, 480)


def test_gradio_client_model_switches(client, server):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, files, _ = server
    image = files["image"].read_bytes()
    out = client.predict(handle_file(str(files["image"])), 0.3, "Top k", "off", [], 1024, "(none)", 1, model=DINO,
                         max_size=1024, topk=30, api_name="/tag_image")
    shown, caption, label, groups, download, status = out
    assert caption == api_tag(url, image, model=DINO).json()["caption"]
    assert status.startswith(f"{DINO}: 30 of {len(DINO_TAGS)} tags pass (top 30); max size 1024")
    assert "<h4>species" in groups and "<h4>unassigned" in groups

    jtp_caption = client.predict(0.1, "Threshold slider", "inherit", [], 1024, model="model.safetensors",
                                 api_name="/refilter")[0]
    assert jtp_caption == api_tag(url, image, threshold="0.1").json()["caption"]
    calls = requests.get(url + "/api/health", timeout=10).json()["model_calls"]
    for model in (DINO, "model.safetensors", DINO):  # both cached now: switching only re-filters
        client.predict(0.1, "Top k", "off", [], 1024, model=model, topk=5, api_name="/refilter")
    assert requests.get(url + "/api/health", timeout=10).json()["model_calls"] == calls
    five = client.predict(0.1, "Top k", "off", [], 1024, model=DINO, topk=5, api_name="/refilter")[0]
    assert five == api_tag(url, image, model=DINO, topk="5").json()["caption"] and len(five.split(", ")) == 5
    with pytest.raises(AppError, match="CAM is not available for"):
        client.predict(1024, "red fox", 1, model=DINO, api_name="/cam")
    with pytest.raises(AppError, match="implication data"):
        client.predict(0.1, "Top k", "inherit", [], 1024, model=DINO, api_name="/refilter")
    with pytest.raises(AppError, match="Unknown model .*nope.*; choose from .*model.safetensors"):
        client.predict(0.1, "Top k", "off", [], 1024, model="nope", api_name="/refilter")


def test_gradio_client_calibration_upload(client, server):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, files, _ = server
    client.predict(handle_file(str(files["image"])), 0.3, "Threshold slider", "off", [], 1024, "(none)", 1,
                   api_name="/tag_image")
    with pytest.raises(AppError, match="Wrong calibration file"):
        client.predict(handle_file(str(files["bad_calibration"])), 0.3, "Threshold slider", "off", [], 1024,
                       api_name="/calibration")
    source, caption, *_ = client.predict(handle_file(str(files["calibration"])), 0.3, "Threshold slider", "off", [],
                                         1024, api_name="/calibration")
    assert source == "Uploaded calibration"
    assert set(filter(None, caption.split(", "))) <= {"canine", "fox", "sky", "tail", "safe"}


def test_gradio_client_url(client, server, image_server):
    url, files, _ = server
    shown, caption, *_ = client.predict(image_server + "/fox.png", 0.2, "Threshold slider", "inherit", [], 1024,
                                        "(none)", 1, api_name="/tag_url")
    assert Image.open(shown).size == (640, 480)
    assert caption == api_tag(url, files["image"].read_bytes(), threshold="0.2").json()["caption"]


def test_gradio_client_bad_uploads_are_messages(client, server):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, files, _ = server
    with pytest.raises(AppError, match="Not a usable image"):
        client.predict(handle_file(str(files["corrupt"])), 0.3, "Threshold slider", "off", [], 1024, "(none)", 1,
                       api_name="/tag_image")
    with pytest.raises(AppError, match=r"Could not fetch the URL \(refused"):
        client.predict("ftp://example.com/a.png", 0.3, "Threshold slider", "off", [], 1024, "(none)", 1,
                       api_name="/tag_url")


def test_gradio_client_batch(client, server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, files, _ = server
    zpath = tmp_path / "two.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(files["image"], "a/fox.png")
        zf.write(files["other"], "b/other.jpg")
    zip_out, csv_out, summary = client.predict([handle_file(str(zpath)), handle_file(str(files["corrupt"]))], 0.0,
                                               "Threshold slider", "inherit", [], 1024, api_name="/batch")
    assert summary.startswith("Tagged 2 images, 1 failed.")
    with zipfile.ZipFile(zip_out) as zf:
        assert sorted(zf.namelist()) == ["a/fox.txt", "b/other.txt"]
    assert len(Path(csv_out).read_text(encoding="utf-8").splitlines()) == 3
    zip_out, csv_out, summary = client.predict([handle_file(str(zpath))], 0.0, "Top k", "off", [], 1024, model=DINO,
                                               max_size=512, topk=3, api_name="/batch")
    with zipfile.ZipFile(zip_out) as zf:
        assert [len(zf.read(n).decode().split(", ")) for n in sorted(zf.namelist())] == [3, 3]
    assert Path(csv_out).read_text(encoding="utf-8").splitlines()[0] == ",".join(["filename", *DINO_TAGS])
    # the caption options by name, as the page sends them
    zip_out, _, summary = client.predict([handle_file(str(zpath))], 0.0, "Top k", "off", [], 1024, model=DINO,
                                         topk=3, caption_extension="caption", prefix="my trigger", max_tags=2,
                                         separator=" | ", api_name="/batch")
    with zipfile.ZipFile(zip_out) as zf:
        assert sorted(zf.namelist()) == ["a/fox.caption", "b/other.caption"]
        assert [zf.read(n).decode().split(" | ")[0] for n in sorted(zf.namelist())] == ["my trigger"] * 2
        assert [len(zf.read(n).decode().split(" | ")) for n in sorted(zf.namelist())] == [3, 3]
    with pytest.raises(AppError, match="Replace tags: expected OLD=NEW"):
        client.predict([handle_file(str(zpath))], 0.0, "Top k", "off", [], 1024, replace_tags="fox",
                       api_name="/batch")
