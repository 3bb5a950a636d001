"""Tag vocabulary rules: spelling rewrites, the symmetric threshold scale, metadata and calibration CSVs,
and `classify`, which turns one image's probabilities into the tags to output.

Pure Python + numpy (no torch), so it is tested on the real tag CSV without a model.

Conventions (spec §3):
- Probabilities p are sigmoid outputs in [0, 1]; data files, calibration CSVs and CSV output use p.
- The "symmetric" scale s = 2p - 1 in [-1, 1] is what `-t` and the UIs show (so `-t 0.5` means p >= 0.75).
- Tag names are e621 spelling with underscores; `rewrite_tag` applies the vulva -> pussy rename that the
  original does for diffusion-model compatibility (unless `-O`), consistently to labels, metadata keys,
  implications and calibration tags so that lookups agree.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from hydra.tags.implications import MODES, ImplicationGraph

# e621 category ids (spec §3.3). `-x` accepts the names.
CATEGORIES: dict[str, int] = {
    "general": 0, "artist": 1, "copyright": 3, "character": 4, "species": 5, "meta": 7, "lore": 8,
}
CATEGORY_NAMES: dict[int, str] = {v: k for k, v in CATEGORIES.items()}
UNKNOWN_CATEGORY = -1


def rewrite_tag(tag: str, original_tags: bool = False) -> str:
    """The original's `rewrite_tag`: `vulva` -> `pussy` everywhere in the name, unless `original_tags`."""
    return tag if original_tags else tag.replace("vulva", "pussy")


def tag_rewriter(original_tags: bool) -> Callable[[str], str]:
    return (lambda t: t) if original_tags else (lambda t: t.replace("vulva", "pussy"))


def caption_tag(tag: str) -> str:
    """Spelling used in .txt captions: spaces for underscores and escaped parentheses (prompt syntax).

    `-O` does not turn this off in the original, only the vulva rename.
    """
    return tag.replace("_", " ").replace("(", "\\(").replace(")", "\\)")


def to_symmetric(p: float) -> float:
    return (p - 0.5) * 2.0


def from_symmetric(s: float) -> float:
    return (s + 1.0) / 2.0


class DataFileError(ValueError):
    """A user-supplied CSV file is malformed; the message names the file and the line."""


def _open_csv(path: str | os.PathLike, required: Sequence[str]) -> tuple[csv.DictReader, object]:
    f = open(path, encoding="utf-8-sig", newline="")  # -sig: tolerate a BOM written by spreadsheet tools
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        f.close()
        raise DataFileError(f"{path}: line 1: missing column(s) {', '.join(missing)} "
                            f"(expected a header with {', '.join(required)})")
    return reader, f


@dataclass
class TagMetadata:
    """Per-tag category id and direct implications, keyed by (rewritten) tag name."""

    category: dict[str, int] = field(default_factory=dict)
    implies: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def add(self, tag: str, category: int, implies: Iterable[str] = ()) -> None:
        self.category[tag] = category
        self.implies[tag] = tuple(implies)


def load_metadata(path: str | os.PathLike, rewrite: Callable[[str], str] = rewrite_tag) -> TagMetadata:
    """Read `data/jtp-3-hydra-tags.csv` (`tag,category,implications`; implications space-separated, direct).

    Raises:
        DataFileError: on a missing column, a non-integer category or an empty tag, with the line number.
    """
    meta = TagMetadata()
    reader, f = _open_csv(path, ("tag", "category", "implications"))
    with f:
        for row in reader:
            line = reader.line_num
            tag = (row["tag"] or "").strip()
            if not tag:
                raise DataFileError(f"{path}: line {line}: empty tag")
            try:
                category = int(row["category"])
            except (TypeError, ValueError):
                raise DataFileError(f"{path}: line {line}: category {row['category']!r} "
                                    "is not an integer") from None
            meta.add(rewrite(tag), category, (rewrite(t) for t in (row["implications"] or "").split()))
    return meta


def load_calibration(path: str | os.PathLike, rewrite: Callable[[str], str] = rewrite_tag) -> dict[str, float]:
    """Read a calibration CSV (`tag,threshold[,...]`) into {tag: p-threshold}.

    Blank thresholds skip the row (spec §3.7); other columns are ignored.

    Raises:
        DataFileError: on a missing column or a threshold outside [0, 1], with the line number.
    """
    thresholds: dict[str, float] = {}
    reader, f = _open_csv(path, ("tag", "threshold"))
    with f:
        for row in reader:
            value = (row["threshold"] or "").strip()
            if not value:
                continue
            try:
                t = float(value)
            except ValueError:
                t = math.nan
            if not 0.0 <= t <= 1.0:
                raise DataFileError(f"{path}: line {reader.line_num}: 'threshold' must be between "
                                    f"0.0 and 1.0, or blank (got {value!r})")
            thresholds[rewrite((row["tag"] or "").strip())] = t
    return thresholds


Threshold = float | dict[str, float]


def parse_threshold(value: str | float, rewrite: Callable[[str], str] = rewrite_tag) -> Threshold:
    """`-t` semantics: a number on the symmetric scale [-1, 1] (returned as p), or a calibration CSV path."""
    if isinstance(value, float | int):
        s = float(value)
    else:
        try:
            s = float(value)
        except ValueError:
            if not os.path.isfile(value):
                raise FileNotFoundError(f"threshold {value!r} is neither a number in [-1, 1] "
                                        "nor an existing calibration file") from None
            return load_calibration(value, rewrite)
    if not -1.0 <= s <= 1.0:
        raise ValueError("Threshold must be between -1.0 and 1.0.")
    return from_symmetric(s)


