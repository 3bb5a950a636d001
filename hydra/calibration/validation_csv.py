"""The validation CSV: confusion counts per (tag, threshold), read into and written from `Curve`s.

The format (docs/formats.md) is RedRocket's `data/jtp-3-hydra-val.csv`: a header `tag,threshold,tp,fp,tn,fn`
and one row per tag and candidate threshold, with the confusion counts on a validation set when the tag is
predicted at p >= threshold. `calibrate.py --from-dataset` writes the same format from your own images
(`hydra.calibration.thresholds.counts_from_scores`), so either file calibrates the same way.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import TextIO

import numpy as np

from hydra.calibration.thresholds import Curve

VALIDATION_COLUMNS = ("tag", "threshold", "tp", "fp", "tn", "fn")
_CHUNK_ROWS = 1 << 16  # CSV rows parsed at a time


def read_validation_csv(path: str) -> dict[str, Curve]:
    """Parse a validation CSV with columns `tag,threshold,tp,fp,tn,fn` (others are ignored).

    Fast enough for the real 42 MB / ~750k-row file (about 2 s): the csv module splits the
    rows and numpy converts whole columns; rows are only revisited one by one to report an error.

    Args:
        path: the CSV file (UTF-8, an optional BOM is accepted).

    Returns:
        tag -> Curve, in order of first appearance; each curve sorted by threshold.

    Raises:
        ValueError: naming the file and line, for a missing column, a short or long row, an empty
            tag, a non-numeric value, a threshold outside [0, 1] or a negative or non-finite count.
    """
    with _gc_paused():
        return _read_validation_csv(path)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # building ~750k small row lists triggers the cyclic GC over and over; pausing it makes the
    # parse about 3x faster (measured: ~6 s -> ~2 s on a busy 2-core CPU). Rows hold no cycles.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_validation_csv(path: str) -> dict[str, Curve]:
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            columns = _column_indices(path, header)
            codes: dict[str, int] = {}  # tag -> index, in order of first appearance
            parts, done = [], 0  # done = non-blank data rows before this chunk
            # chunks keep the peak memory near 100 MB for the real file (all rows at once: ~500 MB)
            while chunk := list(itertools.islice(reader, _CHUNK_ROWS)):
                rows = [row for row in chunk if row]  # blank lines are skipped, as csv.DictReader does
                if rows:
                    parts.append(_parse_rows(path, rows, len(header), columns, codes, done))
                done += len(rows)
    except UnicodeDecodeError as e:
        # the decoder reads ahead in blocks, so e.start is not a file offset: give the line reached instead
        line = reader.line_num if reader is not None else 0
        raise ValueError(f"{path}: after line {line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num if reader is not None else 1}: malformed CSV: {e}") from None
    if not parts:
        return {}
    tag_idx = np.concatenate([p[0] for p in parts])  # (R,)
    values = np.concatenate([p[1] for p in parts])  # (R, 5)
    thresholds, counts = values[:, 0], values[:, 1:]  # (R,), (R, 4)
    order = np.lexsort((thresholds, tag_idx))
    starts = np.searchsorted(tag_idx[order], np.arange(len(codes) + 1))
    return {tag: Curve(thresholds[order[a:b]], counts[order[a:b]])
            for tag, a, b in zip(codes, starts[:-1], starts[1:], strict=True)}


def _column_indices(path: str, header: list[str] | None) -> list[int]:
    if header is None:
        raise ValueError(f"{path}: the file is empty; expected the header {','.join(VALIDATION_COLUMNS)}")
    names = [name.strip() for name in header]
    missing = [c for c in VALIDATION_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}:1: missing column {', '.join(missing)} "
                         f"(the header must have {','.join(VALIDATION_COLUMNS)})")
    return [names.index(c) for c in VALIDATION_COLUMNS]


def _parse_rows(
    path: str, rows: list[list[str]], n_fields: int, columns: list[int], codes: dict[str, int], first: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Tag indices (n,) and values (n, 5) of some rows; `first` = index of rows[0] among all data rows."""
    if len(set(map(len, rows)) - {n_fields}):
        bad = next(i for i, row in enumerate(rows) if len(row) != n_fields)
        raise ValueError(f"{_where(path, first + bad)}: expected {n_fields} fields like the header, "
                         f"got {len(rows[bad])}")
    fields = list(zip(*rows, strict=True))
    tags = fields[columns[0]]
    for tag in dict.fromkeys(tags):
        codes.setdefault(tag, len(codes))
    if "" in codes:
        raise ValueError(f"{_where(path, first + tags.index(''))}: empty tag")
    values = np.stack([_floats(path, fields[i], name, first)
                       for i, name in zip(columns[1:], VALIDATION_COLUMNS[1:], strict=True)], 1)  # (n, 5)
    _check_values(path, values[:, 0], values[:, 1:], first)
    return np.fromiter(map(codes.__getitem__, tags), np.int64, len(tags)), values


def _floats(path: str, column: Sequence[str], name: str, first: int) -> np.ndarray:
    try:
        return np.array(column, dtype=np.float64)
    except ValueError:
        for i, text in enumerate(column):  # find the first bad value for the message
            try:
                float(text)
            except ValueError:
                raise ValueError(f"{_where(path, first + i)}: {name} {text!r} is not a number") from None
        raise


def _check_values(path: str, thresholds: np.ndarray, counts: np.ndarray, first: int) -> None:
    bad_thr = ~((thresholds >= 0) & (thresholds <= 1))  # also catches NaN
    if bad_thr.any():
        i = int(np.argmax(bad_thr))
        raise ValueError(f"{_where(path, first + i)}: threshold {float(thresholds[i])} is outside [0, 1]")
    # the metrics divide by sums of counts and take 0 when the numerator is 0; that is only sound
    # for counts >= 0, so reject the rest here rather than calibrate on garbage
    bad_count = ~(np.isfinite(counts) & (counts >= 0)).all(1)
    if bad_count.any():
        i = int(np.argmax(bad_count))
        got = ", ".join(f"{c}={v!r}" for c, v in zip(VALIDATION_COLUMNS[2:], counts[i].tolist(), strict=True))
        raise ValueError(f"{_where(path, first + i)}: counts must be finite and >= 0, got {got}")


def _where(path: str, row: int) -> str:
    """`path:line` of the data row with this index (0 = first non-blank row after the header)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader)
        seen = -1
        for record in reader:
            seen += bool(record)
            if seen == row:
                return f"{path}:{reader.line_num}"
    return path  # unreachable for a row index we got from the same file


def write_validation_csv(file: TextIO, curves: Mapping[str, Curve]) -> None:
    """Write curves in the validation CSV format that `read_validation_csv` reads.

    Args:
        file: a text file opened with `newline=""` (csv default dialect: CRLF rows).
        curves: tag -> Curve; written in the mapping's order, each curve in threshold order.
    """
    writer = csv.writer(file)
    writer.writerow(VALIDATION_COLUMNS)
    for tag, curve in curves.items():
        for thr, counts in zip(curve.thresholds.tolist(), curve.counts.tolist(), strict=True):
            writer.writerow([tag, repr(float(thr)), *map(_count_text, counts)])


def _count_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
