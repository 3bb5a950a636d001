"""DINOv3 tagger vocabulary files: the real `tagger_vocab.json`, the category / alias variants, and the
one-line errors for broken files. No torch needed:

    venv/bin/python -m pytest tests/test_vocab.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra.models.vocab import E621_CATEGORY_NAMES, Vocab, load_vocab, parse_vocab

REAL_VOCAB = Path(__file__).resolve().parents[1] / "../shared/reference-data/tagger_vocab.json"


def _write(tmp_path: Path, data, name: str = "tagger_vocab.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.skipif(not REAL_VOCAB.exists(), reason=f"reference vocabulary not found at {REAL_VOCAB}")
def test_real_vocab():
    vocab = load_vocab(REAL_VOCAB)
    assert len(vocab) == 74_625
    assert vocab.tags[:3] == ["solo", "breasts", "anthro"]
    assert not any("_" in tag for tag in vocab.tags)  # spaces, never underscores (none of the 74,625 has one)
    assert vocab.categories is None and vocab.aliases is None
    assert vocab.category("solo") == -1


def test_categories_and_aliases(tmp_path):
    path = _write(tmp_path, {
        "idx2tag": ["solo", "canine", "hi res", "^ ^"],
        "tag2category": {"solo": 0, "canine": 5, "hi res": 7},
        "tag2alias": {"hi res": "highres"},
    }, "tagger_vocab_with_categories_and_alias_updated.json")
    vocab = load_vocab(path)
    assert vocab == Vocab(["solo", "canine", "hi res", "^ ^"], {"solo": 0, "canine": 5, "hi res": 7},
                          {"hi res": "highres"})
    assert [vocab.category(t) for t in vocab.tags] == [0, 5, 7, -1]  # absent -> unassigned
    assert E621_CATEGORY_NAMES[vocab.category("canine")] == "species"


def test_non_ascii_tags_round_trip(tmp_path):
    tags = ["pokémon (species)", "\\m/", "honkai: star rail"]
    assert load_vocab(_write(tmp_path, {"idx2tag": tags})).tags == tags


BROKEN = {
    "not_json": ("{'idx2tag': [", "not valid JSON"),
    "top_level_list": (["solo"], "expected a JSON object"),
    "no_idx2tag": ({"tags": ["solo"]}, "no 'idx2tag' list \\(keys: tags\\)"),
    "idx2tag_not_list": ({"idx2tag": {"0": "solo"}}, "'idx2tag' must be a list"),
    "empty": ({"idx2tag": []}, "'idx2tag' is empty"),
    "non_string": ({"idx2tag": ["solo", 3]}, "idx2tag\\[1\\] is int 3"),
    "empty_string": ({"idx2tag": ["solo", ""]}, "idx2tag\\[1\\] is an empty string"),
    "duplicate": ({"idx2tag": ["solo", "duo", "solo"]}, "duplicate tag 'solo' at idx2tag\\[0\\] and idx2tag\\[2\\]"),
    "categories_not_object": ({"idx2tag": ["solo"], "tag2category": [0]}, "'tag2category' must be a JSON object"),
    "category_not_int": ({"idx2tag": ["solo"], "tag2category": {"solo": "general"}},
                         "tag2category\\['solo'\\] is str 'general', expected int"),
    "category_bool": ({"idx2tag": ["solo"], "tag2category": {"solo": True}}, "tag2category\\['solo'\\] is bool"),
    "alias_not_str": ({"idx2tag": ["solo"], "tag2alias": {"solo": ["alone"]}}, "tag2alias\\['solo'\\] is list"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_files_name_file_and_problem(tmp_path, case):
    data, message = BROKEN[case]
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as info:
        load_vocab(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vocab(tmp_path / "nope.json")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(min_size=1), min_size=1, max_size=20, unique=True))
def test_any_unique_tag_list_parses_in_order(tags):
    assert parse_vocab(json.loads(json.dumps({"idx2tag": tags}))).tags == tags
