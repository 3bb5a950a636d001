"""Caption rewriting (aliases, category prefixes, underscores, prompt escaping, the -p prefix, conflicts) and
the list files of the CLI (-A aliases, -X tag lists, -G groups). Runs without torch.

    venv/bin/python -m pytest tests/test_rewrite.py -q
"""

from __future__ import annotations

import random

import pytest

from hydra.tags.modes import ExclusiveGroup
from hydra.tags.rewrite import (
    JTP3_ESCAPES,
    PROMPT_ESCAPES,
    Rewriter,
    collect_aliases,
    collect_groups,
    collect_tags,
    read_aliases,
    read_groups,
    read_tag_list,
    strip_comment,
)
from hydra.tags.rules import caption_tag

LABELS = ["male_anthro", "canis_(genus)", "16:9", "artist_x", "solo", "vulva"]
CATS = ["general", "species", "meta", "artist", "general", "general"]


def rw(**kw) -> Rewriter:
    return Rewriter(LABELS, CATS, **kw)


# ---------------------------------------------------------------------------------------------------
# Spelling


def test_default_spelling_spaces_no_escapes():
    r = rw()
    assert [r.name(t) for t in LABELS] == ["male anthro", "canis (genus)", "16:9", "artist x", "solo", "vulva"]
    assert r.separator == ", "


def test_underscores_kept_and_separator_becomes_a_space():
    r = rw(underscores=True)
    assert r.name("male_anthro") == "male_anthro" and r.separator == " "
    assert r.caption(["male_anthro", "solo"]) == "male_anthro solo"


def test_prompt_escaping():
    r = rw(escape=PROMPT_ESCAPES)
    assert r.name("canis_(genus)") == "canis \\(genus\\)" and r.name("16:9") == "16\\:9"


def test_alias_then_prefix_then_translation_over_the_whole_string():
    r = rw(aliases={"artist_x": "x_(artist)", "solo": "alone"}, category_prefixes={"artist": "by_", "meta": "m:"},
           escape=PROMPT_ESCAPES)
    assert r.name("artist_x") == "by x \\(artist\\)"  # the prefix is prepended and translated too
    assert r.name("16:9") == "m\\:16\\:9"
    assert r.name("solo") == "alone"
    assert r.name("male_anthro") == "male anthro"  # no prefix for general


def test_alias_is_applied_once_not_chained():
    r = rw(aliases={"solo": "single", "single": "one"})
    assert r.name("solo") == "single"


def test_tags_that_are_not_labels_get_alias_and_translation_only():
    r = rw(aliases={"new_tag": "brand_new"}, category_prefixes={"general": "g "})
    assert r.name("new_tag") == "brand new" and r.name("other_tag") == "other tag"


def test_conflicting_rewritten_tags():
    with pytest.raises(ValueError, match=r"Conflicting rewritten tags: 'solo' and 'vulva' -> 'solo'"):
        rw(aliases={"vulva": "solo"})
    with pytest.raises(ValueError, match="Conflicting rewritten tags"):
        Rewriter(["a_b", "a b"], ["general", "general"])
    rw(aliases={"vulva": "solo", "solo": "alone"})  # a swap-like rename is fine
    Rewriter(["a_b", "a b"], ["general", "general"], underscores=True)


def test_jtp3_spelling_is_reproducible():
    """JTP-3 captions: spaces for underscores, escaped parentheses, ", " (vulva -> pussy is applied beforehand)."""
    r = Rewriter(LABELS, CATS, escape=JTP3_ESCAPES)
    assert all(r.name(t) == caption_tag(t) for t in LABELS)


# ---------------------------------------------------------------------------------------------------
# Captions and the -p prefix


def test_caption_in_given_order():
    assert rw().caption(["solo", "male_anthro", "16:9"]) == "solo, male anthro, 16:9"
    assert rw().caption([]) == ""


@pytest.mark.parametrize("text, items", [
    ("masterpiece", ["masterpiece"]),
    ("a, b", ["a", "b"]),
    ("a ,b,  c", ["a", "b", "c"]),
    ("a\tb\nc", ["a", "b", "c"]),
    ("  a ,, b  ", ["a", "b"]),
    ("best quality, male anthro", ["best quality", "male anthro"]),
    ("", []),
])
def test_split_prefix(text, items):
    assert rw().split_prefix(text) == items


