"""Which files a bulk run takes, where captions go, and the summary line.

    venv/bin/python -m pytest tests/test_bulk.py -q
"""

from __future__ import annotations

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
