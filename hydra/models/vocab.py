"""Tag vocabulary of the DINOv3 booru tagger: `tagger_vocab.json` and its `*_with_categories*` variants.

File formats (docs/formats.md, DINOv3 tagger):
- `tagger_vocab.json`: `{"idx2tag": [74625 strings]}`; index i is row i of the checkpoint's head.
  Tags are spelled with spaces, never underscores (space -> underscore is lossless).
- `tagger_vocab_with_categories.json` adds `tag2category: {tag: int}` with e621 category ids -1..8.
- `tagger_vocab_with_categories_and_alias_updated.json` additionally has `tag2alias: {tag: str}`.

Pure Python (no torch), so the vocabulary can be inspected and tested without a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# Raw `tag2category` ids use e621 numbering, as the tags CSV does. Danbooru "meta" would be 5 there but collides
# with e621 "species"; upstream labels 5 "species/meta". A category 9 ("rating") is unverified.
E621_CATEGORY_NAMES: dict[int, str] = {
    -1: "unassigned",
    0: "general",
    1: "artist",
    2: "contributor",
    3: "copyright",
    4: "character",
    5: "species",
    6: "invalid",
    7: "meta",
    8: "lore",
}
UNASSIGNED = -1


@dataclass
class Vocab:
    """Tag names in head order, with optional e621 categories and aliases.

    Attributes:
        tags: tag names; `tags[i]` is the name of logit i.
        categories: raw e621 category id per tag (`tag2category`), or None if the file has none.
            Tags missing from the mapping are unassigned (-1).
        aliases: alias string per tag (`tag2alias`), or None if the file has none.
    """

    tags: list[str]
    categories: dict[str, int] | None = None
    aliases: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self.tags)

    def category(self, tag: str) -> int:
        """Raw e621 category id of `tag`; -1 (unassigned) when unknown or the file has no categories."""
        return (self.categories or {}).get(tag, UNASSIGNED)


def load_vocab(path: str | os.PathLike) -> Vocab:
    """Read a DINOv3 tagger vocabulary file.

    Args:
        path: a `tagger_vocab*.json` file.

    Returns:
        The parsed `Vocab`.

    Raises:
        ValueError: the file is not JSON or does not have the expected shape; the message names the file.
    """
    name = os.fspath(path)
    with open(path, encoding="utf-8") as f:  # the fork had to add utf-8: 6 tags are non-ASCII
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return parse_vocab(data, name)


def parse_vocab(data: object, name: str = "<vocab>") -> Vocab:
    """Validate an already-decoded vocabulary JSON object (see `load_vocab`); `name` is used in errors."""
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a JSON object with 'idx2tag', got {type(data).__name__}")
    if "idx2tag" not in data:
        raise ValueError(f"{name}: no 'idx2tag' list (keys: {', '.join(sorted(data)) or 'none'})")
    tags = _parse_tags(data["idx2tag"], name)
    categories = aliases = None
    if "tag2category" in data:
        categories = _parse_mapping(data["tag2category"], name, "tag2category", int)
    if "tag2alias" in data:
        aliases = _parse_mapping(data["tag2alias"], name, "tag2alias", str)
    return Vocab(tags=tags, categories=categories, aliases=aliases)


def _parse_tags(raw: object, name: str) -> list[str]:
    if not isinstance(raw, list):
        raise ValueError(f"{name}: 'idx2tag' must be a list of strings, got {type(raw).__name__}")
    if not raw:
        raise ValueError(f"{name}: 'idx2tag' is empty")
    seen: dict[str, int] = {}
    for i, tag in enumerate(raw):
        if not isinstance(tag, str):
            raise ValueError(f"{name}: idx2tag[{i}] is {type(tag).__name__} {tag!r}, expected a string")
        if not tag:
            raise ValueError(f"{name}: idx2tag[{i}] is an empty string")
        if tag in seen:
            raise ValueError(f"{name}: duplicate tag {tag!r} at idx2tag[{seen[tag]}] and idx2tag[{i}]")
        seen[tag] = i
    return raw


def _parse_mapping(raw: object, name: str, field: str, value_type: type) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: '{field}' must be a JSON object, got {type(raw).__name__}")
    for tag, value in raw.items():
        # bool is an int subclass in Python; `true` as a category id is a broken file, not category 1
        if not isinstance(value, value_type) or isinstance(value, bool):
            raise ValueError(
                f"{name}: {field}[{tag!r}] is {type(value).__name__} {value!r}, "
                f"expected {value_type.__name__}"
            )
    return raw
