"""Tests for edit_metadata.py, the safetensors metadata editor.

Covers: printing (sorted `repr(key): repr(value)` lines); setting and deleting keys; tensors copied
unchanged; backups FILE.bak, FILE.1.bak, ... and -B; -o writing elsewhere (no backup, FILE untouched);
the file mode kept; errors for a missing '=', an empty key, -o without changes and unreadable files.

Run: venv/bin/python -m pytest tests/test_edit_metadata.py -q
"""

import os
import stat

import pytest
import torch

import edit_metadata
from hydra.models.checkpoint import load_tensors, save_safetensors

META = {"classifier.label": "red_square", "modelspec.author": "Me", "b": "it's \"quoted\"\nand two lines"}


@pytest.fixture
def file(tmp_path):
    path = tmp_path / "ext.safetensors"
    tensors = {"q": torch.randn(2, 1, 4).to(torch.bfloat16), "validation": torch.arange(8, dtype=torch.int32)}
    save_safetensors(path, tensors, META)
    os.chmod(path, 0o644)
    return path


def run(capsys, *argv):
    code = edit_metadata.main(edit_metadata.build_parser().parse_args([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def test_print_lists_every_key_sorted_as_repr(file, capsys):
    code, out, _ = run(capsys, file)
    assert code == 0
    assert out.splitlines() == [f"{k!r}: {v!r}" for k, v in sorted(META.items())]


def test_set_and_delete_keep_tensors_and_make_a_backup(file, capsys):
    before, _ = load_tensors(file)
    original = file.read_bytes()
    code, _, err = run(capsys, file, "classifier.label=crimson_box", "modelspec.author=", "new.key=a=b")
    assert code == 0, err
    tensors, meta = load_tensors(file)
    assert meta == {"classifier.label": "crimson_box", "b": META["b"], "new.key": "a=b"}
    assert set(tensors) == set(before) and all(torch.equal(tensors[k], before[k]) for k in before)
    assert (file.parent / "ext.safetensors.bak").read_bytes() == original
    assert stat.S_IMODE(os.stat(file).st_mode) == 0o644  # not the temporary file's private 0600
    assert "Delete 'modelspec.author'" in err and "Set 'classifier.label': 'crimson_box'" in err


def test_backups_take_the_first_free_name_and_b_skips_them(file, capsys):
    for value in ("1", "2", "3"):
        assert run(capsys, file, f"k={value}")[0] == 0
    names = sorted(p.name for p in file.parent.iterdir())
    assert names == ["ext.safetensors", "ext.safetensors.1.bak", "ext.safetensors.2.bak", "ext.safetensors.bak"]
    assert load_tensors(file.parent / "ext.safetensors.2.bak")[1]["k"] == "2"
    assert run(capsys, "-B", file, "k=4")[0] == 0
    assert len(list(file.parent.iterdir())) == 4 and load_tensors(file)[1]["k"] == "4"


def test_output_elsewhere_leaves_the_file_alone(file, tmp_path, capsys):
    original = file.read_bytes()
    assert run(capsys, "-o", tmp_path / "copy.safetensors", file, "classifier.label=x")[0] == 0
    assert file.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.safetensors", "ext.safetensors"]
    assert load_tensors(tmp_path / "copy.safetensors")[1]["classifier.label"] == "x"


def test_deleting_a_missing_key_is_a_note_not_an_error(file, capsys):
    code, _, err = run(capsys, "-B", file, "nope=")
    assert code == 0 and "nothing to delete" in err and load_tensors(file)[1] == META


@pytest.mark.parametrize("options, edits, message", [
    ([], ["a=b", "classifier.label"], "expected KEY=VALUE"),
    ([], ["=value"], "the key is empty"),
    (["-o", "out.safetensors"], [], "needs at least one"),
])
def test_bad_arguments_are_errors(file, capsys, options, edits, message):
    original = file.read_bytes()
    code, _, err = run(capsys, *options, file, *edits)
    assert code == 2 and message in err
    assert file.read_bytes() == original and len(list(file.parent.iterdir())) == 1


def test_unreadable_files_are_errors(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert run(capsys, bad)[0] == 2
    assert run(capsys, bad, "a=b")[0] == 2
    assert run(capsys, tmp_path / "missing.safetensors")[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
