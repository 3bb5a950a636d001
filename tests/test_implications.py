"""Implication modes (inherit / constrain / remove / constrain-remove / off) over the transitive graph.

Runs without torch. Each rule is checked on a 4-tag chain, on the real tags CSV, and (hypothesis) against
a direct transcription of the original's recursive per-tag walk on random acyclic graphs.

    venv/bin/python -m pytest tests/test_implications.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra.tags.implications import MODES, ImplicationGraph
from hydra.tags.rules import TagMetadata, TagRules, load_metadata

# 4-tag toy vocabulary: trex -> tyrannosaurid -> dinosaur, plus an unrelated tag.
LABELS = ["dinosaur", "solo", "trex", "tyrannosaurid"]
IMPLIES = {"trex": ["tyrannosaurid"], "tyrannosaurid": ["dinosaur"]}
P = np.array([0.2, 0.9, 0.8, 0.5])


def test_inherit_raises_general_tags_to_specific_ones():
    g = ImplicationGraph(LABELS, IMPLIES)
    np.testing.assert_allclose(g.inherit(P), [0.8, 0.9, 0.8, 0.8])


def test_constrain_lowers_specific_tags_to_general_ones():
    g = ImplicationGraph(LABELS, IMPLIES)
    np.testing.assert_allclose(g.constrain(P), [0.2, 0.9, 0.2, 0.2])


def test_remove_keeps_only_most_specific():
    g = ImplicationGraph(LABELS, IMPLIES)
    keep = np.array([True, True, True, True])
    assert g.remove_implied(keep).tolist() == [False, True, True, False]
    # without the specific tag, the middle of the chain survives
    keep = np.array([True, False, False, True])
    assert g.remove_implied(keep).tolist() == [False, False, False, True]


def test_graph_follows_chains_through_tags_the_model_lacks():
    g = ImplicationGraph(["a", "c"], {"a": ["b"], "b": ["c"]})
    np.testing.assert_allclose(g.inherit(np.array([0.9, 0.1])), [0.9, 0.9])


def test_batched_equals_per_image():
    g = ImplicationGraph(LABELS, IMPLIES)
    batch = np.stack([P, P[::-1], np.full(4, 0.5)])
    for fn in (g.inherit, g.constrain):
        np.testing.assert_allclose(fn(batch), np.stack([fn(row) for row in batch]))
    keep = batch > 0.45
    assert (g.remove_implied(keep) == np.stack([g.remove_implied(k) for k in keep])).all()


@pytest.mark.parametrize("mode", MODES)
def test_rules_every_mode_on_toy_vocab(mode):
    meta = TagMetadata()
    for t in LABELS:
        meta.add(t, 0, IMPLIES.get(t, ()))
    rules = TagRules(LABELS, np.full(4, 0.45), ImplicationGraph(LABELS, meta.implies), mode)
    out = rules.classify(P)
    expected = {
        "inherit": {"dinosaur": 0.8, "solo": 0.9, "trex": 0.8, "tyrannosaurid": 0.8},
        "constrain": {"solo": 0.9},
        "remove": {"solo": 0.9, "trex": 0.8},
        "constrain-remove": {"solo": 0.9},
        "off": {"solo": 0.9, "trex": 0.8, "tyrannosaurid": 0.5},
    }[mode]
    assert out == pytest.approx(expected)
    assert list(out) == [t for t in LABELS if t in out]  # model order


def test_real_tags_csv_examples():
    meta = load_metadata("data/jtp-3-hydra-tags.csv")
    labels = list(meta.category)
    g = ImplicationGraph(labels, meta.implies)
    p = np.zeros(len(labels))
    i = {t: k for k, t in enumerate(labels)}
    p[i["tyrannosaurus_rex"]] = 0.9
    up = g.inherit(p)
    assert up[i["tyrannosaurid"]] == 0.9 and up[i["dinosaur"]] == 0.9  # transitive, not just direct
    # the real graph: 7,114 direct edges, not transitively closed, so the closure is strictly larger
    assert sum(len(v) for v in meta.implies.values()) == 7114
    assert len(g) > 7114


def _naive(labels, implies, p, mode):
    """The original's per-tag recursive walk, written as plainly as possible."""
    probs = dict(zip(labels, p))

    def push_down(tag, value):
        for c in implies.get(tag, ()):
            if c in probs and probs[c] < value:
                probs[c] = value
            push_down(c, value)

    def lowest_below(tag):
        low = probs[tag]
        for c in implies.get(tag, ()):
            if c in probs:
                low = min(low, probs[c])
            low = min(low, lowest_below_any(c))
        return low

    def lowest_below_any(tag):
        low = 1.0
        for c in implies.get(tag, ()):
            if c in probs:
                low = min(low, probs[c])
            low = min(low, lowest_below_any(c))
        return low

    if mode == "inherit":
        for t in labels:
            push_down(t, probs[t])
    elif mode in ("constrain", "constrain-remove"):
        probs = {t: lowest_below(t) for t in labels}
    out = {t: v for t, v in probs.items() if v >= 0.5}
    if mode in ("remove", "constrain-remove"):
        def descendants(tag):
            for c in implies.get(tag, ()):
                yield c
                yield from descendants(c)
        for t in labels:
            if t in out:
                for d in list(descendants(t)):
                    out.pop(d, None)
    return out


@st.composite
def dags(draw):
    n = draw(st.integers(2, 9))
    labels = [f"t{i}" for i in range(n)]
    implies = {}
    for i in range(n):
        # edges only to higher indices keep it acyclic, like the real data
        targets = draw(st.lists(st.integers(i + 1, n), max_size=3, unique=True))
        implies[labels[i]] = [labels[j] for j in targets if j < n]
        if n in targets:  # a chain through a tag the model does not predict
            implies[labels[i]].append(f"via{i}")
            implies[f"via{i}"] = [labels[j] for j in range(i + 1, n)][:1]
    p = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    return labels, implies, np.array(p)


@settings(max_examples=200, deadline=None)
@given(dags(), st.sampled_from(MODES))
def test_matches_original_recursive_walk(case, mode):
    labels, implies, p = case
    graph = ImplicationGraph(labels, implies)
    rules = TagRules(labels, np.full(len(labels), 0.5), graph, mode)
    assert rules.classify(p) == pytest.approx(_naive(labels, implies, p, mode))
