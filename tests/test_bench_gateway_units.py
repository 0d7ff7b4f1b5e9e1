"""The gateway benchmark's throughput statistics without servers: rounds paired block by
block, and the interval around their geometric mean; and its `--pin` parsing and CPU
affinity handling."""

from __future__ import annotations

import argparse
import math
import os

import pytest

from tests.support.bench_script import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("gateway_overhead")


def block(bench, arm: str, wall_s: float, tokens: int = 1000):
    return bench.Block(arm, wall_s, 10, tokens, 0.0, 0.0)


def test_each_round_pairs_its_own_two_blocks_whatever_their_order(bench):
    blocks = [
        block(bench, "direct", 10.0),
        block(bench, "gateway", 12.5),  # round 0: 0.8
        block(bench, "gateway", 20.0),
        block(bench, "direct", 19.0),  # round 1, engine slower: 0.95
    ]
    assert bench.paired_ratios(blocks) == pytest.approx([0.8, 0.95])


def test_a_constant_cost_under_a_drifting_engine_is_recovered_exactly(bench):
    """The engine halves its speed every other round; the gateway costs 2 % in each: every
    round says 0.98, so does the mean, and the interval has no width."""
    blocks = []
    for r, speed in enumerate((1.0, 0.5, 1.0, 0.5)):
        arms = [("direct", 10 / speed), ("gateway", 10 / speed / 0.98)]
        for arm, wall in arms if r % 2 == 0 else arms[::-1]:
            blocks.append(block(bench, arm, wall))
    point, lo, hi = bench.geometric_mean_ci(bench.paired_ratios(blocks))
    assert point == pytest.approx(0.98)
    assert lo == pytest.approx(0.98) and hi == pytest.approx(0.98)


def test_interval_widens_with_noise_and_contains_the_mean(bench):
    ratios = [0.90, 1.00, 0.97, 0.93, 1.02, 0.95, 0.99, 0.94]
    point, lo, hi = bench.geometric_mean_ci(ratios)
    assert point == pytest.approx(math.exp(sum(map(math.log, ratios)) / len(ratios)))
    assert lo < point < hi
    assert min(ratios) <= lo and hi <= max(ratios)
    tight = bench.geometric_mean_ci([0.96, 0.961, 0.959, 0.96, 0.96])
    assert tight[2] - tight[1] < (hi - lo) / 10


def test_too_few_rounds_give_no_interval(bench):
    assert bench.geometric_mean_ci([0.9, 1.0])[1:] == (None, None)


def test_a_round_missing_an_arm_is_an_error(bench):
    with pytest.raises(ValueError, match="round 0"):
        bench.paired_ratios([block(bench, "direct", 1.0), block(bench, "direct", 1.0)])


def test_median_interval_covers_the_median_and_narrows_with_more_pairs(bench):
    import random

    rng = random.Random(1)
    few = [0.003 + rng.gauss(0, 0.01) for _ in range(50)]
    many = [0.003 + rng.gauss(0, 0.01) for _ in range(2000)]
    for diffs in (few, many):
        lo, hi = bench.median_ci_ms(diffs)
        assert lo <= 1000 * bench.percentile(diffs, 50) <= hi
    wide, narrow = bench.median_ci_ms(few), bench.median_ci_ms(many)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3
    assert bench.median_ci_ms([0.001, 0.002]) is None


def test_a_target_is_resolved_only_when_its_interval_is_on_one_side(bench):
    def at_most_2(x: float) -> bool:
        return x <= 2.0

    clear = bench.target_row("t", 1.2, [0.8, 1.6], at_most_2)
    spans = bench.target_row("t", 1.2, [0.4, 3.1], at_most_2)
    missed = bench.target_row("t", 4.6, [3.5, 5.2], at_most_2)
    bare = bench.target_row("t", 1.2, None, at_most_2)
    assert (clear["met"], clear["resolved"]) == (True, True)
    assert (spans["met"], spans["resolved"]) == (True, False)
    assert (missed["met"], missed["resolved"]) == (False, True)
    assert (bare["met"], bare["resolved"], bare["ci95"]) == (True, False, None)


def test_pin_parses_cpu_lists_and_refuses_overlap_or_unknown_cpus(bench):
    assert bench.parse_cpus("0-2,5") == {0, 1, 2, 5}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        assert bench.parse_pin(f"{cpus[0]}:{cpus[1]}") == ({cpus[0]}, {cpus[1]})
    for bad in ("0", "0:0", "x:1", "1-0:1", "0-:1", f"0:{max(cpus) + 1}"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_pin(bad)


def test_client_cpus_parse_any_available_cpus_and_refuse_others(bench):
    cpus = sorted(os.sched_getaffinity(0))
    assert bench.parse_cpu_arg(str(cpus[0])) == {cpus[0]}
    for bad in ("", "x", "1-0", str(max(cpus) + 1)):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_cpu_arg(bad)


def test_affinity_applies_to_the_block_and_is_restored(bench):
    before = os.sched_getaffinity(0)
    one = {min(before)}
    with bench.affinity(one):
        assert os.sched_getaffinity(0) == one
    assert os.sched_getaffinity(0) == before
    with bench.affinity(None):
        assert os.sched_getaffinity(0) == before
