"""True tags of a dataset's images, from the sidecar files beside them.

The rules, in one place (docs/tag-rules.md has the tag spellings):
- An image's true tags come from `NAME.json` or, failing that, `NAME.txt` beside `NAME.png` (any image).
  `.txt`: tags separated by commas or newlines, in e621 spelling (`red_fox`, `3d_(artwork)`) or caption
  spelling (`red fox`, `3d \\(artwork\\)`). `.json`: a list of tags, an object with a `tags` list (or an
  e621-style space-separated string), or an e621 post (`{"tags": {"general": [...], ...}, "rating": "e"}`,
  optionally wrapped in `{"post": ...}`); an e621 rating letter adds `safe`/`questionable`/`explicit`.
- Tags match model labels ignoring case, `_` versus space and prompt escapes; for JTP-3 the diffusion
  rename `pussy` is read back as the model's `vulva`. Tags that match nothing are counted and reported.
- With tag metadata, true tags are closed under implications (`red_fox` -> `fox` -> `canine`): e621
  applies implications to its posts, so the model learned (and RedRocket validated) on closed tag sets;
  a caption listing `red_fox` alone would otherwise count a correct `canine` as a false positive.
- Every model tag missing from an image's (closed) tags is a negative for that image, as in RedRocket's
  validation on e621 posts. So a tag is only worth calibrating from the dataset when it has positives;
  `hydra.calibration.dataset.merge_curves` takes the others from the default validation data (or leaves
  them out).
- Images without a sidecar, with an empty one, or whose sidecar names no model tag at all (a prose
  caption, say) are skipped and counted; an unreadable sidecar is reported and skipped. Only regular files are
  read (a FIFO would block), at most 1 MiB of `.txt` and `MAX_JSON_BYTES` of `.json`; a byte-order mark decides
  the encoding (`hydra.bulk.run.read_caption`).

Shapes: N = images, T = model tags.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hydra.bulk.run import read_caption, report

SIDECAR_SUFFIXES = (".json", ".txt")  # looked for in this order: the structured file wins
MAX_JSON_BYTES = 16 << 20  # a JSON sidecar larger than this is not one (an e621 post is a few KB)
RATINGS = {"s": "safe", "q": "questionable", "e": "explicit"}  # e621's `rating` letters -> JTP-3's tags


class SidecarError(ValueError):
    """A sidecar file could not be read or has an unexpected shape; str(e) is the one-line reason."""


# ---------------------------------------------------------------------------------------------------
# Sidecars


def find_sidecar(image_path: str) -> str | None:
    """`NAME.json` or `NAME.txt` beside `NAME.ext` (JSON first), or None."""
    stem = os.path.splitext(image_path)[0]
    for suffix in SIDECAR_SUFFIXES:
        if os.path.isfile(stem + suffix):
            return stem + suffix
    return None


def read_sidecar(path: str) -> list[str]:
    """The tags listed in a `.txt` or `.json` sidecar, as written (not yet matched to the model).

    Raises:
        SidecarError: unreadable file, invalid JSON, or JSON of an unexpected shape.
    """
    try:
        # only a regular file, at most a size cap (a FIFO would block, /dev/zero never end); BOMs are honoured
        if path.lower().endswith(".json"):
            return tags_from_json(json.loads(read_caption(path, MAX_JSON_BYTES)))
        return split_caption(read_caption(path))
    except json.JSONDecodeError as e:
        raise SidecarError(f"not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:  # json's decoder recurses per nesting level: [[[[...]]]] 100k deep
        raise SidecarError("JSON nested too deeply to be a sidecar") from None
    except OSError as e:
        raise SidecarError(f"cannot read the sidecar ({e.strerror or e})") from None


def split_caption(text: str) -> list[str]:
    """Tags of a caption: separated by commas or newlines, surrounding blanks stripped, empties dropped."""
    return [t.strip() for t in re.split(r"[,\n]", text) if t.strip()]


def tags_from_json(data: Any) -> list[str]:
    """Tags of a JSON sidecar (see the module docstring for the accepted shapes)."""
    if isinstance(data, dict) and isinstance(data.get("post"), dict):
        data = data["post"]  # e621's /posts/ID.json
    if isinstance(data, list):
        return _strings(data, "the list")
    if not isinstance(data, dict) or "tags" not in data:
        raise SidecarError("JSON sidecar must be a list of tags or an object with 'tags'")
    raw, tags = data["tags"], []
    if isinstance(raw, str):
        tags = raw.split()  # e621 tags never contain spaces
    elif isinstance(raw, list):
        tags = _strings(raw, "'tags'")
    elif isinstance(raw, dict):  # e621 post: category -> list of tags
        for category, names in raw.items():
            tags += _strings(names, f"'tags.{category}'")
    else:
        raise SidecarError(f"'tags' must be a list, a string or an object of lists, not {type(raw).__name__}")
    rating = data.get("rating")
    if isinstance(rating, str) and rating[:1].lower() in RATINGS:
        tags.append(RATINGS[rating[:1].lower()])
    return tags


def _strings(values: Any, what: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SidecarError(f"{what} must be a list of strings")
    return [v.strip() for v in values if v.strip()]


# ---------------------------------------------------------------------------------------------------
# Matching sidecar tags to model labels


def _key(tag: str) -> str:
    return tag.strip().lower().replace(" ", "_")


def _unescape(tag: str) -> str:
    return re.sub(r"\\(.)", r"\1", tag)  # prompt escapes: 3d \(artwork\) -> 3d (artwork)


class TagMatcher:
    """Finds the model label a sidecar tag means.

    A tag matches a label when they are equal ignoring case and `_` versus space, first as written and
    then with prompt escapes (`\\(`) removed. Exact spellings win over these looser ones.

    Args:
        labels: the model's labels, model order.
        renames: the family's caption renames (old, new): the renamed spelling is accepted too (JTP-3 captions
            are written with `pussy` for `vulva`).
    """

    def __init__(self, labels: Sequence[str], renames: Sequence[tuple[str, str]] = ()):
        self.labels = list(labels)
        self._index: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            self._index.setdefault(label, i)
        for i, label in enumerate(self.labels):
            self._index.setdefault(_key(label), i)
        for old, new in renames:
            for i, label in enumerate(self.labels):
                if old in label:
                    self._index.setdefault(_key(label.replace(old, new)), i)

    def index(self, tag: str) -> int | None:
        """The label index of `tag`, or None."""
        for form in (tag, _key(tag), _key(_unescape(tag))):
            if form in self._index:
                return self._index[form]
        return None

    def name(self, tag: str) -> str:
        """The label `tag` means, or `tag` itself when it means none."""
        i = self.index(tag)
        return tag if i is None else self.labels[i]


# ---------------------------------------------------------------------------------------------------
# Ground truth


@dataclass
class GroundTruth:
    """The dataset's labelled images and their true tags.

    Attributes:
        images: paths of the images that count, scan order.
        truth: (N, T) bool, True where the tag is true for the image (after implications).
        unmatched: sidecar tag -> number of images listing it, for tags that match no model label.
        matched: (image, label) pairs named by the sidecars, before implications.
        implied: true tags added by implications.
        no_sidecar, empty, no_model_tag: images skipped for each reason.
        failed: sidecars that could not be read (already reported on stderr).
    """

    images: list[str]
    truth: np.ndarray
    unmatched: collections.Counter = field(default_factory=collections.Counter)
    matched: int = 0
    implied: int = 0
    no_sidecar: int = 0
    empty: int = 0
    no_model_tag: int = 0
    failed: int = 0


def read_sidecars(images: Iterable[str]) -> tuple[dict[str, list[str]], int, int]:
    """Raw tags of every image that has a sidecar.

    Returns:
        (image -> tags as written, images without a sidecar, unreadable sidecars). Unreadable sidecars
        are reported on stderr in the one-line format.
    """
    raw, missing, failed = {}, 0, 0
    for image in images:
        sidecar = find_sidecar(image)
        if sidecar is None:
            missing += 1
            continue
        try:
            raw[image] = read_sidecar(sidecar)
        except SidecarError as e:
            report(sidecar, str(e))
            failed += 1
    return raw, missing, failed


def ground_truth(raw: Mapping[str, list[str]], matcher: TagMatcher, implies: Mapping[str, Sequence[str]] | None = None,
                 ) -> GroundTruth:
    """Match sidecar tags to labels and build the truth matrix.

    Args:
        raw: image -> sidecar tags as written (from `read_sidecars`).
        matcher: the model's labels.
        implies: direct implications (tag -> implied tags, any spelling the matcher understands); the true
            tags are closed under them. None = as written.
    """
    gt = GroundTruth([], np.zeros((0, len(matcher.labels)), bool))
    rows = []
    for image, tags in raw.items():
        if not tags:
            gt.empty += 1
            continue
        hits = set()
        for tag in tags:
            i = matcher.index(tag)
            if i is None:
                gt.unmatched[tag] += 1
            else:
                hits.add(i)
        if not hits:
            gt.no_model_tag += 1
            continue
        gt.matched += len(hits)
        row = np.zeros(len(matcher.labels), bool)
        row[list(hits)] = True
        gt.images.append(image)
        rows.append(row)
    if rows:
        gt.truth = np.stack(rows)  # (N, T)
    if implies and rows:
        closed = close_under_implications(gt.truth, matcher, implies)
        gt.implied = int(closed.sum() - gt.truth.sum())
        gt.truth = closed
    return gt


def close_under_implications(truth: np.ndarray, matcher: TagMatcher,
                             implies: Mapping[str, Sequence[str]]) -> np.ndarray:
    """(N, T) truth with every tag implied (transitively) by a true tag set true as well."""
    from hydra.tags.implications import ImplicationGraph

    graph = ImplicationGraph(matcher.labels, {matcher.name(t): [matcher.name(c) for c in cs]
                                              for t, cs in implies.items()})
    # inherit: p'(t) = max of p over t and every tag implying it; on 0/1 values that is the closure
    return graph.inherit(truth.astype(np.float32)) > 0.5
