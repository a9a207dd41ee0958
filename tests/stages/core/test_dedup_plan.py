"""stages.core.dedup_plan: survivor rules, pointer jumping, the in-memory plan."""

from __future__ import annotations

import numpy as np
import pytest

from schemas import DedupConfig
from stages.core.dedup_plan import Link, key_partition, max_chain_links, plan_dedup, resolve_links
from tests.stages.dedup_helpers import (
    BASE,
    EXACT,
    NEAR,
    drops,
    flip,
    item,
    kept_pairs_within,
    random_items,
)


def test_key_partition_is_stable_across_processes():
    # CRC-32, not the per-process salted hash(): every worker must agree.
    assert key_partition("abc", 1 << 32) == 0x352441C2
    assert all(0 <= key_partition(f"k{i}", 7) < 7 for i in range(100))


def test_exact_survivor_is_largest_then_smallest_key():
    items = [item("b", 100, "s1"), item("a", 100, "s1"), item("c", 99, "s1"), item("z", 400, "s2"), item("y", 1, "s2")]
    assert drops(plan_dedup(items, DedupConfig(near=False))) == {
        "b": (EXACT, "a"),
        "c": (EXACT, "a"),
        "y": (EXACT, "z"),
    }


def test_chain_names_the_kept_root():
    b = flip(BASE, 0, 1, 2, 3)  # 4 bits from A
    c = flip(b, 10, 11, 12, 13)  # 4 from B, 8 from A
    items = [item("A", 300, phash=BASE), item("B", 200, phash=b), item("C", 100, phash=c)]
    decisions = plan_dedup(items, DedupConfig(hamming_threshold=6))
    assert drops(decisions) == {"B": (NEAR, "A"), "C": (NEAR, "A")}
    assert "distance 4" in decisions["C"].detail and "to B" in decisions["C"].detail
    # Rank decides, not order: if C is the largest, it survives and names nobody.
    items = [item("A", 100, phash=BASE), item("B", 200, phash=b), item("C", 300, phash=c)]
    assert drops(plan_dedup(items, DedupConfig(hamming_threshold=6))) == {"B": (NEAR, "C"), "A": (NEAR, "C")}


def test_exact_and_near_mixed():
    near = flip(BASE, 5, 9, 40)
    items = [
        item("k1", 1000, "s-big", near),  # best: kept
        item("k2", 500, "s-small", BASE),  # near duplicate of k1
        item("k3", 500, "s-small", BASE),  # exact copy of k2 -> its survivor must be k1, not k2
        item("k4", 500, "s-other", BASE),  # same pHash as k2, other bytes
        item("k5", 10, None, flip(BASE, 60)),  # no sha: near only
        item("k6", 10, "s-lone", None),  # no pHash: exact only, kept
        item("k7", 10, None, None),  # neither: kept
        item("k8", 2000, "s-far", "0f0f0f0f0f0f0f0f"),  # unrelated: kept
    ]
    decisions = plan_dedup(items, DedupConfig(hamming_threshold=6))
    assert drops(decisions) == {"k2": (NEAR, "k1"), "k3": (EXACT, "k1"), "k4": (NEAR, "k1"), "k5": (NEAR, "k1")}
    assert "same sha256 as k2" in decisions["k3"].detail
    only_exact = plan_dedup(items, DedupConfig(near=False))
    assert drops(only_exact) == {"k3": (EXACT, "k2")}
    only_near = plan_dedup(items, DedupConfig(exact=False, hamming_threshold=6))
    assert set(only_near) == {"k2", "k3", "k4", "k5"}
    assert {d.reason for d in only_near.values()} == {NEAR} and {d.survivor for d in only_near.values()} == {"k1"}
    assert plan_dedup(items, DedupConfig(exact=False, near=False)) == {}


def chain_links(length):
    return [(f"n{i - 1}", Link(f"n{i}", NEAR, f"to n{i - 1}", True)) for i in range(1, length + 1)]


@pytest.mark.parametrize("rounds", [1, 2, 3, 4])
def test_pointer_jumping_resolves_chains_up_to_the_bound(rounds):
    longest = max_chain_links(rounds)
    decisions = resolve_links(chain_links(longest), rounds)
    assert {d.survivor for d in decisions.values()} == {"n0"}
    decisions = resolve_links(chain_links(longest + 1), rounds)
    unresolved = [k for k, d in decisions.items() if d.survivor is None]
    assert unresolved and all("raise max_survivor_rounds" in decisions[k].detail for k in unresolved)
    assert all(d.survivor in (None, "n0") for d in decisions.values())  # never a dropped node


def test_plan_invariants_on_random_data():
    rng = np.random.default_rng(0)
    threshold = 6
    items = random_items(rng, 1500, threshold)
    decisions = plan_dedup(items, DedupConfig(hamming_threshold=threshold))
    by_key = {i.key: i for i in items}
    assert len(decisions) > 200
    for key, decision in decisions.items():
        assert decision.survivor is not None and decision.survivor not in decisions  # names a kept record
        survivor, me = by_key[decision.survivor], by_key[key]
        assert (-survivor.pixels, survivor.key) < (-me.pixels, me.key)
        if decision.reason == EXACT:
            assert "same sha256" in decision.detail
    assert kept_pairs_within(items, decisions, threshold) == 0
    # Every sha's best copy is the only one that may be kept.
    best = {}
    for i in sorted(items, key=lambda i: (-i.pixels, i.key)):
        if i.sha256 is not None:
            best.setdefault(i.sha256, i.key)
    for i in items:
        if i.sha256 is not None and i.key not in decisions:
            assert best[i.sha256] == i.key
        if i.sha256 is not None and best[i.sha256] != i.key:
            assert decisions[i.key].reason == EXACT
