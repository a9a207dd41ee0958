"""Which duplicates are dropped and which sample each one names as its survivor:
the rules of deduplication and the in-memory plan (`plan_dedup`), with the
survivor-resolution steps (`jump`, `group_links`) that `stages/dedup.py` runs
distributed. Plain Python, no Beam: the LoRA pre-flight plans with it directly.

What is dropped, and in favour of what
--------------------------------------
* **Exact duplicates**: records with the same `image_sha256` (SHA-256 of the
  downloaded bytes). One survivor per hash; the others are rejected as
  `exact_duplicate`.
* **Near duplicates**: among the exact survivors, records whose `phash` (64-bit
  DCT perceptual hash, `imagehash.phash` semantics) differ in at most
  `DedupConfig.hamming_threshold` bits (default measured in
  `benchmarks/dedup_bench.py`). Rejected as `near_duplicate`.
* **Survivor rank**: more decoded pixels (`original_width * original_height`)
  wins, then the smaller `key` (string order). Every reject row's
  `duplicate_of` names a sample that is *kept*.
* Records without `image_sha256` skip exact dedup, records without `phash` skip
  near dedup (counted as `missing_sha256` / `missing_phash`); neither is dropped
  for it. `exact=False` / `near=False` disable a kind.

The near-duplicate rule, and why it is sound
--------------------------------------------
Near-duplicate pairs form a graph. A node is dropped iff it has a higher-ranked
neighbour; its parent is its best-ranked such neighbour (ties cannot happen: keys
are unique). Parents rank strictly higher, so parent chains are acyclic and end
at a node with no higher-ranked neighbour, which is kept. Hence no two kept
images are within the threshold (the lower-ranked one of such a pair would have
a higher-ranked neighbour) and every drop can name a kept root. In a chain
A~B, B~C with A !~ C (A best), both B and C are dropped and both name A: C is
a transitive duplicate (its reject `detail` names B, the neighbour it is within
the threshold of). Choosing kept nodes greedily instead (keep C because B was
dropped) would be a sequential, order-dependent pass; this rule needs only
local decisions.

Roots are found by pointer jumping: every dropped node (near, and exact
duplicates pointing at their sha-survivor) holds a pointer; each round looks up
the pointer's own pointer (one `GroupByKey` over partitions of the pointer
space) and jumps to it, so pointer distances double. `max_survivor_rounds` rounds resolve chains of up to
`2 ** rounds - 1` links (`max_chain_links`); a longer chain is not guessed:
its records are rejected with `duplicate_of=None`, a detail asking to raise
`max_survivor_rounds`, an ERROR log line and the `unresolved_survivor_chains`
counter.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from schemas import DedupConfig, RejectReason, SampleRecord
from stages.core.hamming_search import near_pairs
from stages.core.phash import phashes_to_array


# --------------------------------------------------------------------------- ranking


def rank(pixels: int, key: str) -> tuple[int, str]:
    """Sort key of the survivor order: smaller is better (more pixels, then smaller key)."""
    return (-pixels, key)


# ---------------------------------------------------------- survivor resolution core


class Link(NamedTuple):
    """A dropped record waiting for its survivor: it points at `pointer` (an
    exact survivor, or a higher-ranked near duplicate)."""

    key: str
    reason: str  # RejectReason value
    detail: str
    in_table: bool  # a near drop: other links may point at it


class TableEntry(NamedTuple):
    """A near drop's current pointer, and whether that pointer is known kept."""

    pointer: str
    resolved: bool


class Decision(NamedTuple):
    """A dropped record's verdict; `survivor` None when its chain was not resolved."""

    reason: str
    survivor: str | None
    detail: str


def max_chain_links(rounds: int) -> int:
    """Longest chain of pointers that `rounds` pointer-jumping rounds resolve."""
    return 2**rounds - 1


def jump_link(pointer: str, own: TableEntry | None, link: Link) -> Iterator[tuple[str, tuple]]:
    """One pointer-jumping step for one link pointing at `pointer`.

    `own` is `pointer`'s own table entry (None: `pointer` is not a near drop, so
    it is kept). Yields tagged outputs: ("decision", (key, Decision)) when the
    survivor is known, else ("link", (new_pointer, Link)); and, for a near drop,
    ("table", (key, TableEntry)) with its new pointer.
    """
    if own is None or own.resolved:
        survivor = pointer if own is None else own.pointer
        yield "decision", (link.key, Decision(link.reason, survivor, link.detail))
        if link.in_table:
            yield "table", (link.key, TableEntry(survivor, True))
    else:
        yield "link", (own.pointer, link)
        if link.in_table:
            yield "table", (link.key, TableEntry(own.pointer, False))


def jump(pointer: str, own: TableEntry | None, links: Iterable[Link]) -> Iterator[tuple[str, tuple]]:
    """`jump_link` for every link pointing at `pointer`; a resolved `own` entry
    is carried forward (an unresolved one is updated by its own link)."""
    if own is not None and own.resolved:
        yield "table", (pointer, own)
    for link in links:
        yield from jump_link(pointer, own, link)


def unresolved(link: Link, rounds: int) -> Decision:
    return Decision(
        link.reason,
        None,
        f"{link.detail}; survivor not found: the near-duplicate chain is longer than "
        f"{max_chain_links(rounds)} links (raise max_survivor_rounds)",
    )


