"""The one rule for a tag name that we train, build into an extension, or read from one.

build_extension.py, the trainer and both extension readers (v1, v2) call `check_tag_name`, so a tag that
can be trained can be built, and a file we build loads here and upstream. Where the rule comes from (file
formats: docs/formats.md, model files and extensions):
- whitespace of any kind: upstream's loaders split `classifier.label.implies` / `.impliedby` and Hydra 3.5's
  `classifier.labels` rows with `str.split()`, and JTP-3 joins its labels with line breaks, so a name holding
  whitespace (a space, tab, line break, no-break space, ...: whatever `str.isspace` says) cannot be an
  implied tag, nor a label of a model file that lists it. e621 spells spaces as underscores anyway.
- a backslash: upstream's builder refuses it (captions escape parentheses with one: `3d \\(artwork\\)`).
- other control characters (U+0000, DEL, ...) and lone surrogates (an undecodable command-line argument):
  invisible, and a surrogate cannot even be written as UTF-8 into a file's metadata.
Everything else is accepted: parentheses, colons (`16:9`), '/' and '.' (the trainer's folder and the
builder's file name replace those, not the tag), and non-ASCII e621 tags such as `pokémon_(species)`.
The trainer first reads spaces as underscores, as upstream's does for its folder name (hydra/train/features.py).

Pure Python, no torch.
"""

from __future__ import annotations

import unicodedata

RULE = "a tag is non-empty, without whitespace, backslash or control characters"  # quoted by every error
_NAMED = {" ": "a space", "\\": "a backslash", "\t": "a tab", "\n": "a line break", "\r": "a line break"}


def tag_name_problem(tag: str) -> str | None:
    """Why `tag` cannot be a tag name (a short clause: "it contains a tab"), or None when it can."""
    if not tag:
        return "it is empty"
    for c in tag:
        if c in _NAMED:
            return f"it contains {_NAMED[c]}"
        if c.isspace():
            return f"it contains whitespace U+{ord(c):04X}"
        if unicodedata.category(c) == "Cc":
            return f"it contains the control character U+{ord(c):04X}"
        if unicodedata.category(c) == "Cs":
            return f"it contains U+{ord(c):04X}, a lone surrogate (undecodable text)"
    return None


def check_tag_name(tag: str, what: str = "tag") -> str:
    """Return `tag` if it is a valid tag name, else raise.

    Args:
        tag: the name, e621 spelling (e.g. `my_tag_(custom)`).
        what: how the message names it: `TAG`, `-i`, `metadata classifier.label`, ...

    Raises:
        ValueError: one line naming `what`, the tag (quoted), the reason and the rule, e.g.
            `TAG 'my tag': it contains a space (a tag is non-empty, ...; e621 spelling: 'my_tag')`.
    """
    problem = tag_name_problem(tag)
    if problem is None:
        return tag
    hint = f"; e621 spelling: {tag.replace(' ', '_')!r}" if " " in tag else ""
    raise ValueError(f"{what} {tag!r}: {problem} ({RULE}{hint})")
