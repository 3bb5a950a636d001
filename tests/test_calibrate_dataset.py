"""calibrate.py --from-dataset and hydra/calibration/ (dataset, sidecars, cache): calibration on your own images.

Covers: sidecar forms (.txt in e621 and caption spelling, JSON lists, objects, e621 posts) and tag
matching; an end-to-end run on a tiny fixture model and generated images whose validation CSV is checked
count by count against a hand computation from the model's probabilities; the merge with a small fake
default validation CSV and the summary lines; skipped and failing files; the probability cache (a rerun
never loads the model, a changed image is recomputed, --refresh, a damaged chunk, an interrupted run
resumes); and the DINOv3 family (vocabulary spelling, no default validation data).

Run: venv/bin/python -m pytest tests/test_calibrate_dataset.py -q
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image

import calibrate
from hydra.calibration import cache as probability_cache
from hydra.calibration import dataset
from hydra.calibration import thresholds as calibration
from hydra.calibration.sidecars import SidecarError, TagMatcher, split_caption, tags_from_json
from hydra.calibration.thresholds import Curve
from hydra.calibration.validation_csv import read_validation_csv
from hydra.tagger import Tagger
from hydra.tags.rules import caption_tag, rewrite_tag

TAGS = ["3d_(artwork)", "canine", "explicit", "fox", "red_fox", "safe", "spread_vulva", "unused_tag", "never_tag"]
META = "tag,category,implications\nred_fox,5,fox\nfox,5,canine\ncanine,5,\nspread_vulva,0,\n"
IMPLIES = {"red_fox": ["fox", "canine"], "fox": ["canine"]}  # transitive, for the expected truth
# the fake default validation data: one tag the dataset lacks, one it has, one the model lacks
DEFAULT_VAL = ("tag,threshold,tp,fp,tn,fn\nunused_tag,0.3,5,1,9,1\nunused_tag,0.6,3,0,10,3\n"
               "safe,0.5,1,1,1,1\nnot_in_model,0.5,1,1,1,1\n")

# (sidecar form, tags as written): each form is used for 4 images, 24 labelled images in all
SETS = [
    ("txt_caption", ["red_fox", "3d_(artwork)", "spread_vulva", "blue sky"]),
    ("txt_e621", ["canine", "safe"]),
    ("json_list", ["fox", "explicit", "not_a_model_tag"]),
    ("json_tags", ["red_fox", "safe"]),
    ("json_post", ["spread_vulva", "fox"]),     # + rating "e" -> explicit
    ("json_wrapped", ["3d_(artwork)", "canine"]),  # + rating "s" -> safe
]
PREDICT_SAMPLES = Tagger.predict_samples  # the real one, whatever the tests wrap around it


def write_sidecar(stem: Path, form: str, tags: list[str]) -> set[str]:
    """Write one sidecar; returns the true model tags as written (before implications)."""
    if form == "txt_caption":  # what inference.py writes: spaces, escaped parentheses, pussy; one upper-case
        words = [caption_tag(rewrite_tag(t)) for t in tags]
        words[0] = words[0].title()
        stem.with_suffix(".txt").write_text(", ".join(words), encoding="utf-8")
    elif form == "txt_e621":
        stem.with_suffix(".txt").write_text("\n".join(tags) + "\n", encoding="utf-8-sig")  # BOM, newlines
    elif form == "json_list":
        stem.with_suffix(".json").write_text(json.dumps(tags))
    elif form == "json_tags":
        stem.with_suffix(".json").write_text(json.dumps({"tags": " ".join(tags), "id": 1}))
    elif form == "json_post":
        stem.with_suffix(".json").write_text(json.dumps(
            {"tags": {"general": tags[:1], "species": tags[1:], "invalid": []}, "rating": "e"}))
        return set(tags) | {"explicit"}
    else:
        stem.with_suffix(".json").write_text(json.dumps({"post": {"tags": {"meta": tags[:1], "species": tags[1:]},
                                                                  "rating": "s"}}))
        return set(tags) | {"safe"}
    return {t for t in tags if t in TAGS}


def make_dataset(folder: Path, bad_files: bool = True) -> dict[str, set[str]]:
    """~30 generated images with sidecars; returns image path -> true tags after implications."""
    folder.mkdir(parents=True)
    truth = {}
    for i in range(24):
        form, tags = SETS[i % len(SETS)]
        image = folder / f"img{i:02d}.png"
        noise_image(48, 48, seed=i).save(image)
        written = write_sidecar(folder / f"img{i:02d}", form, tags)
        truth[str(image)] = written | {c for t in written for c in IMPLIES.get(t, [])}
    for i in range(3):
        noise_image(48, 48, seed=100 + i).save(folder / f"untagged{i}.png")  # no sidecar: skipped
    if bad_files:
        noise_image(48, 48, seed=200).save(folder / "prose.png")
        (folder / "prose.txt").write_text("a photo of a dog on grass")  # names no model tag: skipped
        noise_image(48, 48, seed=201).save(folder / "empty.png")
        (folder / "empty.txt").write_text("")  # skipped
        (folder / "broken.png").write_bytes(b"not a png")  # a failed image
        (folder / "broken.txt").write_text("fox")
        noise_image(48, 48, seed=202).save(folder / "badjson.png")
        (folder / "badjson.json").write_text("{not json")  # a failed sidecar
    (folder / "sub").mkdir()
    noise_image(48, 48, seed=300).save(folder / "sub" / "deep.png")  # only with --recursive
    (folder / "sub" / "deep.txt").write_text("fox")
    return truth


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from hydra.testing.jtp3 import write_model

    return write_model(tmp_path_factory.mktemp("model") / "m.safetensors", TAGS, seed=5)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """tmp_path as the project folder (default data, metadata) and the current directory."""
    from hydra.models import resources

    monkeypatch.setattr(resources, "ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "jtp-3-hydra-tags.csv").write_text(META)
    (tmp_path / "data" / "jtp-3-hydra-val.csv").write_text(DEFAULT_VAL)
    return tmp_path


def run(capsys, *argv):
    code = calibrate.main(calibrate.build_parser().parse_args([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def base_args(model, folder):
    return ["--from-dataset", folder, "-M", model, "-S", "64", "--dtype", "fp32", "-w", "0", "-b", "4", "-E"]


def cached_probs(folder: Path) -> dict[str, np.ndarray]:
    """image path -> cached probabilities, read straight from the chunk files (later chunks win)."""
    (cache,) = (folder / probability_cache.CACHE_DIR).iterdir()
    rows = {}
    for chunk in sorted(cache.glob("*.npz")):
        with np.load(chunk) as z:
            for rel, row in zip(z["paths"].tolist(), z["probs"]):
                rows[str(folder / rel)] = row
    return rows


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


class CountCalls:
    """Wraps Tagger.predict_samples: counts calls, can raise on the n-th."""

    def __init__(self, monkeypatch, fail_on: int | None = None, error: type[BaseException] = RuntimeError):
        self.calls, self.images, self.fail_on, self.error = 0, 0, fail_on, error

        def wrapper(tagger, samples, *args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_on:
                raise self.error("stopped on purpose")
            self.images += len(samples)
            return PREDICT_SAMPLES(tagger, samples, *args, **kwargs)

        monkeypatch.setattr(Tagger, "predict_samples", wrapper)


# ---------------------------------------------------------------------------------------------------
# sidecars and matching (no model)


def test_json_sidecar_shapes():
    assert tags_from_json(["a", " b ", ""]) == ["a", "b"]
    assert tags_from_json({"tags": ["a", "b"]}) == ["a", "b"]
    assert tags_from_json({"tags": "a b\tc"}) == ["a", "b", "c"]
    post = {"tags": {"general": ["a"], "species": ["b"], "meta": []}, "rating": "q"}
    assert tags_from_json(post) == ["a", "b", "questionable"]
    assert tags_from_json({"post": post}) == ["a", "b", "questionable"]
    assert tags_from_json({"tags": [], "rating": "explicit"}) == ["explicit"]
    for bad in ({"id": 1}, "a, b", 3, {"tags": 5}, {"tags": [1, 2]}, {"tags": {"general": "a"}}):
        with pytest.raises(SidecarError):
            tags_from_json(bad)


def test_hostile_sidecars_are_reported_and_skipped(tmp_path, capsys):
    """A 100k-deep JSON (RecursionError), a FIFO (would block), an oversized file and a UTF-16 one: one line
    each naming the file, that sidecar skipped, the others read."""
    import os
    import threading

    from hydra.calibration.sidecars import MAX_JSON_BYTES, read_sidecar, read_sidecars

    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "deepobj.json").write_text('{"tags": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001)
    with open(tmp_path / "huge.json", "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: no disk used
    (tmp_path / "good.json").write_text('["fox"]')
    (tmp_path / "utf16.json").write_text('{"tags": ["caf\u00e9"]}', encoding="utf-16")  # with a BOM
    os.mkfifo(tmp_path / "fifo.json")
    for name in ("deep", "deepobj", "huge", "good", "utf16"):
        (tmp_path / f"{name}.png").write_bytes(b"")
    raw, missing, failed = read_sidecars([str(tmp_path / f"{n}.png") for n in ("deep", "deepobj", "huge", "good",
                                                                             "utf16")])
    assert raw == {str(tmp_path / "good.png"): ["fox"], str(tmp_path / "utf16.png"): ["caf\u00e9"]}
    assert (missing, failed) == (0, 3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "Traceback" not in "".join(err)
    assert any("deep.json" in line and "nested too deeply" in line for line in err), err
    assert any("deepobj.json" in line and "nested too deeply" in line for line in err), err
    assert any("huge.json" in line and "larger than" in line for line in err), err

    result = []
    reader = threading.Thread(target=lambda: result.append(pytest.raises(SidecarError, read_sidecar,
                                                                         str(tmp_path / "fifo.json"))),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading a FIFO sidecar blocked"
    assert "not a regular file" in str(result[0].value)


def test_caption_splitting_and_tag_matching():
    assert split_caption(" red fox,3d \\(artwork\\) ,\n\nsafe, ") == ["red fox", "3d \\(artwork\\)", "safe"]
    m = TagMatcher(["3d_(artwork)", "red_fox", "spread_vulva", "\\m/", "Case_Tag", "case_tag"], renames=(("vulva", "pussy"),))
    for tag, label in [("3d \\(artwork\\)", "3d_(artwork)"), ("3d_(artwork)", "3d_(artwork)"), ("Red Fox", "red_fox"),
                       ("red_fox", "red_fox"), ("spread pussy", "spread_vulva"), ("spread_vulva", "spread_vulva"),
                       ("\\m/", "\\m/"), ("Case_Tag", "Case_Tag"), ("CASE TAG", "case_tag")]:
        assert m.name(tag) == label, tag
    assert m.index("blue sky") is None and m.name("blue sky") == "blue sky"
    assert TagMatcher(["spread_vulva"]).index("spread pussy") is None  # the alias is JTP-3's only
    assert TagMatcher(["pussy", "vulva"], renames=(("vulva", "pussy"),)).name("pussy") == "pussy"  # an exact label wins


def test_merge_prefers_the_dataset_then_fallbacks_in_order():
    c = lambda n: Curve(np.array([0.5]), np.array([[n, 0, 0, 0]], float))
    curves, prov = dataset.merge_curves(["a", "b", "c", "d"], {"a": c(1), "b": c(2)}, {"a": 3, "b": 1},
                                        [("ext", {"b": c(3), "c": c(4)}), ("default", {"c": c(5), "x": c(6)})],
                                        min_positives=2)
    assert {t: cv.counts[0, 0] for t, cv in curves.items()} == {"a": 1, "b": 3, "c": 4}
    assert prov.sources == {"a": "the dataset", "b": "ext", "c": "ext"}
    assert prov.data_line() == "Model tags: 1 from the dataset, 2 from ext, 0 from default, 1 with no data (omitted)."
    assert prov.summary_line(["a", "c"]) == ("Calibrated 2 tags: 1 from the dataset, 1 from ext, 0 from default; "
                                             "2 of the model's 4 tags omitted.")


# ---------------------------------------------------------------------------------------------------
# end to end


def test_from_dataset_counts_match_a_hand_computation(model, project, capsys):
    truth = make_dataset(project / "ds")
    code, out, err = run(capsys, *base_args(model, "ds"), "-o", "-")
    assert code == 1, err  # a failed image and a failed sidecar: reported, not fatal

    # the cached probabilities are the model's (computed here directly, one image at a time)
    tagger = Tagger(model, device="cpu", dtype="fp32", seqlen=64)
    probs = cached_probs(project / "ds")
    assert sorted(probs) == sorted(truth)
    for path, row in probs.items():
        np.testing.assert_allclose(row, tagger.predict_samples([tagger.preprocess(path)])[0], atol=1e-5)

    # every count of the written validation CSV, by hand from those probabilities
    rows = read_rows(project / "ds" / "validation.csv")
    assert rows[0] == ["tag", "threshold", "tp", "fp", "tn", "fn"]
    occurring = [t for t in TAGS if any(t in tags for tags in truth.values())]
    assert occurring == TAGS[:7]
    expected = []
    for j, tag in enumerate(TAGS):
        if tag not in occurring:
            continue
        for k in range(1, 100):
            counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
            for path, tags in truth.items():
                said, true = float(probs[path][j]) >= k / 100, tag in tags
                counts[("t" if said == true else "f") + ("p" if said else "n")] += 1
            expected.append([tag, repr(k / 100), *(str(counts[c]) for c in ("tp", "fp", "tn", "fn"))])
    assert rows[1:] == expected

    # the calibration: the dataset's tags, plus unused_tag from the default data; never_tag omitted
    curves = read_validation_csv(str(project / "ds" / "validation.csv"))
    curves["unused_tag"] = read_validation_csv(str(project / "data" / "jtp-3-hydra-val.csv"))["unused_tag"]
    choices = calibration.select_thresholds(curves)
    assert "unused_tag" in choices and "never_tag" not in choices
    text = "tag,threshold,cti\r\n" + "".join(f"{t},{c.threshold:.4f},{c.score:.4f}\r\n" for t, c in choices.items())
    assert out == text

    lines = err.strip().splitlines()
    assert "Dataset 'ds': 31 images, 25 with tags; skipped 3 without a .txt/.json sidecar, 1 with an empty sidecar, " \
           "1 whose sidecar names no model tag, 1 with an unreadable sidecar." in lines
    # 60 (image, tag) pairs in the 24 images (15 per round of SETS, ratings included) + broken.png's fox
    assert ("Sidecar tags: 61 matched a model tag; 9 (3 distinct) matched none, e.g. 'blue sky', "
            "'not_a_model_tag', 'a photo of a dog on grass'.") in lines
    assert "'ds/badjson.json': not valid JSON (line 1: Expecting property name enclosed in double quotes)" in lines
    assert any(line.endswith("'ds/broken.png': not an image Pillow can read (unknown or damaged format)")
               for line in lines), err
    assert "Probabilities: 0 cached, 25 to compute" in err
    assert "Wrote 'ds/validation.csv': 7 tags occurring in 24 images." in lines
    assert "Model tags: 7 from the dataset, 1 from the default validation data, 1 with no data (omitted)." in lines
    n_data = sum(t in choices for t in occurring)
    assert lines[-1] == (f"Calibrated {len(choices)} tags: {n_data} from the dataset, 1 from the default validation "
                         f"data; {len(TAGS) - len(choices)} of the model's 9 tags omitted.")


def test_implications_are_optional_and_recursion(model, project, capsys):
    truth = make_dataset(project / "ds", bad_files=False)
    code, _, err = run(capsys, *base_args(model, "ds"), "--metadata", "", "--recursive", "-o", "-")
    assert code == 0, err
    assert "Implications added" not in err and "25 with tags" in err  # sub/deep.png counts now
    rows = read_rows(project / "ds" / "validation.csv")
    positives = {r[0]: int(r[2]) + int(r[5]) for r in rows[1:] if r[1] == "0.5"}
    written = {t: sum(t in tags for tags in truth.values()) for t in TAGS}
    # as written: red_fox no longer makes fox and canine true (sub/deep.png adds one fox)
    assert positives["fox"] == 1 + sum(("fox" in tags and "red_fox" not in tags) for tags in truth.values())
    assert positives["canine"] == sum(("canine" in tags and "fox" not in tags) for tags in truth.values())
    assert positives["red_fox"] == written["red_fox"]
    code, _, err = run(capsys, *base_args(model, "ds"), "-o", "-")
    assert "True tags are completed with the implications in 'data/jtp-3-hydra-tags.csv'." in err
    assert "Implications added 24 true tags." in err  # 8 red_fox images get fox + canine, 8 fox images canine


def test_min_positives_moves_rare_tags_to_the_default_data(model, project, capsys):
    make_dataset(project / "ds", bad_files=False)
    # positive images after implications (SETS x 4): 3d_(artwork) 8, canine 24, explicit 8, fox 16,
    # red_fox 8, safe 12, spread_vulva 8; so with 13, only canine and fox come from the dataset
    code, out, err = run(capsys, *base_args(model, "ds"), "-o", "-", "--min-positives", "13")
    assert code == 0, err
    assert "Model tags: 2 from the dataset, 2 from the default validation data, 5 with no data (omitted)." in err
    assert "safe,0.4999,0.3333" in out  # the default data's single candidate (cti 1/3)


# ---------------------------------------------------------------------------------------------------
# the cache


def test_rerun_uses_the_cache_without_loading_the_model(model, project, capsys, monkeypatch):
    make_dataset(project / "ds", bad_files=False)
    first = run(capsys, *base_args(model, "ds"), "-o", "first.csv")
    assert first[0] == 0, first[2]
    (cache,) = (project / "ds" / probability_cache.CACHE_DIR).iterdir()
    files = {p.name: p.read_bytes() for p in cache.iterdir()}
    assert sorted(files) == ["000001.npz", "model.json"]

    with monkeypatch.context() as m:
        m.setattr(Tagger, "__init__", lambda *a, **k: pytest.fail("the model must not be loaded"))
        code, _, err = run(capsys, *base_args(model, "ds"), "-o", "second.csv")
    assert code == 0, err
    assert "Probabilities: 24 cached, 0 to compute" in err and "Loading" not in err
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == files
    assert (project / "first.csv").read_bytes() == (project / "second.csv").read_bytes()

    # another sequence length is another cache
    code, _, err = run(capsys, *base_args(model, "ds"), "-S", "128", "-o", "-")
    assert code == 0 and "0 cached, 24 to compute" in err
    assert len(list((project / "ds" / probability_cache.CACHE_DIR).iterdir())) == 2


def test_changed_image_refresh_and_damaged_chunks(model, project, capsys, monkeypatch):
    make_dataset(project / "ds", bad_files=False)
    assert run(capsys, *base_args(model, "ds"), "-o", "-")[0] == 0
    noise_image(64, 64, seed=999).save(project / "ds" / "img03.png")  # new content: recomputed
    calls = CountCalls(monkeypatch)
    code, _, err = run(capsys, *base_args(model, "ds"), "-o", "-")
    assert code == 0 and "23 cached, 1 to compute" in err and calls.images == 1
    (cache,) = (project / "ds" / probability_cache.CACHE_DIR).iterdir()
    assert sorted(p.name for p in cache.glob("*.npz")) == ["000003.npz"]  # compacted after the run

    code, _, err = run(capsys, *base_args(model, "ds"), "-o", "-", "--refresh")
    assert code == 0 and "0 cached, 24 to compute" in err and calls.images == 25

    (cache / "000009.npz").write_bytes(b"garbage")
    code, _, err = run(capsys, *base_args(model, "ds"), "-o", "-")
    assert code == 0 and "Note: ignoring damaged cache file" in err and "24 cached, 0 to compute" in err


def test_truncated_or_corrupt_chunks_are_recomputed_once(model, project, capsys, monkeypatch):
    """A chunk cut short (BadZipFile) or with a flipped byte (bad CRC) is ignored with one note per run, its
    images are tagged again, and the damaged files are gone after the run (no note on the next one)."""
    make_dataset(project / "ds", bad_files=False)
    assert run(capsys, *base_args(model, "ds"), "-o", "first.csv")[0] == 0
    (cache,) = (project / "ds" / probability_cache.CACHE_DIR).iterdir()
    data = (cache / "000001.npz").read_bytes()
    (cache / "000001.npz").write_bytes(data[: len(data) // 2])  # cut short: no central directory
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the probabilities: a CRC error when read
    (cache / "000002.npz").write_bytes(bytes(flipped))
    (cache / "000003.npz").write_bytes(b"PK\x03\x04" + data[4:100])
    calls = CountCalls(monkeypatch)
    code, _, err = run(capsys, *base_args(model, "ds"), "-o", "second.csv")
    assert code == 0, err
    assert err.count("Note: ignoring damaged cache file") == 1 and "and 2 more" in err, err
    assert "Traceback" not in err and "0 cached, 24 to compute" in err and calls.images == 24
    assert (project / "first.csv").read_bytes() == (project / "second.csv").read_bytes()
    assert [p.name for p in cache.glob("*.npz")] == ["000005.npz"]  # the new chunk, compacted
    code, _, err = run(capsys, *base_args(model, "ds"), "-o", "-")
    assert code == 0 and "damaged" not in err and "24 cached, 0 to compute" in err and calls.images == 24


@pytest.mark.parametrize("flush_images, error", [(1, RuntimeError), (10_000, KeyboardInterrupt)],
                         ids=["crash-with-chunks-on-the-way", "ctrl-c-saves-on-the-way-out"])
def test_an_interrupted_run_resumes(model, project, capsys, monkeypatch, flush_images, error):
    make_dataset(project / "ds", bad_files=False)
    monkeypatch.setattr(probability_cache, "FLUSH_IMAGES", flush_images)
    stopper = CountCalls(monkeypatch, fail_on=4, error=error)  # 3 batches done (the first is 1 image), then it stops
    with pytest.raises(error):
        run(capsys, *base_args(model, "ds"), "-o", "-")
    done = stopper.images
    assert done == 1 + 4 + 4 and len(cached_probs(project / "ds")) == done
    assert not list((project / "ds").rglob(".*.tmp"))  # no temporary debris

    calls = CountCalls(monkeypatch)
    code, out, err = run(capsys, *base_args(model, "ds"), "-o", "-")
    assert code == 0 and f"{done} cached, {24 - done} to compute" in err and calls.images == 24 - done
    resumed = (project / "ds" / "validation.csv").read_bytes()
    code, _, _ = run(capsys, *base_args(model, "ds"), "-o", "-", "--refresh")
    assert code == 0 and (project / "ds" / "validation.csv").read_bytes() == resumed


# ---------------------------------------------------------------------------------------------------
# defaults missing, errors, DINOv3


def test_missing_default_data_is_one_line_and_the_dataset_alone_is_used(model, project, capsys):
    make_dataset(project / "ds", bad_files=False)
    (project / "data" / "jtp-3-hydra-val.csv").unlink()  # HF_HUB_OFFLINE is set by conftest
    code, out, err = run(capsys, *base_args(model, "ds"), "-o", "-", "--data-out", "val.csv")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "HF_HUB_OFFLINE" in line]
    assert len(notes) == 1 and notes[0].endswith("Continuing with only the dataset's tags.")
    assert "Model tags: 7 from the dataset, 2 with no data (omitted)." in err
    assert (project / "val.csv").exists() and not (project / "ds" / "validation.csv").exists()
    assert "unused_tag" not in out


@pytest.mark.parametrize("argv, message", [
    (["--from-dataset", "nowhere"], "dataset folder 'nowhere' does not exist"),
    (["--from-dataset", "empty_ds"], "no image in 'empty_ds' has a .txt or .json sidecar naming a model tag"),
    (["--from-dataset", "empty_ds", "-M", "missing.safetensors"], "model file 'missing.safetensors' does not exist"),
    (["--from-dataset", "empty_ds", "--metadata", "nope.csv"], "metadata file 'nope.csv' does not exist"),
])
def test_dataset_errors_are_one_line(model, project, capsys, argv, message):
    (project / "empty_ds").mkdir()
    noise_image(32, 32).save(project / "empty_ds" / "x.png")
    (project / "empty_ds" / "x.txt").write_text("something else")
    if "-M" not in argv:
        argv = [*argv, "-M", model]
    code, out, err = run(capsys, *argv, "-w", "0", "-S", "64")
    assert code == 2 and out == "" and err.strip().splitlines()[-1].startswith("calibrate.py: error: ")
    assert message in err, err


def test_dinov3_uses_vocabulary_spelling_and_no_default_data(project, capsys, monkeypatch):
    from hydra import hub
    from hydra.testing.dinov3 import write_dinov3_checkpoint, write_vocab

    vocab = ["red fox", "fox", "3d (artwork)", "spread vulva", "spread pussy", "rare tag"]
    write_dinov3_checkpoint(project / "dino.safetensors", vocab, seed=2)
    write_vocab(project / "tagger_vocab.json", vocab)
    folder = project / "ds"
    folder.mkdir()
    for i in range(8):
        noise_image(48, 48, seed=i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["red_fox, fox", "3d \\(artwork\\)", "spread pussy", "spread_vulva"][i % 4])
    monkeypatch.setattr(hub, "ensure_file", lambda *a, **k: pytest.fail("no default data for DINOv3"))
    code, out, err = run(capsys, "--from-dataset", "ds", "-M", "dino.safetensors", "-w", "0", "-b", "3",
                         "--dtype", "fp32", "-o", "-", "-p", "0", "-r", "0")
    assert code == 0, err
    tags = [r[0] for r in read_rows(folder / "validation.csv")[1::99]]
    assert tags == ["red fox", "fox", "3d (artwork)", "spread vulva", "spread pussy"]  # no pussy -> vulva here
    assert "DINOv3 tagger has no default validation data" in err
    assert "Model tags: 5 from the dataset, 1 with no data (omitted)." in err
    assert err.strip().splitlines()[-1] == "Calibrated 5 tags: 5 from the dataset; 1 of the model's 6 tags omitted."
    assert [line.split(",")[0] for line in out.splitlines()[1:]] == sorted(tags)
