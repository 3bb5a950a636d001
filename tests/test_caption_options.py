"""The kohya / TagGUI caption options (issue 16 item 1): unit tests of the shared tag machinery, and inference.py
end to end on tiny random models (JTP-3 over 12 made-up tags, Hydra 3.5 with categories).

    venv/bin/python -m pytest tests/test_caption_options.py -q
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, noise_image

from hydra.bulk.run import CaptionOptions, CaptionSink, caption_extension, caption_path, merge_captions
from hydra.cli import category_threshold, replacement
from hydra.models.family import CaptionStyle
from hydra.tags.rules import (
    TagMetadata,
    TagSettings,
    cap_tags,
    caption_format,
    category_threshold_vector,
    tag_key,
)

SCRIPT = str(ROOT / "inference.py")


def cli(*args, check_rc=None):
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


# -- unit tests ---------------------------------------------------------------------------------------------

LABELS = ["anthro", "pokemon_(species)", "spread_pussy", "nick_wilde", "blue_eyes", "safe"]
CATS = ["general", "species", "general", "character", "general", "meta"]


def fmt(**kw):
    return caption_format(LABELS, CATS, CaptionStyle(), rename=lambda t: t.replace("vulva", "pussy"), **kw)


def test_tag_key_and_names_match_e621_and_caption_spelling(capsys):
    assert tag_key("pokemon_(species)") == tag_key("pokemon \\(species\\)") == tag_key(" Pokemon  (species) ")
    names = fmt().names
    for name in ("pokemon_(species)", "pokemon (species)", "pokemon \\(species\\)", "spread vulva", "Nick Wilde"):
        assert names.find(name) is not None, name
    assert names.find("spread vulva") == "spread_pussy"
    assert names.find("nope") is None
    assert names.resolve(["anthro", "nope", "anthro", "also nope"], "--undesired-tags") == ["anthro"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--undesired-tags" in err and "'nope', 'also nope'" in err


def test_prefix_items_go_first_once_in_caption_spelling():
    f = fmt()
    tags = {"anthro": 0.9, "pokemon_(species)": 0.8, "blue_eyes": 0.7}
    assert f.caption(tags, "trigger, anthro") == "trigger, anthro, pokemon \\(species\\), blue eyes"
    assert f.caption(tags, "trigger, anthro, ") == f.caption(tags, " trigger ,anthro,,")
    assert f.caption(tags, "pokemon_(species), trigger") == "pokemon \\(species\\), trigger, anthro, blue eyes"
    assert f.caption(tags, "Anthro, anthro") == "anthro, pokemon \\(species\\), blue eyes"
    assert f.caption(tags, "x", first=["mychar"]) == "mychar, x, anthro, pokemon \\(species\\), blue eyes"
    assert f.caption({}, "  ,  ") == ""


def test_separator_and_underscores():
    tags = {"anthro": 0.9, "blue_eyes": 0.7}
    assert fmt(separator=" | ").caption(tags, "a, b | c") == "a | b | c | anthro | blue eyes"
    assert fmt(underscores=True).caption(tags) == "anthro blue_eyes"
    assert fmt(underscores=True, separator=", ").caption(tags, "trigger,") == "trigger, anthro, blue_eyes"


def test_max_tags_keeps_the_most_probable_in_order():
    tags = {"a": 0.5, "b": 0.9, "c": 0.7, "d": 0.7}
    assert cap_tags(tags, 2) == {"b": 0.9, "c": 0.7}
    assert list(cap_tags(tags, 3)) == ["b", "c", "d"] and cap_tags(tags, None) is tags
    meta = TagMetadata(dict(zip(LABELS, [0, 5, 0, 4, 0, 7])), {t: () for t in LABELS})
    s = TagSettings(LABELS, meta, lambda t: t, 0.0, "off", max_tags=2)
    probs = np.array([0.3, 0.9, 0.8, 0.1, 0.95, 0.2])
    assert s.rules().classify(probs) == {"pokemon_(species)": 0.9, "blue_eyes": 0.95}


def test_category_thresholds_replace_the_tag_thresholds():
    meta = TagMetadata(dict(zip(LABELS, [0, 5, 0, 4, 0, 7])), {t: () for t in LABELS})
    out = category_threshold_vector(LABELS, meta, np.full(6, 0.6), {"character": 0.9, "rating": 0.2, "meta": 0.95})
    assert out.tolist() == [0.6, 0.6, 0.6, 0.9, 0.6, 0.2]  # the subcategory wins over its category
    s = TagSettings(LABELS, meta, lambda t: t, {"anthro": 0.5}, "off", category_thresholds={"character": 0.85})
    got = s.rules().classify(np.array([0.6, 0.99, 0.99, 0.86, 0.2, 0.1]))
    assert got == {"anthro": 0.6, "nick_wilde": 0.86}  # uncalibrated tags stay off; the character is on
    with pytest.raises(ValueError, match="needs tag categories"):
        category_threshold_vector(LABELS, None, np.zeros(6), {"character": 0.5})


def test_argument_types():
    assert replacement("old=new") == ("old", "new") and replacement(" a b = c ") == ("a b", "c")
    assert category_threshold("character=0.7") == ("character", pytest.approx(0.85))
    for bad in ("character", "=0.5", "character=x"):
        with pytest.raises(Exception, match="CATEGORY=THRESHOLD"):
            category_threshold(bad)
    with pytest.raises(Exception, match="between"):
        category_threshold("general=2")


def test_option_text_parsed_once_for_the_cli_and_the_web_form(capsys):
    """hydra/tags/caption_options.py: plain ValueErrors (the web form's), which the argparse types wrap."""
    from hydra.tags import caption_options as options

    assert options.parse_replacement(" a b = c ") == ("a b", "c")
    assert options.parse_category_threshold("character=0.7") == ("character", pytest.approx(0.85))
    assert options.split_tags(" text,, signature , ") == ["text", "signature"]
    for parse, bad in ((options.parse_replacement, "a="), (options.parse_category_threshold, "x=y")):
        with pytest.raises(ValueError) as plain:
            parse(bad)
        with pytest.raises(Exception) as flag:  # argparse.ArgumentTypeError: the same words
            (replacement if parse is options.parse_replacement else category_threshold)(bad)
        assert str(plain.value) == str(flag.value) and type(flag.value) is not ValueError
    meta = TagMetadata(dict(zip(LABELS, [0, 5, 0, 4, 0, 7])), {t: () for t in LABELS})
    options.check_category_thresholds({}, None, 30, "")  # nothing asked: nothing to refuse
    with pytest.raises(ValueError, match=r"keeps the top 30 tags \(here\)"):
        options.check_category_thresholds({"character": 0.5}, meta, 30, "(here)")
    with pytest.raises(ValueError, match="unknown category 'nope'"):
        options.check_category_thresholds({"nope": 0.5}, meta, None, "")
    # replacements in either spelling; the ones the model lacks go to `warn` (the web summary), not stderr
    notes = []
    f = options.caption_spelling(LABELS, meta, lambda t: t, CaptionStyle(), aliases={"blue eyes": "azure", "x": "y"},
                                 separator=" | ", warn=notes.append)
    assert f.caption({"anthro": 0.9, "blue_eyes": 0.8}) == "anthro | azure"
    assert options.undesired_labels(f, ["Anthro", "zzz"], notes.append) == ["anthro"]
    assert len(notes) == 2 and "'x'" in notes[0] and "--undesired-tags" in notes[1] and "'zzz'" in notes[1]
    assert capsys.readouterr().err == ""


def test_caption_extension_and_paths(tmp_path):
    assert caption_extension("caption") == caption_extension(".caption") == ".caption"
    for bad in ("a/b", "..", ".", "x\\y", ".png", "JPG"):
        with pytest.raises(ValueError, match="--caption-extension"):
            caption_extension(bad)
    assert caption_path("x/a.png", ".caption") == "x/a.caption"
    out = str(tmp_path / "out")
    assert caption_path("pics/sub/a.png", ".txt", out, "pics") == os.path.join(out, "sub", "a.txt")
    assert caption_path("/else/where/a.png", ".txt", out, None) == os.path.join(out, "a.txt")
    with pytest.raises(OSError, match="outside"):
        caption_path("/a/b.png", ".txt", out, "/a/c")


def test_caption_options_roots_triggers_and_collisions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("a/10_my char", "a/misc", "b", "20_x"):
        os.makedirs(folder)
    o = CaptionOptions.create(["a", "b", "20_x/"], ".txt", "out", trigger_from_folder=True)
    assert o.path("a/10_my char/i.png") == str(tmp_path / "out" / "10_my char" / "i.txt")
    assert o.path("b/i.png") == str(tmp_path / "out" / "i.txt")
    assert o.path("elsewhere/j.png") == str(tmp_path / "out" / "j.txt")  # a file given directly
    assert o.first("a/10_my char/i.png") == ["my char"] and o.first("a/misc/i.png") == [] and o.first("b/i.png") == []
    assert o.first("20_x/i.png") == ["x"]
    (tmp_path / "a/misc/i.png").touch(), (tmp_path / "b/i.png").touch(), (tmp_path / "b/j.png").touch()
    sink = CaptionSink(None, None, options=CaptionOptions.create(["a/misc", "b"], output_dir="out"))
    refused = sink.refuse(["b/i.png", "a/misc/i.png", "b/j.png"])  # the first in sorted order gets out/i.txt
    assert list(refused) == ["b/i.png"] and "same caption file" in refused["b/i.png"]
    assert CaptionOptions.create(["a"]).path("a/misc/i.png") == "a/misc/i.txt"  # beside the image by default


def test_append_merges_on_the_separator():
    merged = merge_captions("old | anthro", "trigger | anthro | new", ["trigger"], " | ")
    assert merged == "trigger | old | anthro | new"
    assert merge_captions("a, b", "b, c") == "a, b, c"
    assert merge_captions("blue_eyes solo", "solo tail", (), " ") == "blue_eyes solo tail"


# -- inference.py end to end --------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path):
    for i, rel in enumerate(["train/10_mychar/a.png", "train/misc/b.png"]):
        path = tmp_path / rel
        path.parent.mkdir(parents=True)
        noise_image(96 + 32 * i, 80, i).save(path)
    return tmp_path / "train"


def probabilities(model, folder):
    run = cli("-M", model, "-w", "0", "-r", "-o", "-", folder, check_rc=0)
    header = [f"tag_{i:02d}" for i in range(12)]
    return {row[0]: dict(zip(header, map(float, row[1:]))) for row in csv.reader(io.StringIO(run.stdout))}


def test_kohya_style_dataset_run(small_model, dataset, tmp_path):
    model, names = small_model
    out = tmp_path / "captions"
    run = cli("-M", model, "-w", "0", "-r", "-t", "-1", "-i", "off", "--trigger-from-folder", "--output-dir", out,
              "--caption-extension", "caption", "--undesired-tags", "tag 01, nope", "--replace-tag", "tag_02=renamed",
              "--max-tags", "5", "-p", "trigger, tag_03, ", "--separator", " | ", dataset, check_rc=0)
    assert run.stderr.count("nope") == 1  # the unknown tag: one warning
    probs = probabilities(model, dataset)
    for rel, trigger in (("10_mychar/a", ["mychar"]), ("misc/b", [])):
        text = (out / f"{rel}.caption").read_text(encoding="utf-8")
        assert not (dataset / f"{rel}.txt").exists() and not (dataset / f"{rel}.caption").exists()
        items = text.split(" | ")
        assert items[: len(trigger) + 2] == [*trigger, "trigger", "tag 03"]
        p = probs[str(dataset / f"{rel}.png")]
        top = sorted((t for t in p if t != "tag_01"), key=lambda t: (-p[t], t))[:5]
        spelled = {"renamed" if t == "tag_02" else t.replace("_", " ") for t in top} - {"tag 03"}
        assert set(items[len(trigger) + 2:]) == spelled and len(items) == len(set(items))
        assert "tag 01" not in items


def test_format_tags_is_the_caption_and_unused_options_are_named(small_model, dataset):
    model, _ = small_model
    flags = ["-M", model, "-w", "0", "-t", "0", "--trigger-from-folder", "-p", "x,", "--max-tags", "3"]
    printed = cli(*flags, "--format", "tags", "--output-dir", "elsewhere", dataset / "10_mychar", check_rc=0)
    assert "note: --output-dir applies to caption files" in printed.stderr
    cli(*flags, dataset / "10_mychar", check_rc=0)
    assert printed.stdout.strip() == (dataset / "10_mychar" / "a.txt").read_text(encoding="utf-8")
    assert printed.stdout.startswith("mychar, x")
    names = cli(*flags, "--format", "names", dataset / "10_mychar", check_rc=0)
    assert "mychar" not in names.stdout and "tag_" in names.stdout  # label names, no caption prefix
    csv_run = cli(*flags, "-o", "-", dataset / "10_mychar", check_rc=0)
    assert "--trigger-from-folder, --max-tags apply to caption files; -o writes every probability" in csv_run.stderr


def test_bad_caption_options_are_one_line_errors(small_model, dataset, tmp_path):
    model, _ = small_model
    for flags, message in [(["--caption-extension", "a/b"], "without a path separator"),
                           (["--caption-extension", ".png"], "image extension"),
                           (["-u", "--spaces"], "not both"),
                           (["--output-dir", dataset / "misc" / "b.png"], "is not a folder")]:
        run = cli("-M", model, "-w", "0", *flags, dataset / "misc", check_rc=2)
        assert message in run.stderr and "Traceback" not in run.stderr, flags
    (tmp_path / "other").mkdir()
    noise_image(64, 64).save(tmp_path / "other" / "b.png")
    run = cli("-M", model, "-w", "0", "--output-dir", tmp_path / "o", dataset / "misc", tmp_path / "other", check_rc=1)
    assert "same caption file" in run.stderr and "Traceback" not in run.stderr
    assert os.listdir(tmp_path / "o") == ["b.txt"]  # one of the two b.png gets it (the first in sorted order)


def test_hydra35_category_threshold_and_blocklist(tmp_path):
    from hydra.testing.hydra35 import write_hydra35_model

    labels = ["fox", "male", "solo", "nick_wilde", "safe", "text_(meta)"]
    model = write_hydra35_model(tmp_path / "h.safetensors", labels,
                                categories=["species", "general", "general", "character", "meta", "meta"],
                                implies=[[], [], [], ["fox"], [], []], seed=3)
    noise_image(128, 96).save(tmp_path / "i.png")
    base = ["-M", model, "--dtype", "fp32", "-w", "0", "-i", "off", "-t", "-1", tmp_path / "i.png"]
    cli(*base, check_rc=0)
    assert (tmp_path / "i.txt").read_text() == "fox, male, solo, nick wilde, safe, text (meta)"
    cli(*base, "--category-threshold", "character=1", "--undesired-tags", "text \\(meta\\)", "-X",
        tmp_path / "missing-is-an-error", check_rc=2)
    cli(*base, "--category-threshold", "character=1", "--undesired-tags", "text \\(meta\\)", "--exclude-tag", "solo",
        check_rc=0)
    assert (tmp_path / "i.txt").read_text() == "fox, male, safe"  # character p >= 1 never passes
    run = cli(*base, "--category-threshold", "charcter=0.5", check_rc=2)
    assert "unknown category 'charcter'" in run.stderr and run.stderr.count("\n") <= 3
    run = cli("-M", model, "-w", "0", "--topk", "3", "--category-threshold", "character=0.5", tmp_path / "i.png",
              check_rc=2)
    assert "give -t instead" in run.stderr
