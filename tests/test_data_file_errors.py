"""User CSV files the csv module or the UTF-8 decoder cannot read (a field over the csv field limit, another
encoding) give one line naming the file and line, in the readers and from inference.py / calibrate.py (issue 15).

    venv/bin/python -m pytest tests/test_data_file_errors.py -q
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest
from conftest import ROOT, noise_image

import calibrate
from hydra.calibration.validation_csv import read_validation_csv
from hydra.tags.rules import DataFileError, load_calibration, load_metadata

BIG = "x" * (200 * 1024)  # over csv's default field limit (128 KiB)
assert len(BIG) > csv.field_size_limit()

CALIBRATION = "tag,threshold\na,0.5\nb,0.25\n"
METADATA = "tag,category,implications\na,0,\nb,0,a\n"
VALIDATION = "tag,threshold,tp,fp,tn,fn\na,0.5,1,2,3,4\nb,0.5,1,2,3,4\n"


def bad_files(tmp_path, good: str):
    """(path, expected message) for: a 200 KB field on line 3, latin-1 text, latin-1 in the header."""
    big = tmp_path / "big.csv"
    big.write_text(good + f'c,"{BIG}"\n', encoding="utf-8")
    latin = tmp_path / "latin.csv"
    latin.write_text(good + "caf\xe9,0.5,1,2,3,4\n", encoding="latin-1")
    header = tmp_path / "header.csv"
    header.write_bytes(b"\xff\xfet\x00a\x00g\x00\n\x00")  # UTF-16 LE, as a spreadsheet may save it
    return [(big, r"big\.csv(: line |:)4: malformed CSV: field larger than field limit"),
            (latin, r"latin\.csv: after line \d+: not UTF-8 text"),
            (header, r"header\.csv: after line 0: not UTF-8 text")]


@pytest.mark.parametrize("reader,good", [(load_calibration, CALIBRATION), (load_metadata, METADATA)])
def test_tag_csv_readers_raise_data_file_error(tmp_path, reader, good):
    for path, message in bad_files(tmp_path, good):
        with pytest.raises(DataFileError, match=message):
            reader(path)


def test_validation_csv_reader_names_file_and_line(tmp_path):
    for path, message in bad_files(tmp_path, VALIDATION):
        with pytest.raises(ValueError, match=message):
            read_validation_csv(str(path))


def test_calibrate_script_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path, message in bad_files(tmp_path, VALIDATION):
        code = calibrate.main(calibrate.build_parser().parse_args(["--data", str(path), "-E", "-o", "out.csv"]))
        err = capsys.readouterr().err
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and err.startswith("calibrate.py: error: "), err
        assert re.search(message, err), err
    assert not (tmp_path / "out.csv").exists()


def test_inference_script_one_line(small_model, tmp_path):
    model, _ = small_model
    noise_image(64, 64).save(tmp_path / "a.png")
    for flag, good in (("-t", CALIBRATION), ("-m", METADATA)):
        for path, message in bad_files(tmp_path, good):
            proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "-M", model, "-w", "0", flag,
                                   str(path), str(tmp_path / "a.png")], capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode != 0
            assert "Traceback" not in proc.stderr, proc.stderr
            lines = [line for line in proc.stderr.splitlines() if str(path) in line]
            assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr
    assert not (tmp_path / "a.txt").exists()
