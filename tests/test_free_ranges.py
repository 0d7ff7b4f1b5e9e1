"""`_split_ranges`: the finish-time free skips positions already freed by eviction."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raas_backend.sglang_plugin.scheduler_hooks import PADDING_SLOT, _split_ranges


def _brute_force(row: list[int], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each range cut into maximal runs of live slots, in order."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        pos = start
        while pos < end:
            if row[pos] == PADDING_SLOT:
                pos += 1
                continue
            run = pos
            while pos < end and row[pos] != PADDING_SLOT:
                pos += 1
            out.append((run, pos))
    return out


@st.composite
def rows_and_ranges(draw):
    n = draw(st.integers(0, 64))
    # Mostly live slots with runs of padding, the shape eviction leaves behind.
    row = draw(st.lists(st.sampled_from([PADDING_SLOT, 1, 2, 37]), min_size=n, max_size=n))
    bound = st.integers(0, n)
    pairs = draw(st.lists(st.tuples(bound, bound), max_size=5))
    return row, pairs


def test_examples():
    row = torch.tensor([5, 6, 0, 0, 7, 8, 9, 0, 10])
    assert _split_ranges(row, [(0, 9)]) == [(0, 2), (4, 7), (8, 9)]
    assert _split_ranges(row, [(2, 4)]) == []
    assert _split_ranges(row, [(3, 5), (5, 6)]) == [(4, 5), (5, 6)]
    assert _split_ranges(row, [(4, 4), (6, 2)]) == []
    assert _split_ranges(row, []) == []
    assert _split_ranges(torch.tensor([1, 2, 3]), [(0, 3)]) == [(0, 3)]


@settings(max_examples=200, deadline=None)
@given(rows_and_ranges())
def test_matches_brute_force(data):
    row, ranges = data
    got = _split_ranges(torch.tensor(row, dtype=torch.int32), ranges)
    assert got == _brute_force(row, ranges)
    # Every output range is non-empty, inside one input range, and all live.
    for start, end in got:
        assert start < end
        assert all(row[i] != PADDING_SLOT for i in range(start, end))
    # The live positions covered are exactly the live positions of the input.
    want = [i for s, e in ranges for i in range(s, e) if row[i] != PADDING_SLOT]
    assert [i for s, e in got for i in range(s, e)] == want


@settings(max_examples=50, deadline=None)
@given(rows_and_ranges())
def test_no_padding_means_identity_on_non_empty_ranges(data):
    row, ranges = data
    live = [r if r != PADDING_SLOT else 1 for r in row]
    got = _split_ranges(torch.tensor(live, dtype=torch.int64), ranges)
    assert got == [(s, e) for s, e in ranges if e > s]
