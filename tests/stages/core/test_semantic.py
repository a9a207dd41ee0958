"""The Beam-free semantic dedup core: k-means, block splitting, pairs by
matrix products, connected components and the survivor rule, each checked
against brute force on small random data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stages.core.semantic import (
    assign,
    assign_with_boundary,
    block_count,
    block_links,
    block_of,
    block_pairs,
    brute_force_pairs,
    kmeans,
    nodes_of_block,
    normalise,
    semantic_duplicates,
)
from stages.core.semantic_groups import (
    Node,
    bridges,
    groups,
    groups_across,
    local_components,
    merge_members,
    rank,
    survivors,
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


# ----------------------------------------------------------------- pairs across a cluster boundary


def _chain_across_the_boundary():
    """g1 ~ g2 ~ g3 ~ g4 on the circle of e0 and e1 (16, 4 and 16 degrees
    apart; cos 16 = 0.961, cos 20 = 0.940 below the threshold 0.95), with
    centroids e0 and e1: g1 and g2 are nearest e0, g3 and g4 nearest e1, and
    g2 and g3 lie 0.035 from the bisector (sin 2 degrees). Plus two unrelated
    samples, one in each cluster."""
    def at(degrees):
        v = np.zeros(8, dtype=np.float32)
        v[0], v[1] = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        return v

    keys = ["g1", "g2", "g3", "g4", "s1", "s2"]
    x = np.stack([at(27), at(43), at(47), at(63), at(0), at(90)])
    centroids = np.eye(8, dtype=np.float32)[:2]
    clip = [0.2, 0.2, 0.2, 0.3, 0.2, 0.2]  # g4 is the best of the chain
    return keys, x, clip, [1] * 6, centroids


def test_a_pair_split_by_a_cluster_boundary_is_found_and_joins_both_clusters_groups():
    keys, x, clip, pixels, centroids = _chain_across_the_boundary()
    assert list(assign(x, centroids)) == [0, 0, 1, 1, 0, 1]  # the pair (g2, g3) straddles the boundary
    assert float(x[1] @ x[2]) >= 0.95 and float(x[0] @ x[2]) < 0.95 and float(x[1] @ x[3]) < 0.95
    found = {d.key: d for d in semantic_duplicates(keys, x, clip, pixels, 0.95, centroids)}
    assert set(found) == {"g1", "g2", "g3"}
    assert {d.survivor for d in found.values()} == {"g4"} and {d.group_size for d in found.values()} == {4}
    assert found["g1"].neighbour == "g2" and found["g2"].neighbour == "g3"
    assert found["g2"].similarity == pytest.approx(np.cos(np.radians(4)), abs=1e-5)
    # Plain SemDeDup (pairs inside a cluster only) splits the chain in two: what the boundary rule mends.
    inside = {d.key: d.survivor for d in semantic_duplicates(keys, x, clip, pixels, 0.95, centroids, boundary=0)}
    assert inside == {"g2": "g1", "g3": "g4"}  # ties on score and pixels: the smaller key


def test_assign_with_boundary_follows_the_bisector_rule_and_the_cap():
    rng = np.random.default_rng(5)
    x = normalise(rng.standard_normal((300, 12)))
    centroids = kmeans(x, 9, seed=2)
    boundary = 0.08
    got = assign_with_boundary(x, centroids, boundary, max_boundary_clusters=9, batch_rows=50)
    sims = x @ centroids.T
    nearest = np.argmax(sims, axis=1)
    np.testing.assert_array_equal(got.primary, nearest)
    want = set()
    for i in range(len(x)):
        for c in range(len(centroids)):
            if c != nearest[i]:
                h = (sims[i, nearest[i]] - sims[i, c]) / np.linalg.norm(centroids[nearest[i]] - centroids[c])
                if h <= boundary:
                    want.add((i, c))
    assert len(want) > 20 and got.capped == 0
    assert set(zip(got.extra_rows.tolist(), got.extra_clusters.tolist())) == want
    capped = assign_with_boundary(x, centroids, boundary, max_boundary_clusters=1)
    per_row = np.bincount(capped.extra_rows, minlength=len(x))
    assert per_row.max() == 1 and capped.capped == int(np.sum(np.bincount([i for i, _ in want], minlength=len(x)) > 1)) > 0
    assert len(assign_with_boundary(x, centroids, 0.0, 9).extra_rows) == 0


def test_an_exhaustive_boundary_finds_every_brute_force_group():
    """boundary >= sqrt(2 (1 - t)) / 2 with no cap: the groups equal those of
    one cluster holding everything (all pairs compared), however k-means cut."""
    x = _planted(400, 16, pairs=40, seed=6, noise=0.12)
    threshold = 0.9
    keys = [f"k{i:03d}" for i in range(len(x))]
    clip = list(np.random.default_rng(1).uniform(0, 1, len(x)))
    pixels = [1] * len(x)
    centroids = kmeans(x, 30, seed=0)
    labels = assign(x, centroids)
    pairs = brute_force_pairs(x, threshold)
    assert sum(labels[i] != labels[j] for i, j in pairs) >= 3  # k-means splits some pairs
    everything = sorted(semantic_duplicates(keys, x, clip, pixels, threshold, None))
    exhaustive = sorted(
        semantic_duplicates(
            keys, x, clip, pixels, threshold, centroids, boundary=np.sqrt(2 * (1 - threshold)) / 2, max_boundary_clusters=30
        )
    )
    assert [d[:3] + d[4:] for d in exhaustive] == [d[:3] + d[4:] for d in everything]
    plain = semantic_duplicates(keys, x, clip, pixels, threshold, centroids, boundary=0)
    assert len(plain) < len(everything)


def test_block_links_skip_pairs_of_two_secondaries():
    x = _planted(120, 16, pairs=10, seed=8)
    x[100:110] = x[110:120]  # pairs among the last rows only
    whole = block_links(x, None, 0.99, batch_rows=7)
    assert all(whole.root[i] == whole.root[i + 10] for i in range(100, 110))
    # The last 30 rows as secondaries: their pairs with each other are not compared.
    part = block_links(x, None, 0.99, batch_rows=7, a_primary=90)
    assert part.compared == 90 * 89 // 2 + 90 * 30
    assert all(part.root[i] != part.root[i + 10] for i in range(100, 110))
    # Across two blocks: rows of a 0..59 (first 40 primary) and b 60..119 (first 50 primary).
    cross = block_links(x[:60], x[60:], 0.0, a_primary=40, b_primary=50)
    assert cross.compared == 40 * 60 + 20 * 50


def test_group_steps_join_components_across_clusters():
    nodes_1 = [Node("a", 0.1, 1, "a", "b", 0.97), Node("b", 0.1, 1, "a", "a", 0.97)]
    nodes_2 = [Node("b", 0.1, 1, "b", "c", 0.99), Node("c", 0.5, 1, "b", "b", 0.99)]
    nodes_3 = [Node("d", 0.1, 1, "d", "e", 0.96), Node("e", 0.1, 1, "d", "d", 0.96)]
    members = local_components(nodes_1) + local_components(nodes_2)
    assert {m.root for m in members} == {"a", "b"}
    merged, roots = merge_members([m for m in members if m.key == "b"])
    assert roots == ["a", "b"] and merged.neighbour == "c" and merged.similarity == pytest.approx(0.99)
    assert bridges([roots]) == {"a": "a", "b": "a"} and bridges([]) == {}
    got = {d.key: d for d in groups_across([nodes_1, nodes_2, nodes_3])}
    assert {k: (d.survivor, d.group_size) for k, d in got.items()} == {"a": ("c", 3), "b": ("c", 3), "e": ("d", 2)}
    assert survivors([merged]) == []


def test_in_memory_defaults_are_the_stage_defaults():
    from schemas.config import SemanticDedupConfig
    from stages.core.semantic import DEFAULT_BOUNDARY, DEFAULT_MAX_BOUNDARY_CLUSTERS

    config = SemanticDedupConfig()
    assert (DEFAULT_BOUNDARY, DEFAULT_MAX_BOUNDARY_CLUSTERS) == (config.boundary, config.max_boundary_clusters)
