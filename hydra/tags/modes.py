"""Hydra 3.5 classification of one image: thresholds, the ten implication modes, exclusive groups, exclusions.

Upstream's `classify_output` runs these operators on {tag: p} in model order:

1. qualify by mode: `preserve`/`inherit`/`constrain` keep the passing tags (p >= threshold) and every tag
   they imply; `enforce*` keep a passing tag only if every tag it implies passes too; `remove`,
   `constrain-remove` and `off` keep the passing tags;
2. exclusive groups, in the order given;
3. exclusions (by tag, by category, and by the derived subcategories `rating` and `color`);
4. the value step: `inherit`/`enforce-inherit` raise each present tag to the highest p of the present tags
   that imply it, `constrain`/`constrain-remove`/`enforce-constrain` lower it to the lowest p of the present
   tags it implies;
5. `remove`/`constrain-remove`/`enforce-remove` drop every tag implied by a present tag.

"Implies" is transitive through model labels only: a consequent that is not a model label ends the chain
(build the graph with `label_graph`; cycles are broken as `ImplicationGraph` says, docs/tag-rules.md). A
label removed from the output (below threshold, grouped out, excluded) does not break a chain.

One deliberate deviation: upstream's `enforce*` modes crash (KeyError) on most images, because the walk
deletes antecedents that an earlier failing tag already deleted; we remove "if present" (see `qualify`).

Every step is a numpy reduction over the graph's closure pairs, so an image costs well under a millisecond
for 8,886 tags. No torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hydra.tags.implications import ImplicationGraph

MODES = ("preserve", "inherit", "constrain", "enforce", "enforce-inherit", "enforce-constrain", "enforce-remove",
         "remove", "constrain-remove", "off")
DEFAULT_MODE = "inherit"

MODE_HELP = {
    "preserve": "Also output every tag implied by an output tag; probabilities stay as predicted.",
    "inherit": "Also output implied tags; a tag takes the highest probability among the output tags implying it.",
    "constrain": "Also output implied tags; a tag is capped at the lowest probability among the tags it implies.",
    "enforce": "Drop a tag unless every tag it implies also passes its threshold; probabilities unchanged.",
    "enforce-inherit": "As enforce, then raise each tag to the highest probability of the tags implying it.",
    "enforce-constrain": "As enforce, then cap each tag at the lowest probability of the tags it implies.",
    "enforce-remove": "As enforce, then output only the most specific tags (drop tags implied by others).",
    "remove": "Output only the most specific passing tags: drop those implied by another passing tag.",
    "constrain-remove": "Cap each passing tag at the lowest probability of the tags it implies, then drop those.",
    "off": "Thresholds only: implications are ignored.",
}

_QUALIFY = {"preserve": "closure", "inherit": "closure", "constrain": "closure", "enforce": "enforce",
            "enforce-inherit": "enforce", "enforce-constrain": "enforce", "enforce-remove": "enforce",
            "remove": "passing", "constrain-remove": "passing", "off": "passing"}
_VALUE = {"inherit": "inherit", "enforce-inherit": "inherit",
          "constrain": "constrain", "constrain-remove": "constrain", "enforce-constrain": "constrain"}
_REMOVE = frozenset({"remove", "constrain-remove", "enforce-remove"})

# Label categories listed by upstream's CLI; a label may carry any string (extensions), so `-C` also accepts
# the categories that occur among the labels.
CATEGORIES = ("general", "artist", "contributor", "copyright", "character", "species", "invalid", "meta", "lore")
SUBCATEGORIES = ("color", "rating")
RATING_TAGS = frozenset({"safe", "questionable", "explicit"})

# Upstream's exact colour prefix list is not known to us. This list is our own compilation of e621 colour
# words as they start general tags (blue_eyes, two_tone_body, countershading, dark_skin, ...); the suffix and
# name exceptions are upstream's. Prefixes that mostly start non-colour tags (gold_ -> gold_(metal),
# silver_ -> silver_(metal)) are left out on purpose.
COLOR_PREFIXES = (
    "amber_", "beige_", "black_", "blond_", "blonde_", "blue_", "brown_", "countershad", "cream_", "cyan_",
    "dark_", "gray_", "green_", "grey_", "lavender_", "light_", "magenta_", "maroon_", "monotone_",
    "multicolored_", "orange_", "pink_", "purple_", "rainbow_", "red_", "tan_", "teal_", "three_tone_",
    "two_tone_", "violet_", "white_", "yellow_",
)
COLOR_SUFFIX_EXCEPTIONS = ("_background", "_border", "_outline", "_bars", "_flag")
COLOR_NAME_EXCEPTIONS = frozenset({"dark_room", "light_beam", "light_bulb", "rainbow_symbol", "tan_line"})


def check_mode(mode: str) -> str:
    """Return `mode` if it is one of MODES, else raise a ValueError listing them."""
    if mode not in MODES:
        raise ValueError(f"unknown implications mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


def label_graph(labels: Sequence[str], implies: Mapping[str, Sequence[str]]) -> ImplicationGraph:
    """Hydra 3.5's label graph: transitive implications that end at the first tag which is not a label."""
    return ImplicationGraph(labels, implies, through_unknown=False)


