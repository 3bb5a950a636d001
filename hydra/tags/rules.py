"""Tag vocabulary rules: spelling rewrites, the symmetric threshold scale, metadata and calibration CSVs,
and `classify`, which turns one image's probabilities into the tags to output.

Pure Python + numpy (no torch), so it is tested on the real tag CSV without a model.

Conventions (docs/calibration.md, docs/tag-rules.md):
- Probabilities p are sigmoid outputs in [0, 1]; data files, calibration CSVs and CSV output use p.
- The "symmetric" scale s = 2p - 1 in [-1, 1] is what `-t` and the UIs show (so `-t 0.5` means p >= 0.75).
- Tag names are e621 spelling with underscores; `rewrite_tag` applies the vulva -> pussy rename that the
  original does for diffusion-model compatibility (unless `-O`), consistently to labels, metadata keys,
  implications and calibration tags so that lookups agree.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from hydra.tags import modes
from hydra.tags.implications import MODES, ImplicationGraph
from hydra.tags.rewrite import JTP3_ESCAPES, PROMPT_ESCAPES, Rewriter

# e621 category ids, as the tags CSV stores them. `-x` accepts the names, and the derived subcategories.
CATEGORIES: dict[str, int] = {
    "general": 0, "artist": 1, "contributor": 2, "copyright": 3, "character": 4, "species": 5, "invalid": 6,
    "meta": 7, "lore": 8,
}
CATEGORY_NAMES: dict[int, str] = {v: k for k, v in CATEGORIES.items()}
SUBCATEGORIES = modes.SUBCATEGORIES  # `color` (colour tags among general ones) and `rating` (safe/questionable/...)
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
    """A DictReader over `path` whose rows are read through `_rows`, and the open file (the caller closes it).

    Raises:
        DataFileError: a missing column, or a header that is not UTF-8 text or not CSV.
    """
    f = open(path, encoding="utf-8-sig", newline="")  # -sig: tolerate a BOM written by spreadsheet tools
    reader = csv.DictReader(f)
    try:
        with _read_errors(path, reader):
            fieldnames = reader.fieldnames
    except DataFileError:
        f.close()
        raise
    missing = [c for c in required if c not in (fieldnames or [])]
    if missing:
        f.close()
        raise DataFileError(f"{path}: line 1: missing column(s) {', '.join(missing)} "
                            f"(expected a header with {', '.join(required)})")
    return reader, f


@contextlib.contextmanager
def _read_errors(path: str | os.PathLike, reader: csv.DictReader) -> Iterator[None]:
    """Turn the csv module's and the decoder's errors while reading into a DataFileError naming file and line."""
    try:
        yield
    except (UnicodeDecodeError, csv.Error) as e:
        line = reader.reader.line_num  # lines read, counting the failed one (DictReader's own count lags behind)
        if isinstance(e, csv.Error):
            raise DataFileError(f"{path}: line {line}: malformed CSV: {e}") from None
        # the decoder reads ahead in blocks: the bad byte is somewhere after the lines parsed so far
        raise DataFileError(f"{path}: after line {line}: not UTF-8 text ({e.reason}); "
                            "save the file as UTF-8") from None


def _rows(path: str | os.PathLike, reader: csv.DictReader) -> Iterator[dict[str, str]]:
    """The reader's rows; a read error becomes a DataFileError naming the file and line."""
    with _read_errors(path, reader):
        yield from reader


