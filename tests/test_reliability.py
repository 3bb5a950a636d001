"""Reliability and data safety: a generated corpus of awkward and broken files through inference.py (with
in-process loading and with workers), the pixel limit, existing captions (overwrite / skip / append, old
encodings), a run killed midway, and property tests for the CSV parsers.

    venv/bin/python -m pytest tests/test_reliability.py -q
"""

from __future__ import annotations

import io
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from conftest import ROOT, noise_image
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hydra.tags.rules import DataFileError, load_metadata

SCRIPT = str(ROOT / "inference.py")


def cli(*args, check_rc=None, **kw):
    proc = subprocess.run([sys.executable, SCRIPT, *map(os.fsdecode, args)], capture_output=True, text=True,
                          timeout=600, **kw)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def popen_as_foreground_job(cmd, **kw) -> subprocess.Popen:
    """Popen with SIGINT at its default, as in a terminal's foreground job, whatever this process inherited.

    A suite started in the background (`cmd &` in a script, nohup, some CI runners) inherits SIGINT ignored,
    and a child started so keeps ignoring it: Python then installs no KeyboardInterrupt handler, so a "Ctrl-C"
    sent by a test is lost and the run finishes (the old flake of the Ctrl-C tests here and in test_ray.py).
    """
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # becomes SIG_DFL in the exec'd child
    try:
        return subprocess.Popen(cmd, **kw)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size (a decompression bomb's header) with no pixel data to speak of."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def ycck_jpeg(rgb: Image.Image) -> bytes:
    """A JPEG marked YCCK (Adobe transform 2): Pillow writes CMYK, the marker byte is switched."""
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    data[data.find(b"Adobe") + 11] = 2
    return bytes(data)


def make_corpus(folder) -> tuple[list[bytes], dict[bytes, str]]:
    """Files that must be tagged, and broken ones with a word their error line must contain.

    Names are bytes so that one can be invalid UTF-8."""
    f = os.fsencode(folder)
    os.makedirs(f, exist_ok=True)
    good: list[bytes] = []
    base = noise_image(96, 64, seed=7)

    def save(name: bytes, img=None, data: bytes | None = None, **kw):
        path = os.path.join(f, name)
        if data is not None:
            with open(path, "wb") as out:
                out.write(data)
        else:
            img.save(os.fsdecode(path), **kw)
        good.append(name)

    save(b"cmyk.jpg", base.convert("CMYK"))
    save(b"ycck.jpg", data=ycck_jpeg(base))
    save(b"gray16.png", Image.fromarray((np.arange(64 * 96).reshape(64, 96) * 9).astype(np.uint16)))
    save(b"float.tiff", Image.fromarray(np.linspace(0, 300, 64 * 96, dtype=np.float32).reshape(64, 96)))
    pal = base.convert("P")
    pal.info["transparency"] = 0
    save(b"palette_transparent.png", pal, transparency=0)
    save(b"la.png", base.convert("LA"))
    save(b"one_bit.png", base.convert("1"))
    frames = [noise_image(40, 30, seed=i) for i in range(3)]
    save(b"anim.gif", frames[0], save_all=True, append_images=frames[1:])
    save(b"anim_webp.webp", frames[0], save_all=True, append_images=frames[1:])
    save(b"anim_apng.png", frames[0], save_all=True, append_images=frames[1:])
    save(b"pages.tiff", frames[0], save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 8
    save(b"rotated.jpg", base, exif=exif)
    from test_image import linear_rgb_profile

    save(b"icc.png", base, icc_profile=linear_rgb_profile())
    save(b"one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    save(b"wide.png", Image.new("RGB", (20000, 3), (1, 2, 3)))
    save(b"tall.png", Image.new("RGB", (2, 9000), (1, 2, 3)))
    png = io.BytesIO()
    base.save(png, "PNG")
    save(b"png_named.jpg", data=png.getvalue())
    save(b"UPPER.PNG", base)
    save(b"name with spaces.png", base)
    save("ünïcödé 画像.png".encode(), base)
    save(b"latin1_\xe9\xff.png", base)  # not valid UTF-8

    bad = {}

    def broken(name: bytes, data: bytes, word: str):
        with open(os.path.join(f, name), "wb") as out:
            out.write(data)
        bad[name] = word

    broken(b"empty.png", b"", "not an image")
    broken(b"truncated.jpg", ycck_jpeg(base)[:400], "truncated")
    broken(b"random.webp", np.random.default_rng(1).bytes(2000), "not an image")
    broken(b"text.png", b"hello, I am text\n" * 20, "not an image")
    broken(b"bomb.png", png_header_only(200_000, 200_000), "--max-pixels")
    os.symlink(os.path.join(f, b"nowhere.png"), os.path.join(f, b"dangling.png"))
    bad[b"dangling.png"] = "not found"
    os.mkfifo(os.path.join(f, b"pipe.png"))
    bad[b"pipe.png"] = "not a regular file"
    return good, bad


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corpus_every_good_file_tagged_every_bad_one_reported(small_model, tmp_path, workers):
    model, _ = small_model
    folder = tmp_path / "corpus"
    good, bad = make_corpus(folder)
    run = cli("-M", model, "-m", "", "-t", "-1", "-w", workers, folder, check_rc=1)
    f = os.fsencode(folder)
    for name in good:
        caption = os.path.join(f, os.path.splitext(name)[0] + b".txt")
        assert os.path.exists(caption), (name, run.stderr)
        assert open(caption, encoding="utf-8").read().count(",") >= 1
    for name, word in bad.items():
        shown = f"'{os.fsdecode(os.path.join(f, name))}': "
        lines = [line for line in run.stderr.splitlines() if shown.encode("utf-8", "backslashreplace").decode()
                 in line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") or shown in line]
        assert len(lines) == 1 and word in lines[0], (name, run.stderr)
        assert not os.path.exists(os.path.join(f, os.path.splitext(name)[0] + b".txt"))
    assert f"Tagged {len(good)} images, {len(bad)} failed." in run.stderr
    assert "Traceback" not in run.stderr


def test_csv_keeps_non_utf8_names_as_bytes(small_model, tmp_path):
    model, _ = small_model
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    noise_image(32, 32).save(os.fsdecode(name))
    out = subprocess.run([sys.executable, SCRIPT, "-M", model, "-m", "", "-w", "0", "-o", "-", os.fsdecode(name)],
                         capture_output=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith(name + b",")
    subprocess.run([sys.executable, SCRIPT, "-M", model, "-m", "", "-w", "0", "-o", tmp_path / "p.csv",
                    os.fsdecode(name)], check=True, capture_output=True, timeout=300)
    assert (tmp_path / "p.csv").read_bytes().splitlines()[1].startswith(name + b",")


def test_pixel_limit_is_configurable(small_model, tmp_path):
    model, _ = small_model
    noise_image(64, 64).save(tmp_path / "a.png")
    run = cli("-M", model, "-m", "", "-w", "0", "--max-pixels", "1K", tmp_path / "a.png", check_rc=1)
    assert "64x64" in run.stderr and "--max-pixels" in run.stderr
    cli("-M", model, "-m", "", "-w", "0", "--max-pixels", "0", tmp_path / "a.png", check_rc=0)


def test_symlink_loop_with_recursion_ends(small_model, tmp_path):
    model, _ = small_model
    (tmp_path / "d").mkdir()
    noise_image(32, 32).save(tmp_path / "d" / "a.png")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    run = cli("-M", model, "-m", "", "-w", "0", "-r", tmp_path, check_rc=0)
    assert "Tagged 1 image, 0 failed." in run.stderr


def test_existing_captions_skip_append_and_encodings(small_model, tmp_path):
    model, names = small_model
    for n in "abc":
        noise_image(48, 48, seed=ord(n)).save(tmp_path / f"{n}.png")
    (tmp_path / "a.txt").write_text("keep me", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("\ufeffcafé, tag_03, Tag 01".encode())  # UTF-8 with BOM
    (tmp_path / "c.txt").write_bytes("naïve, tag 05".encode("cp1252"))  # a legacy encoding
    run = cli("-M", model, "-m", "", "-w", "0", "-t", "-1", "--existing", "skip", tmp_path, check_rc=0)
    assert "Tagged 0 images, 3 skipped, 0 failed." in run.stderr
    assert (tmp_path / "a.txt").read_text() == "keep me"
    cli("-M", model, "-m", "", "-w", "0", "-t", "-1", "--existing", "append", tmp_path, check_rc=0)
    a = (tmp_path / "a.txt").read_text(encoding="utf-8").split(", ")
    assert a[0] == "keep me" and sorted(a[1:]) == sorted(n.replace("_", " ") for n in names)
    b = (tmp_path / "b.txt").read_bytes().decode("utf-8")  # rewritten as UTF-8 without BOM
    assert b.startswith("café, tag_03, Tag 01, ") and "tag 03" not in b and "tag 01" not in b
    assert len(b.split(", ")) == 1 + len(names)
    c = (tmp_path / "c.txt").read_text(encoding="utf-8")
    assert c.startswith("naïve, tag 05, ") and c.count("tag 05") == 1
    cli("-M", model, "-m", "", "-w", "0", "-t", "0.99", tmp_path / "a.png", check_rc=0)  # overwrite (default)
    assert "keep me" not in (tmp_path / "a.txt").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_run_leaves_no_debris_and_skip_finishes_it(small_model, tmp_path, sig):
    model, _ = small_model
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        noise_image(400, 300, seed=i).save(folder / f"{i:03d}.png")
    cmd = [sys.executable, SCRIPT, "-M", model, "-m", "", "-t", "-0.5", "-w", "2", "-o", str(tmp_path / "all.csv"),
           str(folder)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)  # a complete CSV run, for comparison
    proc = popen_as_foreground_job(cmd[:-3] + [str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(list(folder.glob("*.txt"))) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    # Work is in progress (5 captions) and plenty remains (35 images at ~0.25 s each on 2 busy cores).
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode(errors="replace")[-2000:]  # "Interrupted." (both signals)
    written = sorted(folder.glob("*.txt"))
    assert 5 <= len(written) < 40, "the run was not stopped midway"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files
    assert not list(tmp_path.glob(".*"))
    for p in written:
        assert p.read_text(encoding="utf-8")  # complete, not truncated to nothing
    run = cli(*cmd[2:-3], "--existing", "skip", folder, check_rc=0)
    assert f"Tagged {40 - len(written)} images, {len(written)} skipped, 0 failed." in run.stderr
    assert len(list(folder.glob("*.txt"))) == 40


def test_bad_model_metadata_is_one_clear_error(tmp_path):
    from hydra.models.checkpoint import CheckpointError
    from hydra.models.jtp3_net import load_jtp3
    from hydra.testing.jtp3 import write_model

    write_model(tmp_path / "m.safetensors", ["a", "b", "a"])
    with pytest.raises(CheckpointError, match=r"repeated tags \['a'\]"):
        load_jtp3(tmp_path / "m.safetensors")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="abcxyz_()", min_size=1, max_size=8), st.integers(-1, 8),
                          st.lists(st.text(alphabet="abcxyz_", min_size=1, max_size=5), max_size=3)),
                max_size=10, unique_by=lambda r: r[0]))
def test_metadata_csv_round_trip(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("meta") / "m.csv"
    path.write_text("tag,category,implications\n" + "".join(f"{t},{c},{' '.join(i)}\n" for t, c, i in rows),
                    encoding="utf-8")
    meta = load_metadata(path, lambda t: t)
    assert meta.category == {t: c for t, c, _ in rows}
    assert meta.implies == {t: tuple(i) for t, _, i in rows}


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.integers(2, 6))
def test_metadata_csv_errors_always_name_a_line(tmp_path_factory, junk, line):
    path = tmp_path_factory.mktemp("bad") / "m.csv"
    rows = ["a,0,"] * (line - 2) + [f"b,{junk!r}x,"]
    path.write_text("tag,category,implications\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"m\.csv: line \d+: "):
        load_metadata(path)


def test_an_input_is_never_overwritten(small_model, tmp_path):
    model, _ = small_model
    pic = tmp_path / "pic.txt"  # an image whose caption name is its own name
    noise_image(64, 48).save(pic, format="PNG")
    other = tmp_path / "other.png"
    noise_image(48, 64, seed=1).save(other)
    before = pic.read_bytes(), other.read_bytes()
    proc = cli("-M", model, "-w", "0", pic, other)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"'{pic}': cannot write output (its caption would replace the image itself" in proc.stderr
    assert (tmp_path / "other.txt").exists() and pic.read_bytes() == before[0]
    proc = cli("-M", model, "-w", "0", "-o", other, pic, other)  # -o naming one of the images
    assert proc.returncode == 2 and "that file is one of the images to tag" in proc.stderr
    assert other.read_bytes() == before[1] and sorted(os.listdir(tmp_path)) == ["other.png", "other.txt", "pic.txt"]


def test_outputs_follow_symlinks_and_write_fifos_in_place(small_model, tmp_path):
    model, _ = small_model
    noise_image(64, 48).save(tmp_path / "a.png")
    kept = tmp_path / "captions" / "a.txt"
    kept.parent.mkdir()
    kept.write_text("old")
    (tmp_path / "a.txt").symlink_to(kept)
    cli("-M", model, "-w", "0", "-t", "-1", tmp_path / "a.png", check_rc=0)
    assert (tmp_path / "a.txt").is_symlink() and kept.read_text() not in ("", "old")
    fifo = tmp_path / "probs.csv"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, SCRIPT, "-M", model, "-w", "0", "-o", str(fifo), str(tmp_path / "a.png")],
                            stderr=subprocess.PIPE, text=True)
    got = []  # the read blocks until the run opens the FIFO for writing, and ends when it closes it
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    reader.join(30)
    rows = got[0].splitlines()
    assert rows[0].startswith("filename,") and rows[1].startswith(str(tmp_path / "a.png"))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_closed_stdout_ends_the_run_quietly(small_model, tmp_path):
    model, _ = small_model
    for i in range(30):
        noise_image(32, 32, seed=i).save(tmp_path / f"{i:02d}.png")
    proc = subprocess.Popen([sys.executable, SCRIPT, "-M", model, "-m", "", "-w", "0", "-o", "-", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err.decode()[-2000:]
    assert b"Broken pipe" not in err and b"Traceback" not in err and b"Tagged" not in err


def test_same_name_images_get_one_deterministic_caption(small_model, tmp_path):
    model, _ = small_model
    noise_image(48, 48, seed=1).save(tmp_path / "a.jpg")
    noise_image(48, 48, seed=2).save(tmp_path / "a.png")
    run = cli("-M", model, "-m", "", "-w", "0", "-t", "-1", tmp_path / "a.png", tmp_path / "a.jpg", check_rc=1)
    assert f"'{tmp_path / 'a.png'}': cannot write output (same caption file '{tmp_path / 'a.txt'}' as " \
           f"'{tmp_path / 'a.jpg'}'" in run.stderr
    assert "Tagged 1 image, 1 failed." in run.stderr and "Traceback" not in run.stderr
    assert sorted(os.listdir(tmp_path)) == ["a.jpg", "a.png", "a.txt"]
