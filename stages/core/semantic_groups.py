"""Connected components of duplicate links across clusters, and the
survivor of each: the grouping half of semantic dedup (`stages/core/semantic.py`
finds the links; `stages/semantic_dedup.py` runs these steps distributed).

A block pair reports `Node`s: a key, its rank fields, a `root` (a key of the
same component as far as that block pair saw) and its most similar
neighbour. Then:

* `local_components`: per cluster, components over the nodes' root links: a
  `Member` per key of a component of two or more, rooted at the component's
  smallest key;
* `merge_members`: per key, its Members from the clusters it belongs to (a
  secondary member, near a boundary, can be in several): the most similar
  neighbour, and the distinct roots it joins;
* `bridges`: the roots joined by keys in several components, on one worker
  (their number is the number of duplicates across a boundary, a small part
  of all duplicates) -> the smallest root of each union;
* `survivors`: per joined component, a `Duplicate` for every member but the
  best by `rank` (highest clip_similarity, then most pixels, then smallest key).

A pair found in two clusters counts once: a component is a set of keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """For each node, the smallest node index of its connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]



def rank(clip_similarity: float | None, pixels: int, key: str) -> tuple[float, int, str]:
    """Survivor sort key, smaller is better: highest `clip_similarity`, then
    most decoded pixels, then smallest key."""
    return (-(clip_similarity if clip_similarity is not None else -np.inf), -pixels, key)


class Node(NamedTuple):
    """A member of some duplicate pair, as one block pair saw it."""

    key: str
    clip_similarity: float | None
    pixels: int
    root: str  # a key of the same component (itself if unknown)
    neighbour: str | None  # most similar other member
    similarity: float  # cosine to `neighbour`


class Member(NamedTuple):
    """A member of a connected component of one cluster (or, after
    `merge_members`, of several): `root` names the component by its smallest
    key; `neighbour` is the member's most similar neighbour seen so far."""

    key: str
    root: str
    clip_similarity: float | None
    pixels: int
    neighbour: str
    similarity: float


class Duplicate(NamedTuple):
    """One drop: `key` loses to `survivor`; `similarity` is its cosine to
    `neighbour`, its most similar member of the group; `group_size` counts
    the survivor too."""

    key: str
    survivor: str
    neighbour: str
    similarity: float
    group_size: int


def local_components(nodes: Iterable[Node | tuple]) -> list[Member]:
    """Connected components of the nodes' `root` links (one cluster's nodes:
    several per key allowed, one per block pair that saw the key; the most
    similar neighbour wins): a Member for every key of a component of two or
    more, rooted at the component's smallest key."""
    merged: dict[str, list] = {}
    for node in nodes:
        key, clip_similarity, pixels, root, neighbour, similarity = node
        entry = merged.get(key)
        if entry is None:
            merged[key] = [clip_similarity, pixels, [root], neighbour, similarity]
            continue
        entry[2].append(root)
        if neighbour is not None and (entry[3] is None or similarity > entry[4]):
            entry[3], entry[4] = neighbour, similarity
    keys = sorted(set(merged).union(r for e in merged.values() for r in e[2]))
    index = {k: i for i, k in enumerate(keys)}
    u = np.array([index[k] for k, e in merged.items() for _ in e[2]], dtype=np.int64)
    v = np.array([index[r] for e in merged.values() for r in e[2]], dtype=np.int64)
    first = components(len(keys), u, v)  # keys are sorted: the smallest index is the smallest key
    sizes = np.bincount(first, minlength=len(keys))
    missing = [k for k, f in zip(keys, first) if sizes[f] > 1 and k not in merged]
    if missing:
        raise ValueError(f"semantic dedup: group members without their own entry: {missing[:5]}")
    out = []
    for k, f in zip(keys, first):
        if sizes[f] > 1:
            clip_similarity, pixels, _, neighbour, similarity = merged[k]
            out.append(Member(k, keys[f], clip_similarity, int(pixels), neighbour, float(similarity)))
    return out


def merge_members(members: Iterable[Member | tuple]) -> tuple[Member, list[str]]:
    """One key's Members from the clusters it belongs to -> one Member (the
    most similar neighbour, the smallest root) and the sorted distinct roots:
    more than one when the key joins components of different clusters."""
    members = [Member(*m) for m in members]
    best = max(members, key=lambda m: (m.similarity, m.neighbour))
    roots = sorted({m.root for m in members})
    return best._replace(root=roots[0]), roots


def bridges(root_lists: Iterable[Sequence[str]]) -> dict[str, str]:
    """Components joined across clusters: each list holds the roots one key
    belongs to. Returns, for every root in the lists, the smallest root of
    the union it falls in (roots not in any list stand alone)."""
    lists = [list(r) for r in root_lists]
    roots = sorted({r for rs in lists for r in rs})
    index = {r: i for i, r in enumerate(roots)}
    u = np.array([index[rs[0]] for rs in lists for _ in rs[1:]], dtype=np.int64)
    v = np.array([index[r] for rs in lists for r in rs[1:]], dtype=np.int64)
    first = components(len(roots), u, v)
    return {r: roots[f] for r, f in zip(roots, first)}


def survivors(members: Iterable[Member | tuple]) -> list[Duplicate]:
    """The members of one (whole) component -> a Duplicate for each but the best ranked."""
    members = {m[0]: Member(*m) for m in members}
    if len(members) < 2:
        return []
    survivor = min(members, key=lambda k: rank(members[k].clip_similarity, members[k].pixels, k))
    return [
        Duplicate(k, survivor, m.neighbour, m.similarity, len(members))
        for k, m in sorted(members.items())
        if k != survivor
    ]


def groups_across(clusters: Iterable[Iterable[Node | tuple]]) -> list[Duplicate]:
    """The whole grouping in memory, in the pipeline's steps: per cluster
    `local_components`; per key `merge_members`; `bridges` across clusters;
    per component `survivors`."""
    by_key: dict[str, list[Member]] = {}
    for nodes in clusters:
        for member in local_components(nodes):
            by_key.setdefault(member.key, []).append(member)
    merged = {key: merge_members(members) for key, members in by_key.items()}
    joined = bridges(roots for _, roots in merged.values() if len(roots) > 1)
    components: dict[str, list[Member]] = {}
    for member, _ in merged.values():
        components.setdefault(joined.get(member.root, member.root), []).append(member)
    return [d for c in sorted(components) for d in survivors(components[c])]


def groups(nodes: Iterable[Node | tuple]) -> list[Duplicate]:
    """Connected components of the nodes' `root` links (nodes of one cluster,
    or of all) and a Duplicate for every member but the best-ranked one of
    each component."""
    return groups_across([nodes])
