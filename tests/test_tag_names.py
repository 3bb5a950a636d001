"""The one tag-name rule (hydra/tags/names.py) and its four callers: the trainer's TAG check
(hydra/train/features.py), build_extension.py's TAG / -i / -I check, and the v1 and v2 extension readers.

They must agree, so that a tag that can be trained can be built, and a file we build loads in our readers
and in upstream's (which split implications and Hydra 3.5's label rows on whitespace). The rule is
torch-free; the reader checks write tiny extension files.

    venv/bin/python -m pytest tests/test_tag_names.py -q
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from conftest import ROOT
from hypothesis import given
from hypothesis import strategies as st

import build_extension
from hydra.tags.names import RULE, check_tag_name, tag_name_problem

ACCEPTED = ["my_tag_(custom)", "pokémon_(species)", "16:9", "3d_(artwork)", ":3", "<3", "?", "a/b", "v1.2", ".hidden",
            "ケモノ", "tag😀", "x" * 300]
REFUSED = {  # name: the reason the message gives
    "": "it is empty",
    "my tag": "it contains a space",
    " lead": "it contains a space",
    "a\\b": "it contains a backslash",
    "a\tb": "it contains a tab",
    "a\nb": "it contains a line break",
    "trail\r\n": "it contains a line break",
    "a\xa0b": "it contains whitespace U+00A0",  # no-break space: str.split() splits on it
    "a\u3000b": "it contains whitespace U+3000",
    "a\x1fb": "it contains whitespace U+001F",  # str.split() treats the ASCII separators as whitespace too
    "a\x00b": "it contains the control character U+0000",
    "a\x7fb": "it contains the control character U+007F",
}


# -- the rule ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ACCEPTED)
def test_accepted_names_come_back_unchanged(tag):
    assert tag_name_problem(tag) is None
    assert check_tag_name(tag, "TAG") == tag


@pytest.mark.parametrize("tag", REFUSED)
def test_refused_names_get_one_line_naming_the_tag_and_the_reason(tag):
    with pytest.raises(ValueError) as info:
        check_tag_name(tag, "TAG")
    message = str(info.value)
    assert message.startswith(f"TAG {tag!r}: {REFUSED[tag]} ({RULE}")
    assert "\n" not in message and "\r" not in message


def test_a_space_is_answered_with_the_underscore_spelling():
    with pytest.raises(ValueError, match=r"e621 spelling: 'my_tag_\(custom\)'"):
        check_tag_name("my tag (custom)", "TAG")


def test_a_lone_surrogate_from_an_undecodable_argument_is_refused():
    tag = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over a Latin-1 argv
    assert tag_name_problem(tag) == "it contains U+DCE9, a lone surrogate (undecodable text)"


@given(st.text(max_size=12))
def test_an_accepted_name_survives_upstreams_splitting(tag):
    """Upstream joins implications with spaces and JTP-3 labels with line breaks, and splits them again."""
    if tag_name_problem(tag) is None:
        assert " ".join(["a", tag, "b"]).split() == ["a", tag, "b"]
        assert "\n".join(["a", tag]).split("\n") == ["a", tag]
        tag.encode("utf-8")  # it can be written into a file's metadata
    else:
        assert not tag or any(c.isspace() or c == "\\" or not c.isprintable() for c in tag)


def test_the_rule_needs_no_torch():
    code = "import sys; sys.modules['torch'] = None; import hydra.tags.names"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# -- its callers agree -------------------------------------------------------------------------------------


def _builder(tag: str, where: str = "TAG") -> str | None:
    """build_extension.py's argument check on `tag` as TAG, -i or -I: None, or the error message."""
    args = argparse.Namespace(tag="ok", implies=[], implied_by=[], file_name="out")
    if where == "TAG":
        args.tag = tag
    else:
        (args.implies if where == "-i" else args.implied_by).append(tag)
    try:
        build_extension.check_args(args)
    except ValueError as e:
        return str(e)
    return None


def _trainer(tag: str) -> str | None:
    from hydra.train import features

    try:
        features.check_tag(tag)
    except ValueError as e:
        return str(e)
    return None


def _readers(tmp_path, tag: str) -> tuple[str | None, str | None]:
    """A v1 and a v2 file labelled `tag`, read back: None each, or the reader's error message."""
    from hydra.models.checkpoint import load_tensors, save_safetensors
    from hydra.models.extensions import ExtensionError, read_extension
    from hydra.models.extensions_v2 import read_extension_v2
    from hydra.testing.hydra35 import write_hydra35_extension
    from hydra.testing.jtp3 import write_extension

    results = []
    for write, read in ((write_extension, read_extension), (write_hydra35_extension, read_extension_v2)):
        path = write(tmp_path / f"{read.__name__}.safetensors", "placeholder")
        tensors, meta = load_tensors(path)  # then any label, even one the writers refuse (empty)
        save_safetensors(path, tensors, {**meta, "classifier.label": tag})
        try:
            assert read(path).label == tag
            results.append(None)
        except ExtensionError as e:
            assert str(e).startswith(f"{path}: metadata classifier.label ")
            results.append(str(e).removeprefix(f"{path}: metadata classifier.label "))
    return results[0], results[1]


@pytest.mark.parametrize("tag", [*ACCEPTED, *REFUSED])
def test_builder_and_both_readers_give_the_same_answer(tmp_path, tag):
    for where in ("TAG", "-i", "-I"):
        message = _builder(tag, where)
        if tag in ACCEPTED:
            assert message is None
        else:
            assert message.startswith(f"{where} {tag!r}: {REFUSED[tag]} ({RULE}")
    v1, v2 = _readers(tmp_path, tag)
    builder = _builder(tag)
    assert v1 == v2 == (None if builder is None else builder.removeprefix("TAG "))


@pytest.mark.parametrize("tag", [*ACCEPTED, *REFUSED])
def test_the_trainer_refuses_what_the_builder_refuses_with_its_message(tag):
    """The trainer reads spaces as underscores (its folder does, upstream's too); the rest is the builder's rule."""
    if " " in tag:
        assert _trainer(tag) == _builder(tag.replace(" ", "_"))
    else:
        assert _trainer(tag) == _builder(tag)


def test_the_trainer_trains_the_underscore_spelling(tmp_path):
    from hydra.train import features

    assert features.check_tag("my tag (custom)") == "my_tag_(custom)"
    (tmp_path / "my_tag_(custom)" / "positive").mkdir(parents=True)
    (tmp_path / "my_tag_(custom)" / "negative").mkdir()
    assert features.Workspace.for_tag(tmp_path, "my tag (custom)").root == str(tmp_path / "my_tag_(custom)")
    assert _builder(features.check_tag("my tag (custom)")) is None