# ---------------------------------------------------------------------------------------------------
# Subcategories and exclusions


def is_rating_tag(tag: str, category: str) -> bool:
    """The derived `rating` subcategory: `safe`, `questionable`, `explicit` in `meta`."""
    return category == "meta" and tag in RATING_TAGS


def is_color_tag(tag: str, category: str) -> bool:
    """The derived `color` subcategory: general tags that start with a colour word (see COLOR_PREFIXES).

    Backgrounds, borders, outlines, bars, flags and a few names (`dark_room`, `light_bulb`, ...) describe
    things other than a character's colouring and are not colour tags.
    """
    return (category == "general" and tag.startswith(COLOR_PREFIXES) and not tag.endswith(COLOR_SUFFIX_EXCEPTIONS)
            and tag not in COLOR_NAME_EXCEPTIONS)


def subcategory(tag: str, category: str) -> str | None:
    """`rating`, `color` or None."""
    if is_rating_tag(tag, category):
        return "rating"
    return "color" if is_color_tag(tag, category) else None


def exclusion_mask(labels: Sequence[str], categories: Sequence[str], tags: Iterable[str] = (),
                   exclude_categories: Iterable[str] = ()) -> np.ndarray:
    """Which labels `-x/-X` (tags) and `-C` (categories and subcategories) exclude.

    Tag names that are not labels are ignored (excluding a tag the model never outputs changes nothing; use
    `unknown_tags` to warn about them).

    Args:
        labels: model labels in model order.
        categories: the category name of each label.
        tags: tag names to exclude.
        exclude_categories: category or subcategory names to exclude.

    Returns:
        (T,) bool, True = excluded.

    Raises:
        ValueError: a category that is neither known nor used by any label.
    """
    cats = set(exclude_categories)
    unknown = sorted(cats - set(CATEGORIES) - set(SUBCATEGORIES) - set(categories))
    if unknown:
        choices = " ".join(dict.fromkeys((*CATEGORIES, *sorted(set(categories) - set(CATEGORIES)), *SUBCATEGORIES)))
        raise ValueError(f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                         f"choose from {choices}")
    names = set(tags)
    return np.array([t in names or c in cats or ("rating" in cats and is_rating_tag(t, c))
                     or ("color" in cats and is_color_tag(t, c)) for t, c in zip(labels, categories)], dtype=bool)


def unknown_tags(names: Iterable[str], labels: Sequence[str]) -> list[str]:
    """The names that are not labels, in first-seen order (for a warning about exclude lists or aliases)."""
    known = set(labels)
    return [t for t in dict.fromkeys(names) if t not in known]


# ---------------------------------------------------------------------------------------------------
# Exclusive groups


@dataclass(frozen=True)
class ExclusiveGroup:
    """`-g anthro: male female`: when the precondition holds, only the most probable member survives.

    Attributes:
        required: tags that must all pass (present with p >= threshold) for the group to apply.
        excepted: tags none of which may pass (`!X` in the precondition).
        members: at least two distinct tags, in the order given (ties go to the first).
    """

    required: tuple[str, ...]
    excepted: tuple[str, ...]
    members: tuple[str, ...]


def parse_group(items: Sequence[str]) -> ExclusiveGroup:
    """Parse one group: the items up to the last one ending in `:` are the precondition, the rest the members.

    In the precondition `X:` and `X` require X, `!X` (or `!X:`) requires that X does not pass, and a bare `:`
    is skipped. Members are deduplicated in order.

    Raises:
        ValueError: fewer than two distinct members, or an empty `!`.
    """
    last = max((i for i, item in enumerate(items) if item.endswith(":")), default=-1)
    required, excepted = [], []
    for item in items[: last + 1]:
        name = item[:-1] if item.endswith(":") else item
        if not name:
            continue
        if name.startswith("!"):
            if len(name) == 1:
                raise ValueError(f"exclusive group {' '.join(items)!r}: '!' must be followed by a tag")
            excepted.append(name[1:])
        else:
            required.append(name)
    members = tuple(dict.fromkeys(items[last + 1:]))
    if len(members) < 2:
        raise ValueError(f"exclusive group {' '.join(items)!r} needs at least 2 distinct tags after its "
                         f"precondition (e.g. 'anthro: male female'), got {len(members)}")
    return ExclusiveGroup(tuple(required), tuple(excepted), members)


