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


# Above this many closure pairs (a long chain or a broken-up ring of thousands of tags: O(T^2)), the graph
# propagates values level by level over its direct edges instead of reducing over the closure.
MAX_CLOSURE_PAIRS = 1 << 20


class ImplicationGraph:
    """Transitive implications among the model's labels.

    Consequents that are not model labels are skipped. By default chains through them are followed (a label
    can imply another label through a tag the model does not predict), as JTP-3's CSV graph needs; with
    `through_unknown=False` such a consequent ends the chain, as Hydra 3.5's label graph does (a label's
    entry lists only its direct implications, and a tag that is not a label has no entry).

    Cycles (`a -> b -> a`; the shipped data has none) are reported once on stderr and broken by a fixed rule
    (docs/tag-rules.md): the tags of a cycle imply one another in model order only (tags the model lacks come
    after all labels, by name): the first implies the second, and so on; implications into and out of the
    cycle stay. `cycles` lists them. A tag never implies itself.

    Small closures (the real data: ~12k pairs) are kept as (antecedent, consequent) pairs and every operation
    is one numpy reduction over them; a closure over MAX_CLOSURE_PAIRS (a chain of thousands of tags) is never
    built: values are then propagated level by level over the direct edges, in topological order, with
    memory linear in the edges.

    Args:
        labels: model tags in model order.
        implies: tag -> direct consequents (tags absent from this mapping imply nothing).
        through_unknown: follow implications through tags that are not model labels.
    """

    def __init__(self, labels: Sequence[str], implies: Mapping[str, Sequence[str]], through_unknown: bool = True):
        self.labels = list(labels)
        self.through_unknown = through_unknown
        nodes, edges = _direct_graph(self.labels, implies, through_unknown)
        self.cycles = _break_cycles(nodes, edges)  # removes the ignored edges from `edges`
        if self.cycles and _first_report(self.cycles):
            from hydra.common import log

            shown = "; ".join(" -> ".join([*c[:6], c[0]] if len(c) <= 6 else [*c[:6], f"... ({len(c)} tags)"])
                              for c in self.cycles[:10])
            more = f"; and {len(self.cycles) - 10} more" if len(self.cycles) > 10 else ""
            log(f"warning: the tag implications hold {len(self.cycles)} cycle(s); the tags of each are taken to imply "
                f"one another in model order only (docs/tag-rules.md): {shown}{more}")
        self._n_nodes = len(nodes)
        self._edges = edges
        pairs = _closure_pairs(len(self.labels), len(nodes), edges, MAX_CLOSURE_PAIRS)
        self.levels = pairs is None  # True: propagate over the direct edges (see the class docstring)
        if self.levels:
            self._down, self._up = _level_plan(len(nodes), edges)
            return
        a, c = (np.array(x, dtype=np.int64) for x in pairs)
        order = np.lexsort((a, c))  # by consequent, then antecedent
        a, c = a[order], c[order]
        self.antecedent, self.consequent = a, c  # (P,) each: antecedent implies consequent
        # Grouped by consequent (for inherit) and by antecedent (for constrain / remove).
        self._by_c = (c, a, *_groups(c))
        order = np.lexsort((c, a))
        self._by_a = (a[order], c[order], *_groups(a[order]))

    def __len__(self) -> int:
        """Closure pairs, or (level mode, no closure built) direct implications among the graph's tags."""
        return sum(map(len, self._edges)) if self.levels else len(self.antecedent)

    def inherit(self, p: np.ndarray) -> np.ndarray:
        """Raise each tag to the highest probability among the tags that imply it. p: (..., T)."""
        if self.levels:
            return self._propagate(p, self._down, np.maximum, -np.inf)
        return _reduce(p, self._by_c, np.maximum)

    def constrain(self, p: np.ndarray) -> np.ndarray:
        """Lower each tag to the lowest probability among the tags it implies. p: (..., T)."""
        if self.levels:
            return self._propagate(p, self._up, np.minimum, np.inf)
        return _reduce(p, self._by_a, np.minimum)

    def remove_implied(self, keep: np.ndarray) -> np.ndarray:
        """Drop kept tags implied by another kept tag. keep: (..., T) bool."""
        keep = np.asarray(keep, dtype=bool)
        out = keep.copy()
        if self.levels:
            # a tag is implied by a kept tag when one of its direct antecedents is kept or is itself implied
            reach = self._extend(keep, False)
            for targets, sources, starts in self._down:
                reach[..., targets] |= np.logical_or.reduceat(reach[..., sources], starts, axis=-1)
            implied = np.zeros_like(reach)
            for targets, sources, starts in self._down:
                implied[..., targets] = np.logical_or.reduceat(reach[..., sources], starts, axis=-1)
            return out & ~implied[..., : len(self.labels)]
        _, antecedents, starts, targets = self._by_c
        if starts.size:
            implied = np.logical_or.reduceat(keep[..., antecedents], starts, axis=-1)  # (..., G)
            out[..., targets] &= ~implied
        return out

    def closure_mask(self, mask: np.ndarray, up: bool, down: bool) -> np.ndarray:
        """Extend a (T,) bool mask with every antecedent (up) and/or consequent (down) of its tags."""
        out = mask.copy()
        if self.levels:
            if up:
                out |= self._propagate(mask, self._up, np.logical_or, False)
            if down:
                out |= self._propagate(mask, self._down, np.logical_or, False)
            return out
        if up:
            out[self.antecedent[mask[self.consequent]]] = True
        if down:
            out[self.consequent[mask[self.antecedent]]] = True
        return out

    def _extend(self, x: np.ndarray, fill: float | bool) -> np.ndarray:
        """x (..., T) with the tags the model lacks appended as `fill` (..., N)."""
        x = np.asarray(x)
        out = np.full((*x.shape[:-1], self._n_nodes), fill, dtype=x.dtype)
        out[..., : x.shape[-1]] = x
        return out

    def _propagate(self, x: np.ndarray, plan: list, ufunc: np.ufunc, fill: float | bool) -> np.ndarray:
        """ufunc of each tag's value and those of all its ancestors (plan `_down`) or descendants (`_up`)."""
        out = self._extend(x, fill)
        for targets, sources, starts in plan:  # each level only reads levels already final
            out[..., targets] = ufunc(out[..., targets], ufunc.reduceat(out[..., sources], starts, axis=-1))
        return out[..., : len(self.labels)].copy() if self._n_nodes > len(self.labels) else out


