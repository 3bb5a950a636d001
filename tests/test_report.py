"""The dataset report (hydra/bulk/report.py, `inference.py --report`): per-tag counts and mean probabilities,
the review lists (fewest tags, most borderline tags) kept in bounded heaps, the three files and the HTML page's
chart and thumbnails; then inference.py end to end on a tiny model, checked against its captions and CSV.

    venv/bin/python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import base64
import csv
import io
import re

import numpy as np
import pytest
from conftest import TAGS_CSV, noise_image
from PIL import Image
from test_inference import cli, read_csv

from hydra.bulk.report import BORDERLINE_MARGIN, THUMB_SIDE, DatasetReport, report_paths, thumbnail_uri
from hydra.tags.rules import TagSettings, caption_tag, category_names, load_metadata
from hydra.tags.rules import rewrite_tag as rewrite


def read(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_counts_means_and_review_lists():
    labels = ["cat", "dog", "fox", "sky"]
    # sky can never pass (+inf), dog is excluded: neither is ever borderline
    r = DatasetReport(labels, ["species", "species", "species", "general"], np.array([0.5, 0.5, 0.4, np.inf]),
                      np.array([False, True, False, False]), keep=2)
    r.add("one.png", np.array([0.9, 0.52, 0.42, 0.5]), {"cat": 0.9, "fox": 0.42})   # fox borderline (0.02)
    r.add("two.png", np.array([0.47, 0.5, 0.1, 0.99]), {})                          # cat borderline (0.03)
    r.add("three.png", np.array([0.56, np.nan, 0.36, 0.1]), {"cat": 0.56})           # cat 0.06 out, fox 0.04
    r.add("four.png", np.array([0.7, 0.1, 0.9, 0.1]), {"cat": 0.7, "fox": 0.9})      # none
    assert r.table() == [("cat", "species", 3, pytest.approx((0.9 + 0.56 + 0.7) / 3)),
                         ("fox", "species", 2, pytest.approx((0.42 + 0.9) / 2))]
    # fewest tags: two (0), then one/three/four tie at... three has 1, then one (2) beats four (2) by run order
    assert [(i.path, i.tags) for i in r.fewest_tags()] == [("two.png", 0), ("three.png", 1)]
    most = r.most_borderline()
    assert [(i.path, i.borderline) for i in most] == [("one.png", 1), ("two.png", 1)]  # ties: run order
    assert most[0].nearest == (("fox", 0.42, 0.4),)
    assert r.images == 4


def test_heaps_stay_bounded_and_match_a_full_sort():
    rng = np.random.default_rng(0)
    labels = [f"t{i}" for i in range(40)]
    thresholds = rng.uniform(0.2, 0.8, 40)
    r = DatasetReport(labels, None, thresholds, keep=5)
    seen = []
    for n in range(2000):
        p = rng.uniform(0, 1, 40)
        passing = {labels[i]: float(p[i]) for i in np.flatnonzero(p >= thresholds)}
        r.add(f"{n}.png", p, passing)
        seen.append((f"{n}.png", len(passing), int(np.sum(np.abs(p - thresholds) <= BORDERLINE_MARGIN))))
        assert len(r._fewest) <= 5 and len(r._borderline) <= 5
    fewest = sorted(seen, key=lambda s: s[1])[:5]  # sorted() is stable: ties in run order
    border = sorted((s for s in seen if s[2]), key=lambda s: -s[2])[:5]
    assert [(i.path, i.tags) for i in r.fewest_tags()] == [(p, t) for p, t, _ in fewest]
    assert [(i.path, i.borderline) for i in r.most_borderline()] == [(p, b) for p, _, b in border]


def test_top_k_runs_have_no_borderline_tags():
    labels = ["a", "b", "c"]
    settings = TagSettings(labels, None, rewrite, 0.5, "off", topk=1)
    r = DatasetReport.for_settings(settings)
    r.add("x.png", np.array([0.5, 0.49, 0.2]))  # classified by the run's rules: the top 1
    assert r.table() == [("a", "", 1, 0.5)] and r.most_borderline() == []
    assert [i.tags for i in r.fewest_tags()] == [1]


@pytest.mark.parametrize("name, base", [("out/rep", "out/rep"), ("out/rep.html", "out/rep"),
                                        ("out/rep.CSV", "out/rep"), ("out/rep.v2", "out/rep.v2")])
def test_report_paths(name, base):
    assert report_paths(name) == (f"{base}.csv", f"{base}-review.csv", f"{base}.html")


def test_written_files_chart_thumbnails_and_escaping(tmp_path):
    big = tmp_path / "big.jpg"
    noise_image(1200, 800, 1).save(big, quality=95)
    alpha = tmp_path / "<b>alpha&'.png"  # a name that must be escaped in the page
    noise_image(100, 300, 2, mode="RGBA").save(alpha)
    missing = tmp_path / "gone.png"
    labels = ["cat", "dog"]
    r = DatasetReport(labels, ["species", "general"], np.array([0.5, 0.5]))
    r.add(str(big), np.array([0.9, 0.51]), {"cat": 0.9, "dog": 0.51})
    r.add(str(alpha), np.array([0.48, 0.1]), {})
    r.add(str(missing), np.array([0.7, 0.2]), {"cat": 0.7})
    written = r.write(str(tmp_path / "report.html"))
    assert written == [str(tmp_path / n) for n in ("report.csv", "report-review.csv", "report.html")]
    assert read(written[0]) == [
        {"tag": "cat", "category": "species", "count": "2", "percent": "66.67", "mean_probability": "0.8000"},
        {"tag": "dog", "category": "general", "count": "1", "percent": "33.33", "mean_probability": "0.5100"}]
    review = read(written[1])
    assert [(row["list"], row["file"], row["tags"]) for row in review] == [
        ("fewest tags", str(alpha), "0"), ("fewest tags", str(missing), "1"), ("fewest tags", str(big), "2"),
        ("borderline", str(big), "2"), ("borderline", str(alpha), "0")]
    assert review[3]["borderline_tags"] == "dog (p 0.510, threshold 0.500)"
    page = open(written[2], encoding="utf-8").read()
    assert "<b>alpha" not in page and "&lt;b&gt;alpha&amp;&#x27;.png" in page
    assert re.search(r"src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'", page)  # the chart
    thumbs = re.findall(r"src='data:image/jpeg;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(thumbs) == 4 and page.count("no preview") == 1  # big and alpha in both lists; gone has none
    for t in thumbs:
        img = Image.open(io.BytesIO(base64.b64decode(t)))
        assert img.format == "JPEG" and max(img.size) == THUMB_SIDE
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_thumbnail_of_unreadable_inputs_is_none(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert thumbnail_uri(str(tmp_path / "bad.png")) is None
    assert thumbnail_uri("https://example.com/x.png") is None
    assert thumbnail_uri(str(tmp_path)) is None


def test_empty_report_is_written(tmp_path):
    r = DatasetReport(["a"], None, None)
    table, review, page = r.write(str(tmp_path / "r"))
    assert read(table) == [] and read(review) == []
    assert "0 images tagged" in open(page, encoding="utf-8").read()


# -- inference.py end to end ---------------------------------------------------------------------------


def test_inference_report_matches_captions_and_probabilities(tiny_model, image_folder, tmp_path):
    probs_csv = tmp_path / "p.csv"
    cli("-M", tiny_model, "-w", "0", "-r", "-o", probs_csv, image_folder, check_rc=0)
    rows = read_csv(probs_csv.read_text(encoding="utf-8"))
    header, body = rows[0][1:], rows[1:]
    run = cli("-M", tiny_model, "-w", "0", "-r", "-i", "off", "-t", "0.2", "--report", tmp_path / "rep.html",
              image_folder, check_rc=0)
    assert "Report: " in run.stderr and str(tmp_path / "rep.html") in run.stderr
    table = read(tmp_path / "rep.csv")
    # counts from the captions themselves (caption spelling), means from the raw probabilities (-i off)
    counts: dict[str, int] = {}
    captions = {}
    for row in body:
        caption = open(row[0][: row[0].rindex(".")] + ".txt", encoding="utf-8").read()
        captions[row[0]] = set(filter(None, caption.split(", ")))
        for tag in captions[row[0]]:
            counts[tag] = counts.get(tag, 0) + 1
    assert counts and {caption_tag(r["tag"]): int(r["count"]) for r in table} == counts
    probs = {row[0]: dict(zip(header, map(float, row[1:]))) for row in body}
    meta = load_metadata(TAGS_CSV)  # rewritten names, as the run's labels (vulva -> pussy)
    names = dict(zip(meta.category, category_names(list(meta.category), meta)))
    for r in table:
        given = [p[r["tag"]] for f, p in probs.items() if caption_tag(r["tag"]) in captions[f]]
        assert len(given) == int(r["count"]) and float(r["mean_probability"]) == pytest.approx(
            np.mean(given), abs=2e-4)
        assert r["category"] == names[r["tag"]]
        assert float(r["percent"]) == pytest.approx(100 * len(given) / 3, abs=0.01)
    review = read(tmp_path / "rep-review.csv")
    fewest = [row for row in review if row["list"] == "fewest tags"]
    assert sorted((r["file"], int(r["tags"])) for r in fewest) == sorted((f, len(c)) for f, c in captions.items())
    for row in review:
        near = sum(1 for v in probs[row["file"]].values() if abs(v - 0.6) <= BORDERLINE_MARGIN)
        assert abs(int(row["borderline"]) - near) <= 2  # the CSV's 4-decimal rounding can move an edge case
    page = (tmp_path / "rep.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page
    for name in ("a.png", "b.jpg", "c.webp"):
        assert name in page
    assert page.count("data:image/jpeg;base64,") == len(review)


def test_inference_report_checked_before_the_model_loads(tiny_model, image_folder, tmp_path):
    run = cli("-M", tmp_path / "no-such-model.safetensors", "--report", tmp_path / "nowhere" / "rep", image_folder,
              check_rc=2)
    assert "--report" in run.stderr and "does not exist" in run.stderr and "no-such-model" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    run = cli("-M", tiny_model, "--report", tmp_path / "rep", check_rc=2)  # no PATHs: the REPL has no report
    assert "needs images" in run.stderr and not (tmp_path / "rep.csv").exists()
