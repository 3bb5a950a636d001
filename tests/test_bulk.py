"""Which files a bulk run takes, where captions go, and the summary line.

    venv/bin/python -m pytest tests/test_bulk.py -q
"""

from __future__ import annotations

import os

import pytest

from hydra.bulk.run import Summary, caption_path, iter_images


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


def test_a_csv_with_a_failed_write_is_not_committed(tmp_path, capsys):
    import errno

    import numpy as np

    from hydra.bulk.run import CsvSink

    sink = CsvSink(str(tmp_path / "p.csv"), ["a", "b"])
    sink.write("one.png", np.array([0.1, 0.2], np.float32))

    class Full:
        def writerow(self, row):
            raise OSError(errno.ENOSPC, "No space left on device")

    sink._csv = Full()  # the disk fills up in the middle of the run
    with pytest.raises(OSError):
        sink.write("two.png", np.array([0.3, 0.4], np.float32))
    sink.close(ok=True)  # the run itself finished: the file must still not appear, half written
    assert os.listdir(tmp_path) == [] and "p.csv was not written" in capsys.readouterr().err