@dataclass
class TagMetadata:
    """Per-tag category id and direct implications, keyed by (rewritten) tag name."""

    category: dict[str, int] = field(default_factory=dict)
    implies: dict[str, tuple[str, ...]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # ids of categories beyond e621's (a model's own names)

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
        for row in _rows(path, reader):
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

    Blank thresholds skip the row, as the original's reader does; other columns are ignored.

    Raises:
        DataFileError: on a missing column or a threshold outside [0, 1], with the line number.
    """
    thresholds: dict[str, float] = {}
    reader, f = _open_csv(path, ("tag", "threshold"))
    with f:
        for row in _rows(path, reader):
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


def parse_categories(names: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """Category names (as given to `-x`) checked against the choices: e621's categories, the subcategories, and
    `extra` (categories a model names beyond e621's)."""
    names, extra = list(names), list(extra)
    choices = [*CATEGORIES, *(c for c in extra if c not in CATEGORIES), *SUBCATEGORIES]
    for name in names:
        if name not in choices:
            raise ValueError(f"unknown category {name!r}; choose from {' '.join(choices)}")
    return names


def category_names(labels: Sequence[str], metadata: TagMetadata | None) -> list[str]:
    """Category name per model tag ("unassigned" for tags the metadata does not know)."""
    names = {**CATEGORY_NAMES, **metadata.names} if metadata is not None else CATEGORY_NAMES
    return [names.get(int(i), "unassigned") for i in category_vector(labels, metadata)]


@dataclass
class TagRules:
    """Everything that turns probabilities into output tags, precomputed for the model's label order.

    Build once per run (or whenever a setting changes), then call `classify` per image. Two orders of work,
    as the families define them:
    - JTP-3 (`after=False`): the implication mode adjusts the probabilities first (inherit / constrain), then
      thresholds (or the top k), exclusive groups, exclusions, and `remove` drop tags;
    - Hydra 3.5 (`after=True`): thresholds (or the top k) first, then upstream's pipeline over the passing
      tags (`hydra.tags.modes`): qualify by mode, groups, exclusions, the value step, the remove step.
    """

    labels: list[str]                      # rewritten model labels, model order
    thresholds: np.ndarray                 # (T,) p-thresholds, +inf = never output
    graph: ImplicationGraph | None = None  # None when no metadata is loaded
    mode: str = "off"                      # one of the family's implication modes
    excluded: np.ndarray | None = None     # (T,) bool, True = excluded (category or tag)
    topk: int | None = None                # keep the k most probable tags instead of thresholding
    groups: Sequence[modes.BoundGroup] = ()  # exclusive groups, in order (`modes.bind_groups`)
    after: bool = False                    # implications act on the passing tags (Hydra 3.5)
    max_tags: int | None = None            # `--max-tags`: at most the N most probable of the output tags

    def __post_init__(self) -> None:
        choices = modes.MODES if self.after else MODES
        if self.mode not in choices:
            raise ValueError(f"unknown implications mode {self.mode!r}; choose from {' '.join(choices)}")
        if self.mode != "off" and self.graph is None:
            raise ValueError(f"implications mode {self.mode!r} requires tag metadata")
        if self.graph is None and self.groups:  # groups also drop the tags implying a removed member
            self.graph = ImplicationGraph(self.labels, {})

    def active(self) -> np.ndarray:
        """(T,) bool: tags whose probability can change the output (used to skip work in the model)."""
        if self.after:
            thresholds = np.zeros(len(self.labels)) if self.topk is not None else self.thresholds
            return modes.active_mask(thresholds, self.graph or ImplicationGraph(self.labels, {}), self.mode,
                                     self.groups, self.excluded)
        can_pass = np.isfinite(self.thresholds) & (self.thresholds <= 1.0)
        if self.topk is not None:
            can_pass = np.ones(len(self.labels), dtype=bool)
        if self.excluded is not None:
            can_pass &= ~self.excluded
        for g in self.groups:
            can_pass[np.concatenate([g.required, g.excepted, g.members])] = True
        if self.graph is None or self.mode in ("off", "remove"):
            return can_pass
        # inherit raises a tag to its antecedents' values, constrain lowers it to its consequents': a
        # passing tag needs the probabilities of its whole implication neighbourhood.
        return self.graph.closure_mask(can_pass, up=self.mode == "inherit",
                                       down=self.mode in ("constrain", "constrain-remove"))

    def classify(self, probs: np.ndarray) -> dict[str, float]:
        """One image's tags: {tag: adjusted probability} in model order.

        Args:
            probs: (T,) sigmoid probabilities in model order (NaN = not computed, never output).
        """
        p = np.asarray(probs, dtype=np.float64)  # float32 probabilities and thresholds compare exactly here
        tags = self._classify_after(p) if self.after else self._classify_before(p)
        return cap_tags(tags, self.max_tags)

    def _classify_before(self, p: np.ndarray) -> dict[str, float]:
        if self.mode == "inherit":
            p = self.graph.inherit(p)
        elif self.mode in ("constrain", "constrain-remove"):
            p = self.graph.constrain(p)
        keep = self._passing(p)
        for g in self.groups:
            keep = modes.apply_group(keep, keep, p, g, self.graph)
        if self.excluded is not None:
            keep &= ~self.excluded
        if self.mode in ("remove", "constrain-remove"):
            keep = self.graph.remove_implied(keep)
        return {self.labels[i]: float(p[i]) for i in np.flatnonzero(keep)}

    def _passing(self, p: np.ndarray) -> np.ndarray:
        """p >= threshold, or the k best among the tags not excluded (NaN = not computed)."""
        if self.topk is None:
            return p >= self.thresholds
        score = np.where(np.isnan(p), -np.inf, p)
        if self.excluded is not None:
            score[self.excluded] = -np.inf
        best = np.argsort(-score, kind="stable")[: self.topk]
        keep = np.zeros(len(p), dtype=bool)
        keep[best[np.isfinite(score[best])]] = True
        return keep

    def _classify_after(self, p: np.ndarray) -> dict[str, float]:
        graph = self.graph or ImplicationGraph(self.labels, {})
        passing = self._passing(p)
        present = modes.qualify(passing, graph, self.mode)
        for g in self.groups:
            present = modes.apply_group(present, passing, p, g, graph)
        if self.excluded is not None:
            present &= ~self.excluded
        values = modes.adjust_values(p, present, graph, self.mode)
        if self.mode in ("remove", "constrain-remove", "enforce-remove"):
            present = graph.remove_implied(present)
        return {self.labels[i]: float(values[i]) for i in np.flatnonzero(present)}


def tag_key(name: str) -> str:
    """One spelling to compare tag names in: e621's `pokemon_(species)`, the caption's `pokemon \\(species\\)` and
    a typed `Pokemon (species)` are all `pokemon (species)` (escapes dropped, underscores as spaces, whitespace
    collapsed, case folded)."""
    return " ".join(name.replace("\\", "").replace("_", " ").split()).casefold()


class TagNames:
    """The model label a user means by a tag name, in e621 spelling or in caption spelling.

    A name matches, in this order: a label exactly; the label after the family's rename (`vulva` -> `pussy`);
    a label or a label's caption spelling (alias and category prefix included) by `tag_key`. Used by every
    list of tags a user types: exclusions (`--exclude-tag`, `-X`, `--undesired-tags`), replacements (`-a`,
    `--replace-tag`) and the caption's first items (`-p`, `--trigger-from-folder`).

    Args:
        labels: rewritten model labels.
        rewrite: the family's rename.
        spell: label -> caption spelling (a `CaptionFormat.name`), or None to match label names only.
    """

    def __init__(self, labels: Iterable[str], rewrite: Callable[[str], str] = lambda t: t,
                 spell: Callable[[str], str] | None = None):
        self.labels = list(labels)
        self._known = set(self.labels)
        self._rewrite = rewrite
        self._by_key: dict[str, str] = {}
        for t in self.labels:
            self._by_key.setdefault(tag_key(t), t)
        if spell is not None:
            for t in self.labels:
                self._by_key.setdefault(tag_key(spell(t)), t)

    def find(self, name: str) -> str | None:
        """The label `name` means, or None."""
        if name in self._known:
            return name
        renamed = self._rewrite(name)
        if renamed in self._known:
            return renamed
        return self._by_key.get(tag_key(renamed))

    def resolve(self, names: Iterable[str], what: str = "tags", warn: Callable[[str], None] | None = None) -> list[str]:
        """The labels of `names`, in order, without repeats; names that are no label are left out and named in
        one warning line (`what` says which option they came from), given to `warn` (default: stderr)."""
        found, unknown = [], []
        for name in dict.fromkeys(names):
            label = self.find(name)
            (found if label is not None else unknown).append(label if label is not None else name)
        if unknown:
            from hydra.common import log

            shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            (warn or log)(f"warning: {what}: {len(unknown)} name{'s' * (len(unknown) != 1)} the model has no tag for, "
                f"ignored: {shown}")
        return list(dict.fromkeys(found))


def split_items(text: str, rewriter: Rewriter) -> list[str]:
    """`-p TEXT` as caption items: split on commas and on the caption separator (its visible part, a tab or a
    newline; whitespace when the separator is blank, e.g. under `-u`), surrounding spaces and empty items
    dropped, so `"trigger, anthro, "` is two items."""
    return [part.strip() for item in rewriter.split_prefix(text) for part in item.split(",") if part.strip()]


@dataclass(frozen=True)
class CaptionFormat:
    """How a run spells and orders caption tags: the family's style plus `-a/-A`, `-B`, `-u`, `-P`,
    `--separator`.

    Attributes:
        rewriter: label -> caption text (aliases, category prefixes, underscores, escapes, separator).
        order: "probability" (most probable first, JTP-3) or "model" (model order, Hydra 3.5).
    """

    rewriter: Rewriter = field(default_factory=lambda: Rewriter([], [], escape=JTP3_ESCAPES))
    order: str = "probability"
    rename: Callable[[str], str] = field(default=lambda t: t, compare=False)

    def name(self, tag: str) -> str:
        return self.rewriter.name(tag)

    @property
    def separator(self) -> str:
        return self.rewriter.separator

    @cached_property
    def names(self) -> TagNames:
        return TagNames(self.rewriter._names, self.rename, self.name)

    def first_items(self, prefix: str = "", first: Sequence[str] = ()) -> list[str]:
        """The items a caption starts with: `first` (e.g. a folder's trigger word, each one item) then the items
        of `prefix` (`split_items`); an item that names a tag is written in that tag's caption spelling, and
        repeats are dropped."""
        items = [*(f.strip() for f in first if f.strip()), *split_items(prefix, self.rewriter)]
        out, seen = [], set()
        for item in items:
            label = self.names.find(item)
            text = self.name(label) if label is not None else item
            if tag_key(text) not in seen:
                seen.add(tag_key(text))
                out.append(text)
        return out

    def caption(self, tags: Mapping[str, float], prefix: str = "", shuffle: bool = False,
                rng: random.Random | None = None, first: Sequence[str] = ()) -> str:
        """The caption: the first items (`first_items(prefix, first)`), then the tags in this format's order, or
        shuffled (the original JTP-3 always shuffles; `--shuffle`); a tag the first items already name (compared
        by `tag_key`, so in any spelling) is not repeated."""
        order = [t for t, _ in ranked(tags)] if self.order == "probability" else list(tags)
        items = self.first_items(prefix, first)
        skip = {tag_key(i) for i in items}
        names = [n for n in map(self.name, order) if tag_key(n) not in skip]
        if shuffle:
            (rng or random).shuffle(names)
        return self.separator.join(items + names)


def caption_format(labels: Sequence[str], categories: Sequence[str], style, *, aliases: Mapping[str, str] | None = None,
                   category_prefixes: Mapping[str, str] | None = None, underscores: bool = False,
                   prompt: bool = False, separator: str | None = None,
                   rename: Callable[[str], str] = lambda t: t) -> CaptionFormat:
    """A run's caption format from the family's `CaptionStyle` and the spelling flags (`separator` None: ", ",
    or " " when underscores are kept)."""
    escape = "".join(dict.fromkeys(style.escape + (PROMPT_ESCAPES if prompt else "")))
    rewriter = Rewriter(labels, categories, aliases, category_prefixes, underscores=underscores, escape=escape,
                        separator=separator)
    return CaptionFormat(rewriter, style.order, rename)


@dataclass
class TagSettings:
    """The user's tag settings for a run or an interactive session (`-t`, `-m`, `-i`, `-x`, `--topk`, groups,
    tag exclusion, caption spelling).

    `rules()` turns them into TagRules; the implication graph is built once (metadata must not change
    after the first call).
    """

    labels: list[str]                 # rewritten model labels, model order
    metadata: TagMetadata | None
    rewrite: Callable[[str], str]
    threshold: Threshold
    mode: str
    exclude: list[str | int] = field(default_factory=list)  # categories (names or e621 ids) and subcategories
    topk: int | None = None           # `--topk`: the k best tags instead of the threshold
    exclude_tags: list[str] = field(default_factory=list)  # tag names (`--exclude-tag`, `-X`)
    groups: list[modes.ExclusiveGroup] = field(default_factory=list)  # `-g`, `-G`
    after: bool = False               # the family's implication modes act after thresholding (Hydra 3.5)
    captions: CaptionFormat = field(default_factory=CaptionFormat)
    category_thresholds: dict[str, float] = field(default_factory=dict)  # `--category-threshold`: name -> p
    max_tags: int | None = None       # `--max-tags`: at most the N most probable output tags

    @cached_property
    def graph(self) -> ImplicationGraph | None:
        if self.metadata is None:
            return None
        return ImplicationGraph(self.labels, self.metadata.implies, through_unknown=not self.after)

    def excluded(self) -> np.ndarray | None:
        """(T,) bool of the excluded tags (categories, subcategories, names), or None."""
        if not (self.exclude or self.exclude_tags):
            return None
        if self.exclude and self.metadata is None:
            raise ValueError("category exclusion requires tag metadata (-m PATH)")
        exclude = [CATEGORY_NAMES.get(c, str(c)) if isinstance(c, int) else c for c in self.exclude]
        return modes.exclusion_mask(self.labels, category_names(self.labels, self.metadata), self.exclude_tags,
                                    exclude)

    def rules(self, **changes) -> TagRules:
        """TagRules of these settings, or of a copy with some fields changed (the web UI's per-request
        threshold, mode, exclusions or top k); the implication graph is shared."""
        s = dataclasses.replace(self, **changes) if changes else self
        groups = modes.bind_groups(s.groups, s.labels)
        thresholds = threshold_vector(s.labels, s.threshold)
        if s.category_thresholds:
            thresholds = category_threshold_vector(s.labels, s.metadata, thresholds, s.category_thresholds)
        return TagRules(s.labels, thresholds, self.graph, s.mode, s.excluded(), s.topk, groups, s.after, s.max_tags)


def category_threshold_vector(labels: Sequence[str], metadata: TagMetadata | None, thresholds: np.ndarray,
                              by_category: Mapping[str, float]) -> np.ndarray:
    """`--category-threshold`: every tag of a category gets that category's p-threshold instead of its own
    (a calibration's too); a subcategory (`color`, `rating`) is more specific than its category and wins.

    Raises:
        ValueError: no tag metadata (categories are unknown).
    """
    if metadata is None:
        raise ValueError("--category-threshold needs tag categories (-m PATH, or a model or vocabulary with them)")
    out = np.array(thresholds, dtype=np.float64)
    names = category_names(labels, metadata)
    for cat, p in sorted(by_category.items(), key=lambda kv: kv[0] in SUBCATEGORIES):
        if cat in SUBCATEGORIES:
            mask = np.array([modes.subcategory(t, c) == cat for t, c in zip(labels, names)], dtype=bool)
        else:
            mask = np.array([c == cat for c in names], dtype=bool)
        out[mask] = p
    return out


def cap_tags(tags: dict[str, float], limit: int | None) -> dict[str, float]:
    """`--max-tags`: the `limit` most probable tags (ties by name), keeping the given (model) order."""
    if limit is None or len(tags) <= limit:
        return tags
    keep = {t for t, _ in ranked(tags)[:limit]}
    return {t: p for t, p in tags.items() if t in keep}


def ranked(tags: Mapping[str, float]) -> list[tuple[str, float]]:
    """(tag, p) pairs most probable first, ties by name: the one output order of captions, lists and APIs."""
    return sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))


def format_caption(tags: Mapping[str, float], prefix: str = "", shuffle: bool = False,
                   rng: random.Random | None = None) -> str:
    """The JTP-3 .txt caption (the default `CaptionFormat`): caption spelling, most probable first, joined by
    ", "; a non-empty `prefix` goes first and the tag equal to it is not repeated."""
    return CaptionFormat().caption(tags, prefix, shuffle, rng)
