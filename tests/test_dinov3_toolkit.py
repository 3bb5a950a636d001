"""The DINOv3 tagger inside the toolkit: the card's Python API (`from hydra import Tagger`), family
detection, batching by size, URLs, and inference.py's bulk paths with both model families (captions,
CSV, --format pretty/tags/json/jsonl, --topk, categories, workers, bad files).

    venv/bin/python -m pytest tests/test_dinov3_toolkit.py -q
"""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import ROOT, noise_image

from hydra import Tagger
from hydra.models import detect
from hydra.models.dinov3 import DINOV3
from hydra.models.jtp3 import JTP3
from hydra.testing.dinov3 import write_dinov3_checkpoint, write_vocab

TAGS = [f"tag {i}" for i in range(40)] + ["fate (series)", "\\m/", "hi res"]
CATS = {t: [0, 1, 3, 4, 5, 7, 8, -1][i % 8] for i, t in enumerate(TAGS)}


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dino")
    write_dinov3_checkpoint(folder / "tagger_proto.safetensors", TAGS, head="lowrank", head_bias=True, seed=4)
    write_vocab(folder / "tagger_vocab_with_categories.json", TAGS, CATS)
    return folder


def _close(a, b):
    return [t for t, _ in a] == [t for t, _ in b] and np.allclose([p for _, p in a], [p for _, p in b])


