"""stages.core.hamming_search: multi-index pair finding against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from stages.core import hamming_search
from stages.core.hamming_search import KeyBlob, band_layout, collapse_identical, near_pairs, pairs_in_partition
from tests.stages.dedup_helpers import brute_force, planted_hashes


@pytest.mark.parametrize("threshold", [0, 1, 6, 12])
def test_band_layout_covers_all_bits(threshold):
    layout = band_layout(threshold)
    assert layout.bands == threshold + 1
    assert sum(layout.widths) == 64 and max(layout.widths) - min(layout.widths) <= 1
    covered = 0
    for band in range(layout.bands):
        covered |= int(layout.mask(band))
    assert covered == 2**64 - 1


@pytest.mark.parametrize("threshold", [0, 2, 6, 9])
def test_near_pairs_equal_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    hashes = planted_hashes(rng, 2500, threshold)
    i, j, d = near_pairs(hashes, threshold)
    found = list(zip(i.tolist(), j.tolist()))
    assert len(found) == len(set(found)), "a pair was reported twice"
    assert dict(zip(found, d.tolist())) == brute_force(hashes, threshold)


def test_long_runs_are_compared_in_tiles(monkeypatch):
    monkeypatch.setattr(hamming_search, "_TILE_ROWS", 16)
    monkeypatch.setattr(hamming_search, "_TILE_COLS", 50)
    rng = np.random.default_rng(1)
    threshold = 6
    hashes = planted_hashes(rng, 600, threshold)
    layout = band_layout(threshold)
    hashes &= ~layout.mask(0)  # every hash shares band 0: one run of 600 in band 0
    hashes[:5] |= layout.mask(0)  # and a run of 5
    expected = brute_force(hashes, threshold)
    i, j, d = pairs_in_partition(hashes, 0, layout, threshold)
    band0 = dict(zip(zip(i.tolist(), j.tolist()), d.tolist()))
    sharing_band0 = {p: dist for p, dist in expected.items() if (p[0] < 5) == (p[1] < 5)}
    assert band0 == sharing_band0
    all_i, all_j, _ = near_pairs(hashes, threshold)
    assert set(zip(all_i.tolist(), all_j.tolist())) == set(expected)


def test_collapse_identical_keeps_the_best_copy():
    hashes = np.array([5, 9, 5, 7, 5, 9], dtype=np.uint64)
    neg_pixels = np.array([-10, -1, -20, -1, -20, -1])
    keys = ["a", "f", "c", "d", "b", "e"]
    keep, losers = collapse_identical(hashes, neg_pixels, keys)
    # 5: c and b have 20 px, b has the smaller key; 9: e and f tie, e wins.
    assert keep.tolist() == [3, 4, 5]
    assert sorted((keys[a], keys[b]) for a, b in losers) == [("a", "b"), ("c", "b"), ("f", "e")]
    keep, losers = collapse_identical(np.array([1, 2, 3], dtype=np.uint64), np.zeros(3), ["x", "y", "z"])
    assert keep.tolist() == [0, 1, 2] and losers == []


def test_key_blob_slices_and_round_trips():
    keys = ["k1", "", "ünïcode", "a-much-longer-key-0000001", "z"]
    blob = KeyBlob.of(keys)
    assert [blob[i] for i in range(len(blob))] == keys
    taken = blob.take(np.array([3, 0, 2]))
    again = KeyBlob.from_bytes(*taken.to_bytes())
    joined = KeyBlob.concat([again, blob])
    assert [joined[i] for i in range(len(joined))] == [keys[3], keys[0], keys[2], *keys]
    assert len(blob.take(np.array([], dtype=np.int64))) == 0
