"""Grouping samples into batches of similar length (hydra/bulk/batching.py): every item exactly once, the first
alone, little padding on a mixed stream, no starvation, and arrival order when there is nothing to gain.

    venv/bin/python -m pytest tests/test_batching.py -q
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from hydra.bulk.batching import group_by_length, padding
from hydra.images.dinov3 import DinoV3Preprocess
from hydra.images.naflex import JTP3Preprocess


def _ident(x: int) -> int:
    return x


def _mixed(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([64, 200, 256, 480, 700, 972, 1008, 1024]) for _ in range(n)]


def test_batch_size_one_is_arrival_order():
    lengths = _mixed(20)
    assert list(group_by_length(lengths, 1, _ident)) == [[x] for x in lengths]


def test_every_item_exactly_once_and_batches_are_bounded():
    items = list(enumerate(_mixed(103)))
    batches = list(group_by_length(items, 8, lambda it: it[1]))
    flat = [it for b in batches for it in b]
    assert sorted(flat) == items
    assert len(batches[0]) == 1 and all(len(b) == 8 for b in batches[1:-1]) and 1 <= len(batches[-1]) <= 8


def _recording(lengths: list[int], pulled: list[int]):
    """Yield `lengths`, appending each index to `pulled` as it is taken (what the loader was asked for)."""
    for i, x in enumerate(lengths):
        pulled.append(i)
        yield x


def test_first_item_goes_out_alone_immediately():
    seen = []
    batches = group_by_length(_recording(_mixed(50), seen), 4, _ident)
    assert len(next(batches)) == 1
    assert seen == [0]  # nothing else was pulled from the loader before the first batch


def test_window_bounds_the_look_ahead():
    pulled = []
    batches = group_by_length(_recording(_mixed(200), pulled), 4, _ident, window=12)
    next(batches)
    next(batches)
    assert len(pulled) == 1 + 12  # the first item, then one full window before the second batch


def test_grouping_pads_far_less_than_arrival_order():
    lengths = _mixed(400, seed=1)
    grouped = sum(padding(b) for b in group_by_length(lengths, 4, _ident))
    arrival = sum(padding(lengths[i:i + 4]) for i in range(0, len(lengths), 4))
    assert grouped < 0.25 * arrival


def test_items_in_a_batch_keep_arrival_order():
    items = list(enumerate(_mixed(60, seed=2)))
    for b in group_by_length(items, 4, lambda it: it[1]):
        assert [i for i, _ in b] == sorted(i for i, _ in b)


def test_an_odd_sized_item_is_not_starved():
    # one long item, then a long stream of short ones that always make a better batch
    lengths = [100] + [1024] + [64] * 300
    items = list(enumerate(lengths))
    position = None
    for n, batch in enumerate(group_by_length(items, 4, lambda it: it[1], window=8)):
        if any(i == 1 for i, _ in batch):
            position = n
            break
    assert position is not None and position <= 1 + 8 // 4 + 1


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_short_streams(n):
    lengths = _mixed(n)
    batches = list(group_by_length(lengths, 4, _ident))
    assert sorted(x for b in batches for x in b) == sorted(lengths)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="at least 1"):
        list(group_by_length([1, 2], 0, _ident))


def test_sample_length_for_both_families():
    assert JTP3Preprocess.tokens({"patches": np.zeros((37, 768), np.uint8)}) == 37
    assert DinoV3Preprocess.tokens({"pixels": np.zeros((3, 480, 640), np.float32)}) == 30 * 40
