"""Implication cycles and long chains (issue 15): cycles are reported once and broken by the documented rule
(docs/tag-rules.md: the tags of a cycle imply one another in model order only), `remove` no
longer drops every tag of a cycle, and a graph whose closure would be O(T^2) propagates level by level over its
direct edges with the same results as the closure.

    venv/bin/python -m pytest tests/test_implication_cycles.py -q
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra.tags import implications
from hydra.tags.implications import ImplicationGraph
from hydra.tags.modes import OutputRules, label_graph


def both(labels, implies, through_unknown=True):
    """The graph with the closure pairs, and the same graph forced to level propagation."""
    pairs = ImplicationGraph(labels, implies, through_unknown)
    limit, implications.MAX_CLOSURE_PAIRS = implications.MAX_CLOSURE_PAIRS, -1
    try:
        levels = ImplicationGraph(labels, implies, through_unknown)
    finally:
        implications.MAX_CLOSURE_PAIRS = limit
    assert not pairs.levels and levels.levels
    return pairs, levels


@st.composite
def graphs(draw):
    """Any graph: cycles, self-implications, chains through tags the model lacks."""
    n = draw(st.integers(1, 9))
    labels = [f"t{i}" for i in range(n)]
    names = labels + ["x0", "x1", "x2"]
    implies = {t: draw(st.lists(st.sampled_from(names), max_size=3)) for t in names}
    batch = draw(st.integers(1, 3))
    p = np.array(draw(st.lists(st.floats(0, 1, width=32), min_size=n * batch, max_size=n * batch)),
                 dtype=np.float32).reshape(batch, n)
    return labels, implies, p, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(graphs())
def test_level_propagation_equals_the_closure(case):
    labels, implies, p, through = case
    a, b = both(labels, implies, through)
    assert a.cycles == b.cycles
    np.testing.assert_array_equal(a.inherit(p), b.inherit(p))
    np.testing.assert_array_equal(a.constrain(p), b.constrain(p))
    keep = p > 0.4
    np.testing.assert_array_equal(a.remove_implied(keep), b.remove_implied(keep))
    for up, down in ((True, False), (False, True), (True, True)):
        np.testing.assert_array_equal(a.closure_mask(keep[0], up, down), b.closure_mask(keep[0], up, down))
    for g in (a, b):  # no tag implies itself once cycles are broken: every remove keeps at least one tag
        assert (g.remove_implied(np.ones(len(labels), bool))).any()


def test_a_cycle_is_reported_once_and_broken_by_model_order(capsys):
    labels = ["a", "b", "c", "d"]
    implies = {"a": ["b"], "b": ["c"], "c": ["a", "d"]}  # a -> b -> c -> a, and c -> d
    g = ImplicationGraph(labels, implies)
    err = capsys.readouterr().err
    assert g.cycles == [["a", "b", "c"]]
    assert err.count("\n") == 1 and err.startswith("warning: the tag implications hold 1 cycle(s)")
    assert "a -> b -> c -> a" in err and "docs/tag-rules.md" in err
    # inside the cycle, model order: a -> b -> c (c -> a is dropped), and c -> d stays
    assert g.remove_implied(np.ones(4, bool)).tolist() == [True, False, False, False]
    np.testing.assert_allclose(g.inherit(np.array([0.1, 0.5, 0.9, 0.2])), [0.1, 0.5, 0.9, 0.9])
    np.testing.assert_allclose(g.constrain(np.array([0.1, 0.5, 0.9, 0.2])), [0.1, 0.2, 0.2, 0.2])
    # the rule follows model order, not the order of the file
    g = ImplicationGraph(["c", "b", "a", "d"], implies)
    assert g.cycles == [["c", "b", "a"]]
    assert g.remove_implied(np.ones(4, bool)).tolist() == [True, False, False, False]  # c -> b -> a; c -> d
    np.testing.assert_allclose(g.inherit(np.array([0.1, 0.5, 0.9, 0.2])), [0.1, 0.5, 0.9, 0.2])
    capsys.readouterr()
    ImplicationGraph(labels, {"a": ["b"], "b": ["c"]})
    ImplicationGraph(labels, implies)
    assert capsys.readouterr().err == ""  # no cycle, and cycles already reported: no warning


def test_remove_mode_keeps_one_tag_of_a_cycle_in_hydra35_rules(capsys):
    labels = ["x", "y", "z"]
    rules = OutputRules(labels, np.full(3, 0.5), label_graph(labels, {"x": ["y"], "y": ["x"]}), "remove")
    assert rules.classify(np.array([0.9, 0.8, 0.7], np.float32)) == {"x": pytest.approx(0.9),
                                                                     "z": pytest.approx(0.7)}


@pytest.mark.parametrize("ring", [True, False], ids=["4000-tag ring", "4000-tag chain"])
def test_long_rings_and_chains_stay_small_in_memory(capsys, ring):
    """A 4,000-tag ring cost 2.45 GB as a closure; broken, it is a chain whose closure still has 8M pairs."""
    n = 4000
    labels = [f"t{i}" for i in range(n)]
    implies = {labels[i]: [labels[(i + 1) % n]] for i in range(n if ring else n - 1)}
    tracemalloc.start()
    try:
        g = ImplicationGraph(labels, implies)
        p = np.zeros(n, np.float32)
        p[0] = 1.0
        inherited = g.inherit(p)
        removed = g.remove_implied(np.ones(n, bool))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert g.levels and g.cycles == ([labels] if ring else [])
    assert (inherited == 1.0).all()  # t0 implies every tag down the chain
    assert np.flatnonzero(removed).tolist() == [0]
    if ring:
        assert "... (4000 tags)" in capsys.readouterr().err