@dataclass(frozen=True)
class BoundGroup:
    """An ExclusiveGroup as label indices (int64 arrays)."""

    required: np.ndarray
    excepted: np.ndarray
    members: np.ndarray


def bind_groups(groups: Iterable[ExclusiveGroup], labels: Sequence[str], strict: bool = True) -> list[BoundGroup]:
    """Resolve group tag names to label indices.

    Upstream's behaviour for names that are not labels is not known. Strict (the default) raises, since a
    typo would otherwise silently disable a group. Non-strict gives names that are not labels the meaning
    "never present": a group with such a required tag never applies (it is dropped), such excepted tags and
    members are ignored.

    Raises:
        ValueError: strict, and a group names tags that are not labels (they are listed).
    """
    index = {t: i for i, t in enumerate(labels)}
    bound = []
    for g in groups:
        missing = [t for t in (*g.required, *g.excepted, *g.members) if t not in index]
        if missing and strict:
            raise ValueError(f"exclusive group {_group_text(g)!r} names tags that are not model labels: "
                             f"{', '.join(dict.fromkeys(missing))}")
        if any(t not in index for t in g.required):
            continue
        bound.append(BoundGroup(*(np.array([index[t] for t in names if t in index], dtype=np.int64)
                                  for names in (g.required, g.excepted, g.members))))
    return bound


def _group_text(g: ExclusiveGroup) -> str:
    pre = [*g.required, *(f"!{t}" for t in g.excepted)]
    return " ".join([*pre[:-1], f"{pre[-1]}:", *g.members] if pre else g.members)


def apply_group(present: np.ndarray, passing: np.ndarray, p: np.ndarray, group: BoundGroup,
                graph: ImplicationGraph) -> np.ndarray:
    """One exclusive group over one image.

    Args:
        present: (T,) bool, the tags currently in the output.
        passing: (T,) bool, p >= threshold.
        p: (T,) probabilities.
        group: the group.
        graph: the label graph.

    Returns:
        (T,) bool, the new `present`: every present member except the most probable removed, together with
        every present tag that implies a removed member.
    """
    ok = present & passing
    if not ok[group.required].all() or ok[group.excepted].any():
        return present
    members = group.members[present[group.members]]
    if members.size < 2:
        return present
    removed = np.zeros_like(present)
    removed[members] = True
    removed[members[np.argmax(p[members])]] = False  # argmax: the first member on ties
    return present & ~graph.closure_mask(removed, up=True, down=False)


# ---------------------------------------------------------------------------------------------------
# The pipeline


def qualify(passing: np.ndarray, graph: ImplicationGraph, mode: str) -> np.ndarray:
    """Step 1: the tags a mode keeps before groups and exclusions. passing: (T,) bool -> (T,) bool.

    Upstream's enforce walk deletes each failing tag's antecedents with `del`, which raises KeyError when an
    earlier failing tag already deleted one (for nearly every image when labels are sorted by name). We
    remove "if present" instead, a deliberate fix: the result is {t passing : every tag t implies passes}.
    """
    kind = _QUALIFY[check_mode(mode)]
    if kind == "closure":
        return graph.closure_mask(passing, up=False, down=True)
    if kind == "enforce":
        return passing & ~graph.closure_mask(~passing, up=True, down=False)
    return passing.copy()


def adjust_values(p: np.ndarray, present: np.ndarray, graph: ImplicationGraph, mode: str) -> np.ndarray:
    """Step 4: inherit (max over present antecedents) or constrain (min over present consequents).

    Absent tags are masked to -inf / +inf so that only present tags contribute, while the closure still
    reaches through them. Returns (T,) with the dtype of p; only the present entries are meaningful.
    """
    step = _VALUE.get(mode)
    if step == "inherit":
        return graph.inherit(np.where(present, p, -np.inf))
    if step == "constrain":
        return graph.constrain(np.where(present, p, np.inf))
    return p


