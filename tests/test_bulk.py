"""Which files a bulk run takes, where captions go, and the summary line.

    venv/bin/python -m pytest tests/test_bulk.py -q
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
import threading

import numpy as np
import pytest

from hydra import common
from hydra.bulk.run import (
    MAX_CAPTION_BYTES,
    CsvSink,
    OutputError,
    PrintSink,
    Summary,
    caption_conflicts,
    caption_path,
    iter_images,
    json_text,
    read_caption,
    run_bulk,
)


def test_folder_scan_rules(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.webp", "d.txt", "e.csv", "f.json", "g.py", "h.safetensors", ".dot.png",
                 "i.mp4", "j.JPEG", "name with spaces.gif", "ünïcode.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "k.png").write_bytes(b"")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "l.png").write_bytes(b"")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "m.png").write_bytes(b"")
    names = [p.removeprefix(str(tmp_path) + "/") for p in iter_images([str(tmp_path)])]
    assert names == ["a.jpg", "b.PNG", "c.webp", "j.JPEG", "name with spaces.gif", "ünïcode.png"]
    deep = [p.removeprefix(str(tmp_path) + "/") for p in iter_images([str(tmp_path)], recursive=True)]
    assert deep == names[:5] + ["sub/k.png"] + names[5:]  # one sorted listing, folders entered in place
    # an explicit file is always attempted, whatever its name
    assert list(iter_images([str(tmp_path / "d.txt")])) == [str(tmp_path / "d.txt")]


def test_caption_path_replaces_the_extension():
    assert caption_path("x/y.z/img.final.PNG") == "x/y.z/img.final.txt"
    assert caption_path("noext") == "noext.txt"


def test_summary_line():
    assert Summary(tagged=1).line() == "Tagged 1 image, 0 failed."
    assert Summary(tagged=3, failed=2, skipped=4).line() == "Tagged 3 images, 4 skipped, 2 failed."


class FakeTagger:
    """What run_bulk needs of a Tagger, without a model: every file is a "sample", every tag p = 0.5."""

    def __init__(self, tags: int = 2):
        self.tags, self.calls = tags, 0

    @staticmethod
    def preprocess(path):
        return {"x": np.zeros(1)}

    @staticmethod
    def sample_tokens(sample):
        return 1

    def predict_samples(self, samples, needed):
        self.calls += 1
        return np.full((len(samples), self.tags), 0.5, np.float32)


class FlakyFile:
    """A file object whose writes fail from the `fail_at`-th call on (a disk that fills up during the run), or only
    at that call (a transient error); `close` may fail too (the buffered rest reaches the disk only there)."""

    def __init__(self, f, fail_at=None, once=False, close_fails=False):
        self.f, self.fail_at, self.once, self.close_fails, self.n = f, fail_at, once, close_fails, 0

    def write(self, text):
        self.n += 1
        if self.fail_at is not None and (self.n == self.fail_at or (not self.once and self.n > self.fail_at)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(text)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()
        if self.close_fails:
            raise OSError(errno.ENOSPC, "No space left on device")


def csv_sink_with(monkeypatch, target, **flaky):
    fdopen = os.fdopen
    monkeypatch.setattr(common.os, "fdopen", lambda *a, **kw: FlakyFile(fdopen(*a, **kw), **flaky))
    return CsvSink(str(target), ["a", "b"])


def images(folder, n):
    paths = []
    for i in range(n):
        (folder / f"{i:02d}.png").write_bytes(b"")
        paths.append(str(folder / f"{i:02d}.png"))
    return paths


def test_a_transient_csv_write_error_stops_the_run_and_commits_nothing(tmp_path, monkeypatch, capsys):
    paths = images(tmp_path, 6)
    sink = csv_sink_with(monkeypatch, tmp_path / "p.csv", fail_at=3, once=True)  # header, row 1, then a failure
    tagger = FakeTagger()
    summary = run_bulk(tagger, paths, sink, progress=False)
    err = capsys.readouterr().err
    assert tagger.calls == 2  # stopped at the failed row: no tagging for nothing
    assert summary.tagged == 0 and summary.failed == 6 and summary.stopped  # nothing was delivered
    assert "(the run stopped: its output could not be written)" in summary.line()
    assert f"error: cannot write '{tmp_path / 'p.csv'}' (No space left on device); the run stopped" in err
    assert not (tmp_path / "p.csv").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_a_csv_whose_close_fails_is_not_committed(tmp_path, monkeypatch, capsys):
    paths = images(tmp_path, 3)
    sink = csv_sink_with(monkeypatch, tmp_path / "p.csv", close_fails=True)
    summary = run_bulk(FakeTagger(), paths, sink, progress=False)  # no traceback: a summary
    assert (summary.tagged, summary.failed, summary.stopped) == (0, 3, True)
    assert "it was not written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)  # no CSV, no temporary


def test_a_failed_csv_row_write_never_commits(tmp_path, capsys):
    sink = CsvSink(str(tmp_path / "p.csv"), ["a", "b"])
    sink.write("one.png", np.array([0.1, 0.2], np.float32))

    class Full:
        def writerow(self, row):
            raise OSError(errno.ENOSPC, "No space left on device")

    sink._csv = Full()  # the disk fills up in the middle of the run
    with pytest.raises(OutputError, match="was not written") as e:
        sink.write("two.png", np.array([0.3, 0.4], np.float32))
    assert e.value.lost
    sink.close(ok=True)  # even if a caller went on: the file must not appear, half written
    assert os.listdir(tmp_path) == []


def test_stdout_broken_pipe_stops_the_run_at_once(tmp_path, monkeypatch):
    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Gone())
    tagger = FakeTagger()
    for sink in (CsvSink("-", ["a", "b"]), PrintSink("tags", FakeRules())):
        tagger.calls = 0
        with pytest.raises(BrokenPipeError):
            run_bulk(tagger, images(tmp_path, 5), sink, progress=False)
        assert tagger.calls == 1  # not one "Broken pipe" failure per image


class FakeRules:
    def active(self):
        return None

    def classify(self, probs):
        return {f"t{i}": float(p) for i, p in enumerate(probs)}


def test_json_output_is_valid_utf8_with_non_utf8_file_names():
    name = os.fsdecode(b"caf\xe9 \xff.png")  # surrogate escapes, as Python gives such names
    stream = io.StringIO()
    sink = PrintSink("json", FakeRules(), stream)
    sink.write(name, np.array([0.5]))
    sink.write("ünï.png", np.array([0.5]))
    sink.close(ok=True)
    text = stream.getvalue()
    text.encode("utf-8")  # strict: no lone surrogate reaches the stream (raw bytes \xe9 on a real stdout)
    data = json.loads(text)
    assert os.fsencode(data[0]["file"]) == b"caf\xe9 \xff.png" and data[1]["file"] == "ünï.png"
    assert "ünï.png" in text  # other text stays readable
    line = json_text({"file": name})
    line.encode("utf-8")
    assert json.loads(line)["file"] == name


def test_caption_conflicts_rules(tmp_path):
    a_png, a_jpg, b_png = (str(tmp_path / n) for n in ("a.png", "a.jpg", "b.png"))
    pic = str(tmp_path / "pic.txt")
    given = [a_png, b_png, a_jpg, pic, str(tmp_path / "c.png"), str(tmp_path / "c.txt")]
    for order in (given, given[::-1]):
        refused = caption_conflicts({p: caption_path(p) for p in order})
        # a.jpg sorts first and gets a.txt; c.txt (an image named .txt) would be its own caption
        assert set(refused) == {a_png, pic, str(tmp_path / "c.png"), str(tmp_path / "c.txt")}
        assert "would replace the image itself" in refused[pic]
        assert f"would replace the input image '{tmp_path / 'c.txt'}'" in refused[str(tmp_path / "c.png")]
        assert f"same caption file '{tmp_path / 'a.txt'}' as '{a_jpg}'" in refused[a_png]
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    one = {str(tmp_path / d / "x.png"): str(tmp_path / d / "x.txt") for d in ("real", "link")}
    assert caption_conflicts(one) == {}  # one image reached by two paths is one image
    other = {str(tmp_path / "x.png"): str(tmp_path / "link" / "y.txt"),
             str(tmp_path / "y.png"): str(tmp_path / "real" / "y.txt")}
    assert list(caption_conflicts(other)) == [str(tmp_path / "y.png")]  # the same file through a symlink


def test_read_caption_encodings(tmp_path):
    for data in ("\ufeffcafé, tag".encode(), "\ufeffcafé, tag".encode("utf-16-le"),
                 "\ufeffcafé, tag".encode("utf-16-be"), "café, tag".encode(), "café, tag".encode("cp1252")):
        (tmp_path / "c.txt").write_bytes(data)
        assert read_caption(str(tmp_path / "c.txt")) == "café, tag", data
    (tmp_path / "c.txt").write_bytes("café, tag".encode("utf-16-le"))  # no byte-order mark: NULs
    with pytest.raises(OSError, match="NUL bytes"):
        read_caption(str(tmp_path / "c.txt"))
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe" + "ab".encode("utf-16-le") + b"\x00")  # odd length
    with pytest.raises(OSError, match="not valid UTF-16-LE"):
        read_caption(str(tmp_path / "c.txt"))


def test_read_caption_reads_only_small_regular_files(tmp_path):
    fifo = tmp_path / "f.txt"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(_error(read_caption, str(fifo))), daemon=True)
    reader.start()
    reader.join(10)
    assert got and "a FIFO, not a regular file" in got[0]  # refused at once, no writer needed
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(MAX_CAPTION_BYTES + 1)  # sparse: like /dev/zero, more than any caption
    with pytest.raises(OSError, match="larger than 1024 KiB") as e:
        read_caption(str(big))
    assert e.value.filename == str(big)
    with pytest.raises(OSError, match="a folder, not a regular file"):
        read_caption(str(tmp_path))


def _error(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return str(e)
    return "no error"


def test_a_self_referencing_link_is_reported_and_the_scan_goes_on(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(b"")
    (tmp_path / "sub" / "self").symlink_to(tmp_path / "sub" / "self")
    errors = []
    found = list(iter_images([str(tmp_path)], recursive=True, errors=errors))
    assert found == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png")]
    assert errors == [str(tmp_path / "loop.png"), str(tmp_path / "sub" / "self")]
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'loop.png'}': skipped: cannot examine it (Too many levels of symbolic links)" in err
    errors = []
    assert list(iter_images([str(tmp_path)], errors=errors)) == [str(tmp_path / "a.png")]
    assert errors == [str(tmp_path / "loop.png")]  # without -r, a non-image entry is not even looked at