def cli(*args, check_rc=None, cwd=None):
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def test_card_api_topk_and_threshold(dino, tmp_path):
    tagger = Tagger(checkpoint_path=dino / "tagger_proto.safetensors",
                    vocab_path=dino / "tagger_vocab_with_categories.json", device="cpu", max_size=1024)
    assert tagger.family is DINOV3 and tagger.labels == TAGS and tagger.model.tag_metadata.category == CATS
    img = noise_image(300, 200)
    top = tagger.predict(img, topk=5)
    assert len(top) == 5 and [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    probs = tagger.probabilities(img)
    above = tagger.predict(img, threshold=0.5)
    assert [t for t, _ in above] == [t for t, _ in sorted(probs.items(), key=lambda kv: -kv[1]) if probs[t] >= 0.5]
    path = tmp_path / "x.png"
    img.save(path)
    assert _close(tagger.predict(str(path), topk=3), top[:3])  # a path gives the same as the image
    assert len(tagger.predict(img)) == 30  # the card's default top-k


def test_batches_mix_sizes_and_subsets_agree(dino):
    tagger = Tagger(dino / "tagger_proto.safetensors", dtype="fp32")
    samples = [tagger.preprocess(noise_image(w, h, seed=i)) for i, (w, h) in enumerate([(300, 200), (64, 64),
                                                                                         (300, 200)])]
    assert samples[0]["pixels"].shape == (3, 192, 288)
    together = tagger.predict_samples(samples)
    alone = np.stack([tagger.predict_samples([s])[0] for s in samples])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    mask = np.zeros(len(TAGS), bool)
    mask[[1, 5, 42]] = True
    part = tagger.predict_samples(samples, mask)
    np.testing.assert_allclose(part[:, mask], together[:, mask], atol=1e-5)
    assert np.isnan(part[:, ~mask]).all()


def test_family_detection_and_vocab_errors(dino, tmp_path, tiny_model):
    assert detect(dino / "tagger_proto.safetensors") is DINOV3
    assert detect(tiny_model) is JTP3
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((dino / "tagger_proto.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="give its vocabulary with --vocab"):
        Tagger(lone)
    write_vocab(tmp_path / "short.json", TAGS[:10])
    with pytest.raises(ValueError, match="10") as e:
        Tagger(lone, tmp_path / "short.json")
    assert "43" in str(e.value)


def test_url_input(dino, tmp_path):
    noise_image(120, 80).save(tmp_path / "web.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/web.png"
        tagger = Tagger(dino / "tagger_proto.safetensors")
        assert _close(tagger.predict(url, topk=4), tagger.predict(str(tmp_path / "web.png"), topk=4))
        run = cli("-M", dino / "tagger_proto.safetensors", "-w", "0", "--format", "jsonl", url,
                  f"http://127.0.0.1:{server.server_port}/missing.png", check_rc=1)
        assert json.loads(run.stdout.splitlines()[0])["file"] == url
        assert "missing.png': HTTP 404" in run.stderr or "missing.png': " in run.stderr
        # captions cannot be written beside a URL
        assert "use --format or -o" in cli("-M", dino / "tagger_proto.safetensors", url, check_rc=2).stderr
    finally:
        server.shutdown()


@pytest.fixture
def folder(tmp_path):
    f = tmp_path / "imgs"
    (f / "sub").mkdir(parents=True)
    noise_image(300, 200, 1).save(f / "a.png")
    noise_image(90, 160, 2).save(f / "sub" / "b.jpg")
    (f / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return f


def test_cli_captions_csv_and_formats(dino, folder, tmp_path):
    model = dino / "tagger_proto.safetensors"
    run = cli("-M", model, "-w", "2", "-r", folder, check_rc=1)  # the broken file fails, the rest is tagged
    assert f"'{folder / 'broken.png'}': " in run.stderr and "Tagged 2 images, 1 failed." in run.stderr
    caption = (folder / "a.txt").read_text(encoding="utf-8").split(", ")
    assert len(caption) == 30  # top 30 by default, vocabulary spelling, parentheses escaped
    assert all("_" not in t for t in caption)

    table = tmp_path / "p.csv"
    cli("-M", model, "-w", "0", "-o", table, folder / "a.png", check_rc=0)
    rows = list(csv.reader(io.StringIO(table.read_text(encoding="utf-8"))))
    assert rows[0] == ["filename", *TAGS] and len(rows) == 2
    probs = dict(zip(TAGS, map(float, rows[1][1:])))
    best = sorted(TAGS, key=lambda t: -probs[t])[:30]
    from hydra.tags.rules import caption_tag

    assert set(caption) == {caption_tag(t) for t in best}

    tags_line = cli("-M", model, "-w", "0", "--format", "tags", "--topk", "3", folder / "a.png", check_rc=0).stdout
    assert tags_line.strip().split(", ") == [caption_tag(t) for t in best[:3]]  # spelled like the captions
    out = cli("-M", model, "-w", "0", "--format", "json", "--topk", "4", folder / "a.png", folder / "sub",
              check_rc=0).stdout
    items = json.loads(out)  # logs are on stderr, so stdout is valid JSON
    assert [i["file"] for i in items] == [str(folder / "a.png"), str(folder / "sub" / "b.jpg")]
    assert [t["tag"] for t in items[0]["tags"]] == best[:4]
    assert items[0]["tags"][0]["score"] == pytest.approx(probs[best[0]], abs=1e-4)
    pretty = cli("-M", model, "-w", "0", "--format", "pretty", "--topk", "2", folder / "a.png", check_rc=0).stdout
    lines = pretty.splitlines()
    assert lines[0] == "-" * 60 and lines[1] == str(folder / "a.png") and lines[3].startswith("  1. ")
    assert lines[3].endswith(best[0]) and len(lines) == 5


def test_cli_thresholds_categories_and_implication_message(dino, folder):
    model = dino / "tagger_proto.safetensors"
    out = cli("-M", model, "-w", "0", "--format", "jsonl", "-t", "-1", "-x", "general", "-x", "meta",
              folder / "a.png", check_rc=0).stdout
    tags = [t["tag"] for t in json.loads(out)["tags"]]
    assert len(tags) == len(TAGS) - sum(CATS[t] in (0, 7) for t in TAGS)  # -t -1 passes all, minus excluded
    run = cli("-M", model, "-i", "inherit", folder, check_rc=2)
    assert "needs tag metadata with implications" in run.stderr


def test_cli_pt_checkpoint_and_explicit_vocab(dino, tmp_path, folder):
    write_dinov3_checkpoint(tmp_path / "m.pt", TAGS, fmt="pt", seed=4)
    write_vocab(tmp_path / "v.json", TAGS)
    run = cli("-M", tmp_path / "m.pt", "--vocab", tmp_path / "v.json", "-w", "0", "--format", "tags", "--topk", "1",
              "--max-size", "64", folder / "a.png", check_rc=0)
    from hydra.tags.rules import caption_tag

    assert run.stdout.strip() in {caption_tag(t) for t in TAGS}
