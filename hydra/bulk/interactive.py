"""The interactive classifier of `inference.py` (run without paths): one image at a time, settings by command.

Commands and output lines follow the original's; the size command is the model family's size control
(`seqlen` for JTP-3, `max_size` for the DINOv3 tagger). Each tag's probability p is printed as a percentage,
most likely first (the original printed the symmetric score 2p - 1, which reads as 100% for most tags; only
`threshold NUM` takes the symmetric scale).

At a terminal, lines are read with readline when Python has it: line editing, history (this session only: a
history file would keep the paths of a user's images on disk) and tab completion of commands, their
arguments and paths. Every setting change is confirmed; a word that is neither a command nor an existing
file is reported as an unknown command; quotes around a dropped path are removed.
"""

from __future__ import annotations

import glob
import os
import re
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
    category_names,
    load_calibration,
    parse_threshold,
    ranked,
)

BANNER = """{title} Interactive Classifier
Type 'q' to quit, or 'h' for help.
For bulk operations, quit and run again with a path, or '-h' for help."""

COMMANDS = ("threshold", "calibration", "exclude", "include", "implications", "help", "quit", "exit")
BARE_COMMANDS = ("help", "quit", "exit")  # completed without the space that starts an argument


def model_categories(session: TagSettings) -> list[str]:
    """The categories the model's tags are in (e621's order first), then the subcategories."""
    present = set(category_names(session.labels, session.metadata)) - {"unassigned"}
    extra = sorted(present - set(CATEGORIES))
    return [*(c for c in CATEGORIES if c in present), *extra, *SUBCATEGORIES]