def classify_output(p: np.ndarray, thresholds: np.ndarray, graph: ImplicationGraph, mode: str = DEFAULT_MODE,
                    groups: Sequence[BoundGroup] = (), excluded: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One image's output tags.

    Args:
        p: (T,) float32 probabilities in model order.
        thresholds: (T,) thresholds (`p >= threshold` passes; +inf never does).
        graph: the label graph over the same T labels (`label_graph`).
        mode: one of MODES.
        groups: exclusive groups, applied in order.
        excluded: (T,) bool, True = never output (None = nothing excluded).

    Returns:
        (indices, values): the output tags' label indices, ascending (model order), and their values.
    """
    p = np.asarray(p)
    passing = p >= thresholds
    present = qualify(passing, graph, mode)
    for g in groups:
        present = apply_group(present, passing, p, g, graph)
    if excluded is not None:
        present &= ~excluded
    values = adjust_values(p, present, graph, mode)
    if mode in _REMOVE:
        present = graph.remove_implied(present)
    idx = np.flatnonzero(present)
    return idx, values[idx]


def active_mask(thresholds: np.ndarray, graph: ImplicationGraph, mode: str = DEFAULT_MODE,
                groups: Sequence[BoundGroup] = (), excluded: np.ndarray | None = None) -> np.ndarray:
    """Which tags' probabilities can change the output (the model may skip the rest and fill in anything).

    Conservative (the exact set depends on p); a tag is active if its value can be output or feed another
    output value, or if its passing can change which tags are output.

    Returns:
        (T,) bool.
    """
    up = lambda m: graph.closure_mask(m, up=True, down=False)
    down = lambda m: graph.closure_mask(m, up=False, down=True)
    can_pass = np.asarray(thresholds) <= 1.0  # p is a probability; +inf / NaN never pass
    kind = _QUALIFY[check_mode(mode)]
    possible = down(can_pass) if kind == "closure" else can_pass & ~up(~can_pass) if kind == "enforce" else can_pass
    if excluded is not None:
        possible &= ~excluded  # excluded tags are absent by the value and remove steps
    out = possible.copy()  # may be output
    value, presence = out.copy(), out.copy()  # whose value / whose presence matters
    if _VALUE.get(mode) == "inherit":
        value |= up(out) & possible
    elif _VALUE.get(mode) == "constrain":
        value |= down(out) & possible
    presence |= value
    if mode in _REMOVE:
        presence |= up(out) & possible
    for g in groups:  # before exclusions: excluded members still compete and preconditions still count
        presence[np.concatenate([g.required, g.excepted, g.members])] = True
        value[g.members] = True
    # A tag's presence after qualifying depends on whether it passes and, by mode, its antecedents or
    # consequents pass.
    deps = up(presence) if kind == "closure" else down(presence) if kind == "enforce" else presence
    return value | (deps & can_pass)


@dataclass
class OutputRules:
    """Everything that turns one image's probabilities into output tags, bound to the label order.

    Build once per run, then call `classify` per image.

    Attributes:
        labels: model labels in model order.
        thresholds: (T,) thresholds (`embedded_thresholds`).
        graph: the label graph (`label_graph(labels, implies)`).
        mode: one of MODES.
        groups: exclusive groups, applied in order.
        excluded: (T,) bool (`exclusion_mask`), or None.
        strict_groups: raise on group tags that are not labels (see `bind_groups`).
    """

    labels: Sequence[str]
    thresholds: np.ndarray
    graph: ImplicationGraph
    mode: str = DEFAULT_MODE
    groups: Sequence[ExclusiveGroup] = ()
    excluded: np.ndarray | None = None
    strict_groups: bool = True

    def __post_init__(self) -> None:
        check_mode(self.mode)
        self.labels = list(self.labels)
        assert self.graph.labels == self.labels, "the graph must be built over the same labels, in order"
        assert len(self.thresholds) == len(self.labels), (len(self.thresholds), len(self.labels))
        self.bound_groups = bind_groups(self.groups, self.labels, self.strict_groups)

    def classify_indices(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices, values) of the output tags for p (T,) float32; see `classify_output`."""
        return classify_output(p, self.thresholds, self.graph, self.mode, self.bound_groups, self.excluded)

    def classify(self, p: np.ndarray) -> dict[str, float]:
        """{tag: value} in model order for p (T,) float32."""
        idx, values = self.classify_indices(p)
        return {self.labels[i]: float(v) for i, v in zip(idx.tolist(), values.tolist())}

    def active(self) -> np.ndarray:
        """(T,) bool: tags whose probability can change the output; see `active_mask`."""
        return active_mask(self.thresholds, self.graph, self.mode, self.bound_groups, self.excluded)