def threshold_vector(labels: Sequence[str], threshold: Threshold) -> np.ndarray:
    """Per-tag p-thresholds in model order; tags missing from a calibration get +inf (never output)."""
    if isinstance(threshold, dict):
        return np.array([threshold.get(t, math.inf) for t in labels], dtype=np.float64)
    return np.full(len(labels), float(threshold), dtype=np.float64)


def category_vector(labels: Sequence[str], metadata: TagMetadata | None) -> np.ndarray:
    """Category id per model tag; tags unknown to the metadata get -1 (the later upstream's tolerance)."""
    cats = metadata.category if metadata else {}
    return np.array([cats.get(t, UNKNOWN_CATEGORY) for t in labels], dtype=np.int64)


def parse_categories(names: Iterable[str]) -> list[int]:
    """Category names (as given to `-x`) to ids, with a clear error listing the choices."""
    ids = []
    for name in names:
        if name not in CATEGORIES:
            raise ValueError(f"unknown category {name!r}; choose from {' '.join(CATEGORIES)}")
        ids.append(CATEGORIES[name])
    return ids


@dataclass
class TagRules:
    """Everything that turns probabilities into output tags, precomputed for the model's label order.

    Build once per run (or whenever a setting changes), then call `classify` per image.
    """

    labels: list[str]                      # rewritten model labels, model order
    thresholds: np.ndarray                 # (T,) p-thresholds, +inf = never output
    graph: ImplicationGraph | None = None  # None when no metadata is loaded
    mode: str = "off"                      # one of implications.MODES
    excluded: np.ndarray | None = None     # (T,) bool, True = category excluded
    topk: int | None = None                # keep the k most probable tags instead of thresholding

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown implications mode {self.mode!r}; choose from {' '.join(MODES)}")
        if self.mode != "off" and self.graph is None:
            raise ValueError(f"implications mode {self.mode!r} requires tag metadata")

    def active(self) -> np.ndarray:
        """(T,) bool: tags whose probability can change the output (used to skip work in the model)."""
        can_pass = np.isfinite(self.thresholds) & (self.thresholds <= 1.0)
        if self.topk is not None:
            can_pass = np.ones(len(self.labels), dtype=bool)
        if self.excluded is not None:
            can_pass &= ~self.excluded
        if self.graph is None or self.mode in ("off", "remove"):
            return can_pass
        # inherit raises a tag to its antecedents' values, constrain lowers it to its consequents': a
        # passing tag needs the probabilities of its whole implication neighbourhood.
        return self.graph.closure_mask(can_pass, up=self.mode == "inherit",
                                       down=self.mode in ("constrain", "constrain-remove"))

    def classify(self, probs: np.ndarray) -> dict[str, float]:
        """One image's tags: {tag: adjusted probability} in model order (spec §3.2).

        Args:
            probs: (T,) sigmoid probabilities in model order.
        """
        p = np.asarray(probs, dtype=np.float64)
        if self.mode == "inherit":
            p = self.graph.inherit(p)
        elif self.mode in ("constrain", "constrain-remove"):
            p = self.graph.constrain(p)
        if self.topk is None:
            keep = p >= self.thresholds
            if self.excluded is not None:
                keep &= ~self.excluded
        else:  # the k best among the allowed tags (NaN = not computed)
            score = np.where(np.isnan(p), -np.inf, p)
            if self.excluded is not None:
                score[self.excluded] = -np.inf
            best = np.argsort(-score, kind="stable")[: self.topk]
            keep = np.zeros(len(p), dtype=bool)
            keep[best[np.isfinite(score[best])]] = True
        if self.mode in ("remove", "constrain-remove"):
            keep = self.graph.remove_implied(keep)
        return {self.labels[i]: float(p[i]) for i in np.flatnonzero(keep)}


@dataclass
class TagSettings:
    """The user's tag settings for a run or an interactive session (`-t`, `-m`, `-i`, `-x`, `--topk`).

    `rules()` turns them into TagRules; the implication graph is built once (metadata must not change
    after the first call).
    """

    labels: list[str]                 # rewritten model labels, model order
    metadata: TagMetadata | None
    rewrite: Callable[[str], str]
    threshold: Threshold
    mode: str
    exclude: list[int] = field(default_factory=list)
    topk: int | None = None           # `--topk`: the k best tags instead of the threshold

    @cached_property
    def graph(self) -> ImplicationGraph | None:
        return ImplicationGraph(self.labels, self.metadata.implies) if self.metadata is not None else None

    def rules(self) -> TagRules:
        if self.exclude and self.metadata is None:
            raise ValueError("category exclusion requires tag metadata (-m PATH)")
        excluded = np.isin(category_vector(self.labels, self.metadata), self.exclude) if self.exclude else None
        return TagRules(self.labels, threshold_vector(self.labels, self.threshold), self.graph, self.mode, excluded,
                        self.topk)


def format_caption(tags: Mapping[str, float], prefix: str = "", shuffle: bool = False,
                   rng: random.Random | None = None) -> str:
    """The .txt caption: tags in caption spelling joined by ", ", most probable first.

    The original shuffles the order randomly; `shuffle=True` does the same. A non-empty `prefix` goes first
    and the tag equal to it (after caption spelling) is not repeated.
    """
    order = sorted(tags, key=lambda t: (-tags[t], t))
    words = [caption_tag(t) for t in order]
    if shuffle:
        (rng or random).shuffle(words)
    if prefix:
        if prefix in words:
            words.remove(prefix)
        words.insert(0, prefix)
    return ", ".join(words)
