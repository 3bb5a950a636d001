"""The kohya / TagGUI caption options as text: parsed, checked and turned into a caption format.

One implementation for every front end: `inference.py`'s flags (`--replace-tag OLD=NEW`, `--category-threshold
CATEGORY=T`, `--undesired-tags a,b`, the spelling flags) go through these functions via `hydra/cli.py`, and the web
UI's batch form (`hydra/web/batch.py`) calls the same ones with the text of its fields, so a value means the
same, and a bad one gets the same one-line message, wherever it is typed. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from hydra.tags.rules import (
    CaptionFormat,
    TagMetadata,
    TagNames,
    caption_format,
    category_names,
    parse_categories,
    parse_threshold,
)


def parse_replacement(text: str) -> tuple[str, str]:
    """`--replace-tag OLD=NEW` -> (OLD, NEW), stripped.

    Raises:
        ValueError: no `=`, or an empty side.
    """
    old, sep, new = text.partition("=")
    if not sep or not old.strip() or not new.strip():
        raise ValueError(f"expected OLD=NEW, got {text!r}")
    return old.strip(), new.strip()


def parse_category_threshold(text: str) -> tuple[str, float]:
    """`--category-threshold CATEGORY=T` -> (CATEGORY, p): T on the symmetric scale of `-t`, returned as the
    probability p = (T+1)/2 (the category is checked against the model's in `check_category_thresholds`).

    Raises:
        ValueError: not NAME=NUMBER, or T outside -1..1.
    """
    name, sep, value = text.rpartition("=")
    try:
        number = float(value)
        if not sep or not name.strip():
            raise ValueError
    except ValueError:
        raise ValueError(f"expected CATEGORY=THRESHOLD such as character=0.7, got {text!r}") from None
    return name.strip(), float(parse_threshold(number))


def split_tags(text: str) -> list[str]:
    """A comma-separated tag list (`--undesired-tags "text, signature"`): items stripped, empty ones dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def check_category_thresholds(by_category: Mapping[str, float], metadata: TagMetadata | None, topk: int | None,
                              topk_hint: str) -> None:
    """Category thresholds need known categories and a threshold selection.

    Args:
        by_category: {category: p} (`parse_category_threshold` values).
        metadata: the model's tag metadata (None = no categories).
        topk: the selection's k when the tags are the k most probable, else None.
        topk_hint: where that top k comes from and what to do instead, e.g. "(--topk); give -t instead".

    Raises:
        ValueError: an unknown category (naming the choices), no categories, or a top-k selection.
    """
    if not by_category:
        return
    parse_categories(by_category, metadata.names.values() if metadata is not None else ())
    if metadata is None:
        raise ValueError("--category-threshold needs tag categories (-m PATH, or a vocabulary with categories)")
    if topk is not None:
        raise ValueError(f"--category-threshold sets thresholds, but this run keeps the top {topk} tags {topk_hint}")


def caption_spelling(labels: Sequence[str], metadata: TagMetadata | None, rewrite: Callable[[str], str], style, *,
                     aliases: Mapping[str, str] | None = None, category_prefixes: Mapping[str, str] | None = None,
                     underscores: bool = False, prompt: bool = False, separator: str | None = None,
                     warn: Callable[[str], None] | None = None) -> CaptionFormat:
    """A run's caption format: the family's `CaptionStyle` plus replacements (`-a`, `--replace-tag`; OLD in
    e621 or caption spelling, one warning naming those the model lacks), category prefixes, underscores, prompt
    escapes and the separator (None: ", ", or " " when underscores are kept)."""
    names = TagNames(labels, rewrite)
    aliases = {names.find(k) or rewrite(k): v for k, v in (aliases or {}).items()}
    names.resolve(aliases, "-a/-A/--replace-tag", warn)
    return caption_format(labels, category_names(labels, metadata), style, aliases=aliases,
                          category_prefixes=category_prefixes, underscores=underscores, prompt=prompt,
                          separator=separator, rename=rewrite)


def undesired_labels(captions: CaptionFormat, names: Iterable[str],
                     warn: Callable[[str], None] | None = None) -> list[str]:
    """The labels `--undesired-tags` names (e621 or caption spelling); one warning names those the model lacks."""
    names = list(names)
    return captions.names.resolve(names, "--undesired-tags", warn) if names else []
