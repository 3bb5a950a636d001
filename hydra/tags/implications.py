"""Tag implications over the transitive implication graph (docs/tag-rules.md), vectorised with numpy.

The tags CSV lists only *direct* implications (`tyrannosaurus_rex -> tyrannosaurid -> ... -> dinosaur`), so
every rule works on the transitive closure, computed once:

- inherit:   p'(t) = max of p over t and every tag that (transitively) implies t.
- constrain: p'(t) = min of p over t and every tag t (transitively) implies.
- remove:    drop every output tag implied by another output tag (only the most specific survive).

The original walks the graph recursively per tag per image; over the closure's (antecedent, consequent)
pairs the same results come out of three numpy reductions, for one image or a batch. No torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MODES = ("inherit", "constrain", "remove", "constrain-remove", "off")

MODE_HELP = {
    "inherit": "Tags inherit the highest probability of the more specific tags that imply them.",
    "constrain": "Tags are constrained to the lowest probability of the more general tags they imply.",
    "remove": "Exclude implied tags from output.",
    "constrain-remove": "Combination of constrain followed by remove.",
    "off": "No implications are applied.",
}


class ImplicationGraph:
    """Transitive implications among the model's labels.

    Consequents that are not model labels are skipped. By default chains through them are followed (a label
    can imply another label through a tag the model does not predict), as JTP-3's CSV graph needs; with
    `through_unknown=False` such a consequent ends the chain, as Hydra 3.5's label graph does (a label's
    entry lists only its direct implications, and a tag that is not a label has no entry). Cycles are
    tolerated (the closure is a reachability set, and a tag is never its own consequent), although the
    shipped data has none.

    Args:
        labels: model tags in model order.
        implies: tag -> direct consequents (tags absent from this mapping imply nothing).
        through_unknown: follow implications through tags that are not model labels.
    """

    def __init__(self, labels: Sequence[str], implies: Mapping[str, Sequence[str]], through_unknown: bool = True):
        self.labels = list(labels)
        self.through_unknown = through_unknown
        index = {t: i for i, t in enumerate(self.labels)}
        pairs = []
        for tag in self.labels:  # breadth-first reachability; ~12k pairs for the real data, milliseconds
            seen, todo = {tag}, list(implies.get(tag, ()))
            while todo:
                c = todo.pop()
                if c in seen:
                    continue
                seen.add(c)
                if c in index:
                    pairs.append((index[tag], index[c]))
                if through_unknown or c in index:
                    todo.extend(implies.get(c, ()))
        pairs.sort(key=lambda ac: (ac[1], ac[0]))
        a = np.array([p[0] for p in pairs], dtype=np.int64)
        c = np.array([p[1] for p in pairs], dtype=np.int64)
        self.antecedent, self.consequent = a, c  # (P,) each: antecedent implies consequent
        # Grouped by consequent (for inherit) and by antecedent (for constrain / remove).
        self._by_c = (c, a, *_groups(c))
        order = np.lexsort((c, a))
        self._by_a = (a[order], c[order], *_groups(a[order]))

    def __len__(self) -> int:
        return len(self.antecedent)

    def inherit(self, p: np.ndarray) -> np.ndarray:
        """Raise each tag to the highest probability among the tags that imply it. p: (..., T)."""
        return _reduce(p, self._by_c, np.maximum)

    def constrain(self, p: np.ndarray) -> np.ndarray:
        """Lower each tag to the lowest probability among the tags it implies. p: (..., T)."""
        return _reduce(p, self._by_a, np.minimum)

    def remove_implied(self, keep: np.ndarray) -> np.ndarray:
        """Drop kept tags implied by another kept tag. keep: (..., T) bool."""
        keep = np.asarray(keep, dtype=bool)
        out = keep.copy()
        _, antecedents, starts, targets = self._by_c
        if starts.size:
            implied = np.logical_or.reduceat(keep[..., antecedents], starts, axis=-1)  # (..., G)
            out[..., targets] &= ~implied
        return out

    def closure_mask(self, mask: np.ndarray, up: bool, down: bool) -> np.ndarray:
        """Extend a (T,) bool mask with every antecedent (up) and/or consequent (down) of its tags."""
        out = mask.copy()
        if up:
            out[self.antecedent[mask[self.consequent]]] = True
        if down:
            out[self.consequent[mask[self.antecedent]]] = True
        return out


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets of runs of equal values in sorted `keys`, and the value of each run."""
    if keys.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return starts, keys[starts]


def _reduce(p: np.ndarray, grouped: tuple, ufunc: np.ufunc) -> np.ndarray:
    """out[..., k] = ufunc(p[k], ufunc over p[j] for each pair (k, j) of the grouping)."""
    _, other, starts, targets = grouped
    out = np.array(p, copy=True)
    if starts.size:
        vals = ufunc.reduceat(out[..., other], starts, axis=-1)  # (..., G)
        out[..., targets] = ufunc(out[..., targets], vals)
    return out