_REPORTED: set[int] = set()  # hashes of the cycle lists already reported (a web server rebuilds graphs per request)


def _first_report(cycles: list[list[str]]) -> bool:
    key = hash(tuple(map(tuple, cycles)))
    if key in _REPORTED:
        return False
    _REPORTED.add(key)
    return True


def _direct_graph(labels: list[str], implies: Mapping[str, Sequence[str]], through_unknown: bool
                  ) -> tuple[list[str], list[list[int]]]:
    """The tags reachable from the labels (labels first, in order, then the others by name) and each one's
    direct consequents (indices, deduplicated, no self-implication)."""
    index = {t: i for i, t in enumerate(labels)}
    unknown: set[str] = set()
    todo = [c for t in labels for c in implies.get(t, ()) if c not in index]
    while through_unknown and todo:
        c = todo.pop()
        if c not in unknown and c not in index:
            unknown.add(c)
            todo.extend(implies.get(c, ()))
    nodes = [*labels, *sorted(unknown)] if through_unknown else list(labels)
    index.update((t, i) for i, t in enumerate(nodes))
    edges = []
    for i, tag in enumerate(nodes):
        out = dict.fromkeys(index[c] for c in implies.get(tag, ()) if c in index)
        out.pop(i, None)
        edges.append(list(out))
    return nodes, edges


def _break_cycles(nodes: list[str], edges: list[list[int]]) -> list[list[str]]:
    """Find the strongly connected components of more than one tag (Tarjan's algorithm, iterative) and replace,
    in place, each one's inner edges by a chain in index order (the first implies the second, ...); edges into
    and out of it stay. Returns their tags in index order."""
    n = len(nodes)
    order, low, comp = [-1] * n, [0] * n, [-1] * n
    stack, on_stack, counter, components = [], [False] * n, 0, []
    for root in range(n):
        if order[root] != -1:
            continue
        work = [(root, 0)]
        while work:
            v, i = work[-1]
            if i == 0:
                order[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if i < len(edges[v]):
                work[-1] = (v, i + 1)
                w = edges[v][i]
                if order[w] == -1:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], order[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == order[v]:
                members = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    comp[w] = len(components)
                    members.append(w)
                    if w == v:
                        break
                components.append(members)
    cycles = []
    for k, members in enumerate(components):
        if len(members) < 2:
            continue
        members.sort()
        for v, after in zip(members, [*members[1:], None]):  # inside: a chain in model order
            edges[v] = [w for w in edges[v] if comp[w] != k] + ([after] if after is not None else [])
        cycles.append(members)
    return [[nodes[v] for v in members] for members in sorted(cycles)]  # in order of their first tag


def _closure_pairs(n_labels: int, n_nodes: int, edges: list[list[int]], limit: int
                   ) -> tuple[list[int], list[int]] | None:
    """(antecedents, consequents) of the transitive closure's label pairs, or None once there are over `limit`
    (two lists of references to the same int objects: ~16 bytes a pair)."""
    antecedents: list[int] = []
    consequents: list[int] = []
    for tag in range(n_labels):  # depth-first reachability; ~12k pairs for the real data, milliseconds
        seen, todo = {tag}, list(edges[tag])
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            if c < n_labels:
                antecedents.append(tag)
                consequents.append(c)
            todo.extend(edges[c])
        if len(antecedents) > limit:
            return None
    return antecedents, consequents


def _level_plan(n: int, edges: list[list[int]]) -> tuple[list, list]:
    """Per topological level, the edges grouped for `_propagate`: `down` updates each tag from its direct
    antecedents (levels from the sources), `up` from its direct consequents (levels from the sinks)."""
    src = np.array([v for v in range(n) for _ in edges[v]], dtype=np.int64)
    dst = np.array([w for v in range(n) for w in edges[v]], dtype=np.int64)
    return _plan(n, src, dst), _plan(n, dst, src)


def _plan(n: int, src: np.ndarray, dst: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Levels of the DAG src -> dst (Kahn), and per level >= 1 (targets, sources grouped by target, starts)."""
    level = np.zeros(n, np.int64)
    indegree = np.bincount(dst, minlength=n)
    by_src = np.argsort(src, kind="stable")
    bounds = np.searchsorted(src[by_src], np.arange(n + 1))
    frontier = np.flatnonzero(indegree == 0)
    while frontier.size:  # every edge is visited once, when its source's level is final
        out = np.concatenate([by_src[bounds[v]:bounds[v + 1]] for v in frontier.tolist()])
        targets = dst[out]
        np.maximum.at(level, targets, level[src[out]] + 1)
        np.subtract.at(indegree, targets, 1)
        frontier = np.unique(targets[indegree[targets] == 0])
    edge_level = level[dst]
    order = np.lexsort((dst, edge_level))  # by level, then by target
    cuts = np.searchsorted(edge_level[order], np.arange(1, int(level.max(initial=0)) + 2))
    plan = []
    for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        sel = order[a:b]
        starts, targets = _groups(dst[sel])
        plan.append((targets, src[sel], starts))
    return plan


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

