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


def test_a_full_disk_leaves_no_backup_and_no_temporary(file, capsys, monkeypatch):
    import errno
    import shutil

    original = file.read_bytes()
    copy = shutil.copyfileobj

    def fill_up(src, dst, *a):  # half the backup is written, then the disk is full
        dst.write(src.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", fill_up)
    code, _, err = run(capsys, file, "classifier.label=x")
    assert code == 2 and "No space left on device" in err
    assert file.read_bytes() == original and os.listdir(file.parent) == ["ext.safetensors"]  # no empty .bak
    monkeypatch.setattr(shutil, "copyfileobj", copy)
    import hydra.models.checkpoint as checkpoint

    def save_fails(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_safetensors", save_fails)
    monkeypatch.setattr(edit_metadata, "save_safetensors", save_fails)
    code, _, err = run(capsys, file, "classifier.label=x")  # the backup was made, the save failed
    assert code == 2 and file.read_bytes() == original and os.listdir(file.parent) == ["ext.safetensors"]


def test_output_onto_file_itself_or_a_folder_is_refused(file, tmp_path, capsys):
    original = file.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(file)
    for target in (file, link):
        code, _, err = run(capsys, "-o", target, file, "classifier.label=x")
        assert code == 2 and "is FILE itself" in err  # it would have replaced FILE with no backup
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "-o", tmp_path / "out", file, "classifier.label=x")
    assert code == 2 and "is a folder, not a file" in err and len(err.strip().splitlines()) == 2  # a note, then the error
    code, _, err = run(capsys, file, "classifier.label=x")
    assert file.read_bytes() != original
    assert sorted(os.listdir(tmp_path)) == ["ext.safetensors", "ext.safetensors.bak", "link.safetensors", "out"]
    assert os.listdir(tmp_path / "out") == []


def test_output_gets_a_normal_files_mode(file, tmp_path, capsys):
    umask = os.umask(0o022)
    try:
        assert run(capsys, "-o", tmp_path / "new.safetensors", file, "a=b")[0] == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o644  # not 0600
