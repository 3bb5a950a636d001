"""Caption spelling (aliases, category prefixes, underscores, prompt escaping) and the list files of the CLI.

Hydra 3.5's rewriter, built once per run: for each tag, an alias (`-a OLD NEW`, `-A FILE`) replaces the name,
a category prefix (`-B CATEGORY PREFIX`) is prepended, then one character translation runs over the whole
string: `_` becomes a space unless underscores are kept (`-u`), and with `-P` the prompt characters `(`, `)`
and `:` are backslash-escaped. Tags join with ", ", or with a single space when underscores are kept. Two
labels that would be spelled the same are an error.

The escape set and separator are parameters, so the same Rewriter serves JTP-3 models (`escape="()"`, the
vulva -> pussy rename applied to the labels beforehand; see `hydra.tags.rules`).

List files (`-A`, `-X`, `-G`) share one comment rule: `#` starts a comment at the start of a line or after
a space or tab (so `#` inside a tag is kept); blank lines are ignored.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

from hydra.tags.modes import ExclusiveGroup, parse_group

SEPARATOR = ", "
PROMPT_ESCAPES = "():"  # -P
JTP3_ESCAPES = "()"  # JTP-3's caption spelling escapes parentheses only

_COMMENT = re.compile(r"(?:^|[ \t])#.*")
PathLike = str | os.PathLike


def strip_comment(line: str) -> str:
    """The line without its comment (`#` at the start or after a space or tab, up to the end)."""
    return _COMMENT.sub("", line, count=1)


def _fields(path: PathLike) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, whitespace-separated fields) of each line that is not blank after comments."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM would otherwise stick to the first tag
        for number, line in enumerate(f, 1):
            fields = strip_comment(line.rstrip("\r\n")).split()
            if fields:
                yield number, fields


def read_aliases(path: PathLike) -> dict[str, str]:
    """An alias file: one `OLD NEW` per line (a later line for the same OLD wins).

    Raises:
        ValueError: a line with another number of fields ("Invalid alias on line N of PATH").
    """
    aliases = {}
    for number, fields in _fields(path):
        if len(fields) != 2:
            raise ValueError(f"Invalid alias on line {number} of {os.fspath(path)}: expected 'OLD NEW', "
                             f"got {len(fields)} field{'s' * (len(fields) != 1)}")
        aliases[fields[0]] = fields[1]
    return aliases


def read_tag_list(path: PathLike) -> list[str]:
    """A tag list file (`-X`): every whitespace-separated token, in file order."""
    return [tag for _, fields in _fields(path) for tag in fields]


def read_groups(path: PathLike) -> list[ExclusiveGroup]:
    """A group file (`-G`): one exclusive group per line, in `-g` syntax (see `parse_group`).

    Raises:
        ValueError: an invalid group, naming the file and line.
    """
    groups = []
    for number, fields in _fields(path):
        try:
            groups.append(parse_group(fields))
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: line {number}: {e}") from None
    return groups


def collect_aliases(pairs: Iterable[Sequence[str]] = (), files: Iterable[PathLike] = ()) -> dict[str, str]:
    """`-A` files in order, then `-a OLD NEW` pairs; a later alias for the same tag wins."""
    aliases: dict[str, str] = {}
    for path in files:
        aliases.update(read_aliases(path))
    for old, new in pairs:
        aliases[old] = new
    return aliases


def collect_tags(tags: Iterable[str] = (), files: Iterable[PathLike] = ()) -> list[str]:
    """`-x TAG` values followed by the tokens of the `-X` files, deduplicated in order."""
    return list(dict.fromkeys([*tags, *(t for path in files for t in read_tag_list(path))]))


def collect_groups(groups: Iterable[Sequence[str]] = (), files: Iterable[PathLike] = ()) -> list[ExclusiveGroup]:
    """`-g ITEM...` groups followed by the groups of the `-G` files, in that order."""
    return [*(parse_group(list(items)) for items in groups), *(g for path in files for g in read_groups(path))]


class Rewriter:
    """Caption spelling of a model's labels, built once per run.

    Args:
        labels: model labels in model order (original names).
        categories: the category name of each label.
        aliases: OLD -> NEW tag names.
        category_prefixes: category name -> text prepended to every tag of that category.
        underscores: keep underscores (`-u`); otherwise they become spaces.
        escape: characters to backslash-escape (`PROMPT_ESCAPES` for `-P`, `JTP3_ESCAPES` for JTP-3).
        separator: between caption tags; None = ", ", or " " when underscores are kept.

    Raises:
        ValueError: two labels are spelled the same ("Conflicting rewritten tags: ...").
    """

    def __init__(self, labels: Sequence[str], categories: Sequence[str], aliases: Mapping[str, str] | None = None,
                 category_prefixes: Mapping[str, str] | None = None, underscores: bool = False, escape: str = "",
                 separator: str | None = None):
        assert len(labels) == len(categories), (len(labels), len(categories))
        self.aliases = dict(aliases or {})
        self.category_prefixes = dict(category_prefixes or {})
        self.separator = separator if separator is not None else " " if underscores else SEPARATOR
        table = {} if underscores else {"_": " "}
        self._translation = str.maketrans(table | {c: "\\" + c for c in escape})
        self._names = {tag: self._spell(tag, cat) for tag, cat in zip(labels, categories)}
        _check_conflicts(self._names)
        core = self.separator.strip()  # prefix items split on the separator's visible part, tab or newline
        self._prefix_split = re.compile(rf"\s*(?:{re.escape(core)}|\t|\n)\s*" if core else r"\s+")

    def _spell(self, tag: str, category: str | None) -> str:
        text = self.aliases.get(tag, tag)
        text = self.category_prefixes.get(category, "") + text if category is not None else text
        return text.translate(self._translation)

    def name(self, tag: str) -> str:
        """A tag's caption spelling (tags that are not labels get the alias and translation, no prefix)."""
        name = self._names.get(tag)
        return name if name is not None else self._spell(tag, None)

    def split_prefix(self, text: str) -> list[str]:
        """`-p TEXT` as caption items: split on the separator (on whitespace with `-u`), empty items dropped."""
        return [item for item in self._prefix_split.split(text.strip()) if item]

    def caption(self, tags: Iterable[str], prefix: str | Sequence[str] = "", shuffle: bool = False,
                rng: random.Random | None = None) -> str:
        """The caption text: the prefix items first, then the tags (in the given order, or shuffled).

        Tags whose spelling equals a prefix item are not repeated.

        Args:
            tags: original tag names, usually the classified tags in model order.
            prefix: `-p TEXT`, or its items from `split_prefix`.
            shuffle: shuffle the tags (not the prefix items).
            rng: the random generator for shuffling (default: the `random` module).
        """
        items = self.split_prefix(prefix) if isinstance(prefix, str) else list(prefix)
        skip = set(items)
        names = [n for n in map(self.name, tags) if n not in skip]
        if shuffle:
            (rng or random).shuffle(names)
        return self.separator.join(items + names)


def _check_conflicts(names: Mapping[str, str]) -> None:
    by_text: dict[str, list[str]] = {}
    for tag, text in names.items():
        by_text.setdefault(text, []).append(tag)
    clashes = [f"{' and '.join(map(repr, tags))} -> {text!r}" for text, tags in by_text.items() if len(tags) > 1]
    if clashes:
        raise ValueError(f"Conflicting rewritten tags: {'; '.join(clashes)}")
