"""Tag rules without a model: spelling rewrites, the symmetric scale, metadata and calibration CSVs,
thresholds, category exclusion and caption formatting. Runs with torch absent (checked in a subprocess).

    venv/bin/python -m pytest tests/test_tags.py -q
"""

from __future__ import annotations

import math
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydra.tags.rules import (
    CATEGORIES,
    DataFileError,
    TagMetadata,
    TagRules,
    TagSettings,
    caption_tag,
    category_vector,
    format_caption,
    from_symmetric,
    load_calibration,
    load_metadata,
    parse_categories,
    parse_threshold,
    rewrite_tag,
    tag_rewriter,
    threshold_vector,
    to_symmetric,
)

TAGS_CSV = "data/jtp-3-hydra-tags.csv"


def test_rewrite_and_caption_spelling():
    assert rewrite_tag("spread_vulva") == "spread_pussy"
    assert rewrite_tag("spread_vulva", original_tags=True) == "spread_vulva"
    assert tag_rewriter(False)("vulva") == "pussy" and tag_rewriter(True)("vulva") == "vulva"
    assert caption_tag("3d_(artwork)") == "3d \\(artwork\\)"
    assert caption_tag("male_feral") == "male feral"


def test_symmetric_scale():
    assert from_symmetric(0.5) == 0.75 and from_symmetric(-1) == 0 and from_symmetric(1) == 1
    assert to_symmetric(0.75) == 0.5
    assert parse_threshold("0.2") == pytest.approx(0.6)
    with pytest.raises(ValueError, match="between -1.0 and 1.0"):
        parse_threshold("1.5")
    with pytest.raises(FileNotFoundError):
        parse_threshold("no-such-calibration.csv")


def test_real_metadata_file():
    meta = load_metadata(TAGS_CSV)
    assert len(meta.category) == 7504
    counts = np.bincount(list(meta.category.values()))
    assert (counts[0], counts[5], counts[4], counts[7], counts[3], counts[8]) == (5141, 1298, 928, 99, 32, 6)
    assert meta.implies["tyrannosaurus_rex"] == ("tyrannosaurid",)
    assert meta.implies["zzz"] == ("sleeping", "vowelless_sound_effect")
    # vulva -> pussy applies to keys and implications alike (25 tags, no collisions)
    assert "pussy" in meta.category and "vulva" not in meta.category
    assert meta.implies["pussy"] == ("genitals",)
    assert len(load_metadata(TAGS_CSV, tag_rewriter(True)).category) == 7504
    assert sum("vulva" in t for t in load_metadata(TAGS_CSV, tag_rewriter(True)).category) == 25


def test_metadata_errors_name_the_line(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("tag,category,implications\na,0,\nb,x,\n")
    with pytest.raises(DataFileError, match=r"m\.csv: line 3: category 'x'"):
        load_metadata(bad)
    bad.write_text("tag,implications\na,\n")
    with pytest.raises(DataFileError, match="line 1: missing column"):
        load_metadata(bad)


def test_calibration_file(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("\ufefftag,threshold,cti\nspread_vulva,0.4,0.5\nsolo,,0.1\nanthro,1,0.9\n", encoding="utf-8")
    assert load_calibration(f) == {"spread_pussy": 0.4, "anthro": 1.0}  # BOM ok, blank skipped, rewritten
    f.write_text("tag,threshold\na,0.2\nb,1.2\n")
    with pytest.raises(DataFileError, match=r"line 3: 'threshold' must be between 0.0 and 1.0"):
        load_calibration(f)
    f.write_text("tag,cti\na,0.2\n")
    with pytest.raises(DataFileError, match="missing column"):
        load_calibration(f)


def test_threshold_vector_calibration_missing_tags_never_pass():
    v = threshold_vector(["a", "b"], {"a": 0.3})
    assert v[0] == 0.3 and math.isinf(v[1])
    assert (threshold_vector(["a", "b"], 0.75) == 0.75).all()


def test_category_exclusion_and_unknown_tags():
    meta = TagMetadata()
    meta.add("fox", CATEGORIES["species"])
    meta.add("solo", CATEGORIES["general"])
    labels = ["fox", "solo", "new_tag"]
    assert category_vector(labels, meta).tolist() == [5, 0, -1]
    settings = TagSettings(labels, meta, rewrite_tag, 0.5, "off", parse_categories(["species"]))
    assert settings.rules().classify(np.array([0.9, 0.9, 0.9])) == pytest.approx({"solo": 0.9, "new_tag": 0.9})
    with pytest.raises(ValueError, match="choose from general artist"):
        parse_categories(["people"])


def test_threshold_is_inclusive():
    rules = TagRules(["a", "b"], np.array([0.5, 0.5]))
    assert list(rules.classify(np.array([0.5, 0.4999]))) == ["a"]


def test_active_tags_cover_what_the_rules_can_output():
    meta = TagMetadata()
    meta.add("a", 0, ["b"])
    meta.add("b", 0)
    meta.add("c", 7)
    s = TagSettings(["a", "b", "c"], meta, rewrite_tag, {"b": 0.5}, "inherit")
    assert s.rules().active().tolist() == [True, True, False]  # b inherits from a
    s.mode = "off"
    assert s.rules().active().tolist() == [False, True, False]
    s.threshold, s.exclude = 0.5, [7]
    assert s.rules().active().tolist() == [True, True, False]


def test_caption_order_prefix_and_shuffle():
    tags = {"solo": 0.7, "fox_(character)": 0.9, "anthro": 0.8}
    assert format_caption(tags) == "fox \\(character\\), anthro, solo"
    assert format_caption(tags, prefix="anthro") == "anthro, fox \\(character\\), solo"
    assert format_caption(tags, prefix="my style, 1") == "my style, 1, fox \\(character\\), anthro, solo"
    shuffled = format_caption(tags, shuffle=True, rng=random.Random(1))
    assert sorted(shuffled.split(", ")) == sorted(format_caption(tags).split(", "))
    assert format_caption({}) == "" and format_caption({}, prefix="x") == "x"


@given(st.lists(st.tuples(st.text(alphabet="abc_()", min_size=1, max_size=6), st.floats(0, 1)), max_size=8))
def test_calibration_round_trip(tmp_path_factory, rows):
    f = tmp_path_factory.mktemp("cal") / "c.csv"
    f.write_text("tag,threshold\n" + "".join(f"{t},{v!r}\n" for t, v in rows), encoding="utf-8")
    assert load_calibration(f, tag_rewriter(True)) == {t: v for t, v in rows}


def test_pure_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import hydra.tags.rules, hydra.tags.implications\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