def resolve_links(
    links: Iterable[tuple[str, Link]], rounds: int
) -> dict[str, Decision]:
    """In-memory pointer jumping over `(pointer, Link)` pairs, round by round as
    `Deduplicate` does it. Returns key -> Decision."""
    pending = list(links)
    table = {link.key: TableEntry(pointer, False) for pointer, link in pending if link.in_table}
    decisions: dict[str, Decision] = {}
    for _ in range(rounds):
        if not pending:
            break
        by_pointer: dict[str, list[Link]] = {}
        for pointer, link in pending:
            by_pointer.setdefault(pointer, []).append(link)
        groups = set(by_pointer) | set(table)
        pending, new_table = [], {}
        for pointer in groups:
            for tag, value in jump(pointer, table.get(pointer), by_pointer.get(pointer, ())):
                if tag == "decision":
                    decisions[value[0]] = value[1]
                elif tag == "link":
                    pending.append(value)
                else:
                    new_table[value[0]] = value[1]
        table = new_table
    for _, link in pending:
        decisions[link.key] = unresolved(link, rounds)
    return decisions


# ------------------------------------------------------------- exact / identical groups


class Member(NamedTuple):
    """What dedup needs of a record: its rank and hash. `neg_pixels` is
    `-pixels` so that tuples sort best first."""

    neg_pixels: int
    key: str
    phash: str | None


def group_links(
    members: Iterable[Member | tuple], reason: RejectReason, detail: str, in_table: bool
) -> tuple[Member, Iterator[tuple[str, Link]]]:
    """The best member of a group and a link for each other member pointing at
    it. Iterates `members` twice (a re-iterable, e.g. a GroupByKey value) and
    holds only the best member. Members may be plain `(neg_pixels, key, phash)`
    tuples, as they come out of a shuffle."""
    best = Member._make(min(members, key=_member_rank))
    links = (
        (best.key, Link(m[1], reason.value, detail.format(survivor=best.key), in_table))
        for m in members
        if m[1] != best.key
    )
    return best, links


def _member_rank(member: Member | tuple) -> tuple[int, str]:
    return member[0], member[1]


@dataclasses.dataclass(frozen=True)
class DedupItem:
    """A record reduced to what deduplication reads (for `plan_dedup`)."""

    key: str
    pixels: int
    sha256: str | None
    phash: str | None

    @classmethod
    def of(cls, record: SampleRecord) -> DedupItem:
        return cls(record.key, record.pixels, record.image_sha256, record.phash)


_EXACT_DETAIL = "same sha256 as {survivor}"
# Identical hashes are collapsed in stages (per batch, then per partition), so the
# copy a record was compared with depends on batching: name none.
_SAME_PHASH_DETAIL = "identical pHash (Hamming distance 0)"


def _near_detail(distance: int, threshold: int, neighbour: str) -> str:
    if distance == 0:
        return _SAME_PHASH_DETAIL
    return f"pHash Hamming distance {distance} <= {threshold} to {neighbour}"


def plan_dedup(items: Iterable[DedupItem], config: DedupConfig) -> dict[str, Decision]:
    """All of `Deduplicate`'s decisions computed in memory: key -> Decision for
    every dropped item, by the same rules, naming the same survivors with the
    same details; the steps are simpler (global dicts). For tests and small data."""
    items = list(items)
    links: list[tuple[str, Link]] = []
    near_input: list[Member] = []
    by_sha: dict[str, list[Member]] = {}
    for item in items:
        member = Member(-item.pixels, item.key, item.phash)
        if config.exact and item.sha256 is not None:
            by_sha.setdefault(item.sha256, []).append(member)
        else:
            near_input.append(member)
    for group in by_sha.values():
        best, group_out = group_links(group, RejectReason.EXACT_DUPLICATE, _EXACT_DETAIL, False)
        links.extend(group_out)
        near_input.append(best)
    if config.near:
        by_phash: dict[str, list[Member]] = {}
        for member in near_input:
            if member.phash is not None:
                by_phash.setdefault(member.phash, []).append(member)
        reps = []
        for group in by_phash.values():
            best, group_out = group_links(group, RejectReason.NEAR_DUPLICATE, _SAME_PHASH_DETAIL, True)
            links.extend(group_out)
            reps.append(best)
        hashes = phashes_to_array(m.phash for m in reps)
        best_parent: dict[str, tuple[int, str, int]] = {}
        for i, j, d in zip(*near_pairs(hashes, config.hamming_threshold)):
            a, b = reps[i], reps[j]
            winner, loser = (a, b) if _member_rank(a) < _member_rank(b) else (b, a)
            candidate = (winner.neg_pixels, winner.key, int(d))
            if loser.key not in best_parent or candidate < best_parent[loser.key]:
                best_parent[loser.key] = candidate
        for loser, (_, winner, d) in best_parent.items():
            detail = _near_detail(d, config.hamming_threshold, winner)
            links.append((winner, Link(loser, RejectReason.NEAR_DUPLICATE.value, detail, True)))
    if not config.near:
        return {link.key: Decision(link.reason, pointer, link.detail) for pointer, link in links}
    return resolve_links(links, config.max_survivor_rounds)


def key_partition(key: str, partitions: int) -> int:
    """Stable partition of a string key (CRC-32; Python's hash() is salted per process)."""
    return zlib.crc32(key.encode()) % partitions