def test_split_prefix_with_underscores_splits_on_whitespace():
    assert rw(underscores=True).split_prefix(" a b\tc\n d,e ") == ["a", "b", "c", "d,e"]


def test_split_prefix_follows_a_custom_separator():
    r = rw(separator=" | ")
    assert r.split_prefix("a | b|c, d") == ["a", "b", "c, d"]


def test_prefix_goes_first_and_is_not_repeated():
    r = rw()
    assert r.caption(["solo", "male_anthro", "16:9"], "male anthro, best") == "male anthro, best, solo, 16:9"
    # compared on rewritten names: the underscore spelling does not match
    assert r.caption(["male_anthro"], "male_anthro") == "male_anthro, male anthro"
    assert r.caption(["solo"], ["x", "solo"]) == "x, solo"


def test_shuffle_keeps_prefix_first_and_is_a_permutation():
    r = rw()
    tags = ["solo", "male_anthro", "16:9", "artist_x", "vulva"]
    out = r.caption(tags, "first", shuffle=True, rng=random.Random(3)).split(", ")
    assert out[0] == "first" and sorted(out[1:]) == sorted(map(r.name, tags))
    seen = {r.caption(tags, shuffle=True, rng=random.Random(s)) for s in range(20)}
    assert len(seen) > 1


# ---------------------------------------------------------------------------------------------------
# List files


@pytest.mark.parametrize("line, kept", [
    ("# a comment", ""),
    ("a b # comment", "a b"),
    ("a b\t# comment", "a b"),
    ("a#b c", "a#b c"),
    ("#", ""),
    ("  # indented", " "),
    ("a ##b", "a"),
    ("c#", "c#"),
])
def test_strip_comment(line, kept):
    assert strip_comment(line).rstrip() == kept.rstrip()


def test_read_aliases(tmp_path):
    f = tmp_path / "aliases.txt"
    f.write_text("# aliases\nvulva pussy\n\n  canis_(genus) canis # the genus\r\nx#y z\nvulva vagina\n",
                 encoding="utf-8")
    assert read_aliases(f) == {"vulva": "vagina", "canis_(genus)": "canis", "x#y": "z"}


@pytest.mark.parametrize("line", ["one", "a b c", "a b c # comment"])
def test_read_aliases_rejects_other_field_counts(tmp_path, line):
    f = tmp_path / "bad.txt"
    f.write_text(f"a b\n# comment\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Invalid alias on line 3 of .*bad\.txt"):
        read_aliases(f)


def test_read_tag_list(tmp_path):
    f = tmp_path / "tags.txt"
    f.write_text("\ufeffsolo duo\n# comment\n\tmale  female # trailing\n16:9\n", encoding="utf-8")
    assert read_tag_list(f) == ["solo", "duo", "male", "female", "16:9"]


def test_read_groups(tmp_path):
    f = tmp_path / "groups.txt"
    f.write_text("# groups\nanthro: male female\n\n!duo solo: a b a # comment\n", encoding="utf-8")
    assert read_groups(f) == [ExclusiveGroup(("anthro",), (), ("male", "female")),
                              ExclusiveGroup(("solo",), ("duo",), ("a", "b"))]
    f.write_text("a b\nanthro: male\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"groups\.txt: line 2: exclusive group 'anthro: male' needs at least 2"):
        read_groups(f)


def test_collectors(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("solo alone\nduo pair\n", encoding="utf-8")
    assert collect_aliases([("solo", "single")], [a]) == {"solo": "single", "duo": "pair"}
    x = tmp_path / "x.txt"
    x.write_text("duo solo\n", encoding="utf-8")
    assert collect_tags(["solo"], [x]) == ["solo", "duo"]
    g = tmp_path / "g.txt"
    g.write_text("c d\n", encoding="utf-8")
    assert collect_groups([["a", "b"]], [g]) == [ExclusiveGroup((), (), ("a", "b")), ExclusiveGroup((), (), ("c", "d"))]
