"""Answer checks for the wizards (easy.sh/.bat, calibrate.sh/.bat). The shell and batch twins both call this
module, so they accept the same answers and give the same messages.

    python -m hydra.wizard path ANSWER BASE_DIR   # a typed or dropped path -> the absolute path of what exists
    python -m hydra.wizard number ANSWER MIN MAX  # a number from MIN to MAX, inclusive
    python -m hydra.wizard metric ANSWER          # a calibrate.py metric (cti, f0.5, j@0.2, ...)
    python -m hydra.wizard yesno ANSWER           # y, yes, n or no (any case) -> y or n

It prints the accepted value on stdout and exits 0. Otherwise it prints the reason on stderr and exits 1, and
the wizard asks again. An empty path exits 2: the user wants to go back. Torch-free, so it starts quickly.

Terminals drop a file as a path in one of these forms (all handled by `path_candidates`):
- GNOME Terminal, Konsole, Windows: quoted, `'/x/my pic.png' ` or `"C:\\x\\my pic.png"`, often with a
  trailing space; a `'` inside single quotes is written `'\\''`;
- macOS Terminal, iTerm2, kitty: spaces and other specials backslash-escaped, `/x/my\\ pic.png `;
- some file managers and terminals: a `file://` URL with percent-encoding, `file:///x/my%20pic.png`.
"""

from __future__ import annotations

import math
import os
import re
import sys
import urllib.parse
import urllib.request

INVALID, BACK = 1, 2  # exit codes: ask again / nothing given


class Refused(ValueError):
    """An answer the wizard does not accept; the message says why."""


def path_candidates(answer: str) -> list[str]:
    """The readings of a typed or dropped path, the literal text first, the most decoded last."""
    text = answer.strip()
    found = [text]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        quote, text = text[0], text[1:-1]
        if quote == "'":
            text = text.replace("'\\''", "'")
        found.append(text)
    if text[:5].lower() == "file:":
        found.append(file_url_path(text))
    elif os.sep == "/" and "\\" in text:  # on Windows a backslash is the separator, never an escape
        found.append(re.sub(r"\\(.)", r"\1", text))
    return list(dict.fromkeys(found))


def file_url_path(url: str) -> str:
    """`file:///x/my%20pic.png` -> `/x/my pic.png` (`file://localhost/...` too; a host is kept on Windows only,
    as a UNC path)."""
    parts = urllib.parse.urlsplit(url)
    host = "" if parts.netloc.lower() in ("", "localhost") else parts.netloc
    if host and os.name != "nt":
        raise Refused(f"{url} is on another computer ({host}); give a local path")
    return urllib.request.url2pathname((f"//{host}" if host else "") + parts.path)


def existing_path(answer: str, base: str) -> str:
    """The absolute path of the first reading of `answer` that exists (relative to `base`, `~` expanded).

    Raises:
        Refused: nothing by that name exists.
    """
    candidates = [os.path.abspath(os.path.join(base, os.path.expanduser(c))) for c in path_candidates(answer)]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise Refused(f"Not found: {candidates[-1]}. Check the name, or drag and drop it here.")


def number(answer: str, low: str, high: str) -> str:
    """`answer` if it is a number from `low` to `high` (a decimal comma is read as a point)."""
    text = answer.strip().replace(",", ".")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and float(low) <= value <= float(high)):
        raise Refused(f"'{answer.strip()}' is not a number from {low} to {high}; please try again.")
    return text


def metric(answer: str) -> str:
    from hydra.calibration.thresholds import METRIC_CHOICES, get_metric, split_floor

    text = answer.strip().lower()
    try:
        get_metric(split_floor(text)[0])
    except ValueError:
        raise Refused(f"'{answer.strip()}' is not a metric; choose one of: {METRIC_CHOICES}") from None
    return text


def yesno(answer: str) -> str:
    text = answer.strip().lower()
    if text in ("y", "yes"):
        return "y"
    if text in ("n", "no"):
        return "n"
    raise Refused(f"Please answer y or n (not '{answer.strip()}').")


def main(argv: list[str]) -> int:
    checks = {"path": (existing_path, 1), "number": (number, 2), "metric": (metric, 0), "yesno": (yesno, 0)}
    if len(argv) < 2 or argv[0] not in checks or len(argv) != 2 + checks[argv[0]][1]:
        print("usage: python -m hydra.wizard {path ANSWER BASE | number ANSWER MIN MAX | metric ANSWER | "
              "yesno ANSWER}", file=sys.stderr)
        return 64
    # The batch twins read the answer back after `chcp 65001`; a POSIX file name may be any bytes.
    sys.stdout.reconfigure(**({"encoding": "utf-8"} if os.name == "nt" else {"errors": "surrogateescape"}))
    check, answer = checks[argv[0]][0], argv[1]
    if check is existing_path and not answer.strip():
        return BACK
    try:
        print(check(answer, *argv[2:]))
    except Refused as e:
        print(e, file=sys.stderr)
        return INVALID
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