def help_text(has_metadata: bool, size: SizeControl, modes: Sequence[str], categories: Sequence[str] = ()) -> str:
    categories_text = " ".join(categories)
    lines = [
        "Provide a file path to classify, or one of the following commands:",
        "  threshold NUM (-1.0 to 1.0, 0.2 to 0.8 recommended)",
        "  calibration [PATH] (load calibration csv file)",
    ]
    if has_metadata:
        lines += [
            f"  exclude CATEGORY ({categories_text})",
            f"  include CATEGORY ({categories_text})",
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
    categories = model_categories(session)
    read = _terminal_reader(tagger, categories) if stdin is sys.stdin and stdin.isatty() else None
    while True:
        if read is not None:
            try:
                line = read("> ") + "\n"
            except EOFError:
                line = ""
        else:
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
                print(help_text(session.metadata is not None, size, tagger.family.implication_modes, categories),
                      file=stdout)
                continue
            if cmd == "threshold" and arg:
                t = float(arg) if _is_number(arg) else None
                if t is None or not -1.0 <= t <= 1.0:
                    print("Threshold must be between -1.0 and 1.0.", file=stdout)
                    continue
                session.threshold = parse_threshold(t)
                print(f"Threshold {t:g} (p >= {session.threshold:.3f}) for every tag.", file=stdout)
            elif cmd == "calibration" and (arg or line == "calibration"):
                path = _unquote(arg) or "calibration.csv"
                session.threshold = load_calibration(path, session.rewrite)
                print(f"Loaded calibration for {len(session.threshold)} tags from '{path}'.", file=stdout)
            elif cmd in ("exclude", "include") and arg:
                _need_metadata(session, cmd)
                if arg not in categories and arg not in (*CATEGORIES, *SUBCATEGORIES):
                    print(f"Unknown category '{arg}'. Choose from: {' '.join(categories)}", file=stdout)
                    continue
                if cmd == "exclude" and arg not in session.exclude:
                    session.exclude.append(arg)
                elif cmd == "include" and arg in session.exclude:
                    session.exclude.remove(arg)
                shown = " ".join(map(str, session.exclude)) or "none"
                print(f"{'Excluding' if cmd == 'exclude' else 'Including'} {arg}; excluded categories: {shown}.",
                      file=stdout)
            elif cmd == "implications" and arg:
                if arg not in tagger.family.implication_modes:
                    print(f"Unknown implications mode '{arg}'. Choose from: "
                          f"{' '.join(tagger.family.implication_modes)}", file=stdout)
                    continue
                if arg != "off":
                    _need_metadata(session, cmd)
                session.mode = arg
                print(f"Implications: {arg}.", file=stdout)
            elif cmd == size.name and arg:
                n = int(arg) if arg.isdigit() else 0
                if not size.minimum <= n <= size.maximum:
                    print(f"{size.label} must be between {size.minimum} and {size.maximum}.", file=stdout)
                    continue
                tagger.size = n
                print(f"{size.label} {n}.", file=stdout)
                continue
            elif cmd in (*COMMANDS, size.name) and not os.path.exists(_unquote(line)):
                print(f"'{cmd}' needs an argument; type 'h' for help.", file=stdout)
                continue
            else:
                path = _unquote(line)
                if not os.path.exists(path) and _looks_like_command(path):
                    print(f"Unknown command '{cmd}'; type 'h' for help, or give an image path.", file=stdout)
                    continue
                _classify(tagger, rules, path, stdout)
                continue
            rules = session.rules()
        except (OSError, ValueError) as e:
            print(f"Error: {describe_error(e)}", file=stdout)


def _unquote(text: str) -> str:
    """A path as a terminal drops it: 'quoted' or "quoted" (GNOME, Windows), with surrounding spaces."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text


def _looks_like_command(text: str) -> bool:
    """A line starting with a bare word, without folder separators or a file extension at its end, is a
    mistyped command (`thresold 0.3`), not a file (`my pic.png`, `~/a`, `C:\\x`)."""
    first = text.split(" ", 1)[0]
    return (first.isalpha() and not any(c in text for c in "/\\~")
            and re.search(r"\.[A-Za-z]\w{1,4}$", text) is None)


def _terminal_reader(tagger, categories: Sequence[str]):
    """`input` with readline's line editing, in-memory history and tab completion; plain `input` without it.

    Python's `input` uses readline only when stdin and stdout are both the terminal, so this is called for a
    terminal stdin, and `run` prints through the same stdout. Keys typed while an image is being tagged are
    echoed by the terminal as typed (`^[[A`) and still reach readline when the next prompt appears.
    """
    try:
        import readline
    except ImportError:  # Windows without pyreadline3: no editing, but the REPL works the same
        return input
    size = tagger.family.size.name
    words = {"exclude": categories, "include": categories, "implications": tagger.family.implication_modes}

    def complete(text: str, state: int) -> str | None:
        # `text` is the word at the cursor (words end at spaces); a path may hold spaces, so it is the whole
        # line (or all after `calibration `), completed in the user's spelling, minus what is before `text`
        typed = readline.get_line_buffer()[: readline.get_endidx()].lstrip()
        cmd, space, arg = typed.partition(" ")
        if not space:
            options = [c if c in BARE_COMMANDS else c + " " for c in (*COMMANDS, size) if c.startswith(text)]
            options += _paths(text)
        elif cmd in words:
            options = [w for w in words[cmd] if w.startswith(text)]
        else:
            path = arg.lstrip() if cmd == "calibration" else typed
            options = [p[len(path) - len(text):] for p in _paths(path)]
        return options[state] if state < len(options) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n")
    if "libedit" in (readline.__doc__ or ""):  # macOS's Python: libedit spells the binding its own way
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    return input


def _paths(text: str) -> list[str]:
    """Files and folders starting with `text`, spelt as typed (`~` kept); folders end in the separator, to go on
    completing."""
    expanded = os.path.expanduser(text)
    found = glob.glob(glob.escape(expanded) + "*")
    typed = [text + p[len(expanded):] if p.startswith(expanded) else p for p in found]  # glob may tidy `a//b`
    return sorted(t + (os.sep if os.path.isdir(p) else "") for t, p in zip(typed, found))


def _classify(tagger, rules: TagRules, path: str, stdout: TextIO) -> None:
    try:
        sample = tagger.preprocess(path)
    except Exception as e:
        print(f"'{path}': {describe_error(e)}", file=stdout)
        return
    probs = tagger.predict_samples([sample], rules.active())[0]
    if not rules.classify(probs):
        print("No tag passes the current settings (try a lower threshold).", file=stdout)
        return

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
