"""The Beam-free semantic dedup core: k-means, block splitting, pairs by
matrix products, connected components and the survivor rule, each checked
against brute force on small random data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stages.core.semantic import (
    assign,
    block_count,
    block_links,
    block_of,
    block_pairs,
    brute_force_pairs,
    groups,
    kmeans,
    nodes_of_block,
    normalise,
    rank,
    semantic_duplicates,
)


def _planted(n: int, dim: int, pairs: int, seed: int, noise: float = 0.05):
    rng = np.random.default_rng(seed)
    x = normalise(rng.standard_normal((n, dim)))
    for p in range(pairs):
        x[n - 1 - p] = normalise(x[p][None] + noise * rng.standard_normal((1, dim)))[0]
    return x


def test_kmeans_recovers_separated_clusters_and_assign_matches_argmax():
    rng = np.random.default_rng(0)
    centres = normalise(rng.standard_normal((5, 16)))
    truth = rng.integers(0, 5, 400)
    x = normalise(centres[truth] + 0.05 * rng.standard_normal((400, 16)))
    centroids = kmeans(x, 5, iterations=20, seed=1)
    assert centroids.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    labels = assign(x, centroids, batch_rows=7)
    np.testing.assert_array_equal(labels, np.argmax(x @ centroids.T, axis=1))
    # Each found cluster is exactly one true cluster.
    assert all(len(set(truth[labels == c])) == 1 for c in np.unique(labels))
    assert len(np.unique(labels)) == 5
    assert kmeans(x[:3], 10).shape == (3, 16)  # k capped by the sample


def test_block_splitting_bounds_the_rows_per_worker_and_covers_every_pair():
    assert block_count(100, 100) == 1
    assert block_count(101, 100) == 5
    keys = [f"k{i}" for i in range(4000)]
    blocks = block_count(len(keys), 800)
    members = {}
    for key in keys:
        for pair in block_pairs(block_of(key, blocks), blocks):
            members.setdefault(pair, set()).add(key)
    assert max(len(m) for m in members.values()) <= 800
    # Two keys of different blocks meet in exactly one block pair (where the
    # cross pairs are compared); two keys of one block meet in (b, b).
    for bi in range(blocks):
        assert (bi, bi) in block_pairs(bi, blocks)
        for bj in range(blocks):
            if bi != bj:
                assert set(block_pairs(bi, blocks)) & set(block_pairs(bj, blocks)) == {(min(bi, bj), max(bi, bj))}


@pytest.mark.parametrize("split", [False, True])
def test_block_links_find_the_brute_force_components(split):
    x = _planted(300, 24, pairs=20, seed=3)
    x[5] = x[0]  # an exact copy: a group of three with x[0] and x[299]
    threshold = 0.9
    want = brute_force_pairs(x, threshold)
    assert len(want) >= 20
    if split:
        a, b = x[:150], x[150:]
        links = block_links(a, b, threshold, batch_rows=16)
        assert links.compared == 150 * 150
        wanted_cross = {(i, j) for i, j in want if i < 150 <= j}
        for i, j in wanted_cross:
            assert links.root[i] == links.root[j]
    else:
        links = block_links(x, None, threshold, batch_rows=16)
        assert links.compared == 300 * 299 // 2
        for i, j in want:
            assert links.root[i] == links.root[j]
            assert links.best_sim[i] >= threshold and links.best_sim[j] >= threshold
        partners = {i for p in want for i in p}
        assert set(np.flatnonzero(links.best >= 0)) == partners
        for i in partners:
            sims = x @ x[i]
            sims[i] = -np.inf
            assert links.best_sim[i] == pytest.approx(sims.max(), abs=1e-5)


def test_groups_survivor_rule_and_transitive_chain():
    # a ~ b ~ c (a !~ c) in one component; d ~ e in another.
    e = np.eye(8, dtype=np.float32)
    theta = np.radians(15)  # cos 15 deg = 0.966, cos 30 deg = 0.866
    a = e[0]
    b = np.cos(theta) * e[0] + np.sin(theta) * e[1]
    c = np.cos(2 * theta) * e[0] + np.sin(2 * theta) * e[1]
    d = e[3]
    f = normalise((e[3] + 0.1 * e[4])[None])[0]
    x = np.stack([a, b, c, d, f])
    keys = ["ka", "kb", "kc", "kd", "ke"]
    threshold = 0.95
    assert float(a @ c) < threshold <= float(a @ b)
    sims = [0.3, 0.3, 0.31, 0.2, 0.2]  # kc has the best clip_similarity
    pixels = [100, 200, 50, 10, 10]  # kd, ke tie on everything but the key
    dups = {d.key: d for d in semantic_duplicates(keys, x, sims, pixels, threshold)}
    assert set(dups) == {"ka", "kb", "ke"}
    assert dups["ka"].survivor == dups["kb"].survivor == "kc"
    assert dups["ka"].neighbour == "kb" and dups["ka"].group_size == 3
    assert dups["ka"].similarity == pytest.approx(float(a @ b), abs=1e-5)
    assert dups["ke"].survivor == "kd"  # same score and pixels: the smaller key
    assert rank(0.3, 200, "kb") < rank(0.3, 100, "ka") < rank(None, 10**9, "k0")


def test_groups_merge_nodes_seen_by_several_block_pairs():
    x = _planted(60, 16, pairs=5, seed=4)
    keys = [f"k{i:02d}" for i in range(60)]
    sims = list(np.linspace(0, 1, 60))
    pix = [1] * 60
    whole = semantic_duplicates(keys, x, sims, pix, 0.9)
    # The same data through two blocks and their three block pairs.
    blocks = [np.arange(0, 30), np.arange(30, 60)]
    nodes = []
    for i, j in [(0, 0), (0, 1), (1, 1)]:
        idx = blocks[i] if i == j else np.concatenate([blocks[i], blocks[j]])
        links = block_links(x[blocks[i]], None if i == j else x[blocks[j]], 0.9)
        nodes += nodes_of_block([keys[k] for k in idx], [sims[k] for k in idx], [pix[k] for k in idx], links)
    got = sorted(groups(nodes))
    assert [d._replace(similarity=0) for d in got] == [d._replace(similarity=0) for d in sorted(whole)]
    np.testing.assert_allclose([d.similarity for d in got], [d.similarity for d in sorted(whole)], atol=1e-5)
    assert len(whole) == 5 and all(d.survivor == f"k{59 - int(d.key[1:]):02d}" for d in whole)
