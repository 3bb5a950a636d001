"""The interactive classifier of `inference.py` (run without paths): one image at a time, settings by command.

Commands and output lines follow the original's; the size command is the model family's size control
(`seqlen` for JTP-3, `max_size` for the DINOv3 tagger). Each tag's probability p is printed as a percentage,
most likely first (the original printed the symmetric score 2p - 1, which reads as 100% for most tags; only
`threshold NUM` takes the symmetric scale).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from hydra.bulk.loader import describe_error
from hydra.models.family import SizeControl
from hydra.tags.rules import (
    CATEGORIES,
    SUBCATEGORIES,
    TagRules,
    TagSettings,
    load_calibration,
    parse_threshold,
    ranked,
)

BANNER = """{title} Interactive Classifier
Type 'q' to quit, or 'h' for help.
For bulk operations, quit and run again with a path, or '-h' for help."""

REPL_CATEGORIES = "general copyright character species meta lore"


def help_text(has_metadata: bool, size: SizeControl, modes: Sequence[str]) -> str:
    lines = [
        "Provide a file path to classify, or one of the following commands:",
        "  threshold NUM (-1.0 to 1.0, 0.2 to 0.8 recommended)",
        "  calibration [PATH] (load calibration csv file)",
    ]
    if has_metadata:
        lines += [
            f"  exclude CATEGORY ({REPL_CATEGORIES})",
            f"  include CATEGORY ({REPL_CATEGORIES})",
            f"  implications MODE ({' '.join(modes)})",
        ]
    lines += [
        f"  {size.name} {'LEN' if size.name == 'seqlen' else 'PX'} ({size.minimum} to {size.maximum}, "
        f"{size.default} recommended)",
        "  quit (or 'q', 'exit')",
    ]
    return "\n".join(lines)


def run(tagger, session: TagSettings, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Read commands and image paths until `q` or end of input."""
    size = tagger.family.size
    print(BANNER.format(title=tagger.family.title), file=stdout)
    rules = session.rules()
    while True:
        print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            print(file=stdout)
            return
        line = line.strip()
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if line in ("q", "quit", "exit"):
                return
            if line in ("", "h", "help", "?"):
                print(help_text(session.metadata is not None, size, tagger.family.implication_modes), file=stdout)
                continue
            if cmd == "threshold" and arg:
                t = float(arg) if _is_number(arg) else None
                if t is None or not -1.0 <= t <= 1.0:
                    print("Threshold must be between -1.0 and 1.0.", file=stdout)
                    continue
                session.threshold = parse_threshold(t)
            elif cmd == "calibration" and (arg or line == "calibration"):
                session.threshold = load_calibration(arg or "calibration.csv", session.rewrite)
                print(f"Loaded calibration for {len(session.threshold)} tags.", file=stdout)
            elif cmd in ("exclude", "include") and arg:
                _need_metadata(session, cmd)
                choices = [*CATEGORIES, *SUBCATEGORIES]
                if arg not in choices:
                    print(f"Unknown category '{arg}'. Choose from: {' '.join(choices)}", file=stdout)
                    continue
                if cmd == "exclude" and arg not in session.exclude:
                    session.exclude.append(arg)
                elif cmd == "include" and arg in session.exclude:
                    session.exclude.remove(arg)
            elif cmd == "implications" and arg:
                if arg not in tagger.family.implication_modes:
                    print(f"Unknown implications mode '{arg}'. Choose from: "
                          f"{' '.join(tagger.family.implication_modes)}", file=stdout)
                    continue
                if arg != "off":
                    _need_metadata(session, cmd)
                session.mode = arg
            elif cmd == size.name and arg:
                n = int(arg) if arg.isdigit() else 0
                if not size.minimum <= n <= size.maximum:
                    print(f"{size.label} must be between {size.minimum} and {size.maximum}.", file=stdout)
                    continue
                tagger.size = n
                continue
            else:
                _classify(tagger, rules, line, stdout)
                continue
            rules = session.rules()
        except (OSError, ValueError) as e:
            print(f"Error: {describe_error(e)}", file=stdout)


def _classify(tagger, rules: TagRules, path: str, stdout: TextIO) -> None:
    try:
        sample = tagger.preprocess(path)
    except Exception as e:
        print(f"'{path}': {describe_error(e)}", file=stdout)
        return
    probs = tagger.predict_samples([sample], rules.active())[0]
    for tag, p in ranked(rules.classify(probs)):
        print(f"  {p * 100:6.1f}% {tag}", file=stdout)


def _need_metadata(session: TagSettings, cmd: str) -> None:
    if session.metadata is None:
        raise ValueError(f"'{cmd}' requires tag metadata (-m PATH)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
