"""stages.dedup: fast pHash, multi-index pair finding, survivor rules, the Beam transform."""

from __future__ import annotations

import io
import math
import pickle

import apache_beam as beam
import imagehash
import numpy as np
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageOps

from benchmarks.dedup_bench import crop_fraction, jpeg_bytes, resized, synthetic_photo
from schemas import DedupConfig, Provenance, RejectReason, SampleRecord, Stage
from stages import dedup
from stages.dedup import (
    DedupItem,
    Deduplicate,
    Link,
    band_layout,
    compute_phash,
    digest_image,
    hamming,
    max_chain_links,
    near_pairs,
    pairs_in_partition,
    phash_to_int,
    plan_dedup,
    resolve_links,
    sha256_hex,
)

# ------------------------------------------------------------------- pHash


def full_decode_phash(data: bytes) -> imagehash.ImageHash:
    """The reference: imagehash.phash on a full decode, EXIF-oriented."""
    return imagehash.phash(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))


def bits_apart(fast: str, reference: imagehash.ImageHash) -> int:
    return imagehash.hex_to_hash(fast) - reference


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(7)
    sizes = [(48, 40), (200, 150), (513, 700), (800, 600), (1280, 720), (1100, 1500), (2048, 1536)]
    return [(size, synthetic_photo(rng, *size)) for size in sizes]


def test_compute_phash_within_two_bits_of_full_decode(photos):
    apart = []
    for size, photo in photos:
        for quality in (70, 92):
            data = jpeg_bytes(photo, quality)
            distance = bits_apart(compute_phash(data), full_decode_phash(data))
            assert distance <= 2, (size, quality, distance)
            apart.append(distance)
    # Block-integrated LANCZOS weights make most hashes bit-identical (plain
    # resize of the draft image differs in about half of them).
    assert apart.count(0) >= len(apart) * 0.7, apart


def test_compute_phash_is_imagehash_exactly_without_draft(photos):
    photo = photos[3][1]
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert compute_phash(png.getvalue()) == str(imagehash.phash(photo))
    tiny = jpeg_bytes(photos[0][1], 90)  # 48x40: too small to scale down
    assert compute_phash(tiny) == str(full_decode_phash(tiny))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_compute_phash_applies_exif_orientation(photos, orientation):
    photo = photos[4][1]  # 1280x720
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    digest = digest_image(data)
    assert bits_apart(digest.phash, full_decode_phash(data)) <= 2
    assert bits_apart(digest.phash, imagehash.phash(photo)) > 10  # the unrotated image hashes differently
    assert (digest.width, digest.height) == ((720, 1280) if orientation in (6, 8) else (1280, 720))
    assert digest.format == "JPEG"


def test_same_duplicate_decisions_as_full_decode(photos):
    rng = np.random.default_rng(3)
    threshold = DedupConfig().hamming_threshold
    images = []
    for _, photo in photos[2:]:
        images += [
            jpeg_bytes(photo, 90),
            jpeg_bytes(photo, 40),
            jpeg_bytes(resized(photo, 0.5), 85),
            jpeg_bytes(crop_fraction(rng, photo), 85),
        ]
    fast = [compute_phash(d) for d in images]
    full = [str(full_decode_phash(d)) for d in images]
    groups = [i // 4 for i in range(len(images))]
    for a in range(len(images)):
        for b in range(a + 1, len(images)):
            same_fast = hamming(fast[a], fast[b]) <= threshold
            assert same_fast == (hamming(full[a], full[b]) <= threshold), (a, b)
            if groups[a] != groups[b]:
                assert not same_fast, (a, b)  # unrelated photos are far apart
            elif b % 4 in (1, 2):
                assert same_fast, (a, b)  # re-encoded and resized copies are found


def test_hash_of_pixels_is_imagehash_phash():
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, (32, 32)) for _ in range(20)]
    arrays += [rng.integers(0, 2, (32, 32)) * 255 for _ in range(5)]
    # Degenerate images, where many DCT coefficients tie with the median.
    arrays += [np.full((32, 32), 128), np.tile(np.arange(32) * 8, (32, 1)), np.eye(32) * 255]
    arrays += [np.indices((32, 32)).sum(axis=0) % 2 * 255, np.pad(np.full((16, 16), 200), 8)]
    for pixels in arrays:
        expected = str(imagehash.phash(Image.fromarray(pixels.astype(np.uint8), "L")))
        assert dedup._phash_of_pixels(pixels.astype(np.float64)) == expected


def test_compute_phash_raises_on_undecodable_bytes(photos):
    with pytest.raises(Exception):
        compute_phash(b"not an image at all")
    data = jpeg_bytes(photos[3][1], 90)
    with pytest.raises(OSError):
        compute_phash(data[: len(data) // 2])


def test_sha256_and_hex_parsing():
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert phash_to_int("ffffffffffffffff") == 2**64 - 1
    assert hamming("0000000000000000", "000000000000000f") == 4
    for bad in ("abc", "0x12345678901234", "zzzzzzzzzzzzzzzz", "00 11 22 33 4455"):
        with pytest.raises(ValueError):
            phash_to_int(bad)


# ------------------------------------------------------------ pair finding


@pytest.mark.parametrize("threshold", [0, 1, 6, 12])
def test_band_layout_covers_all_bits(threshold):
    layout = band_layout(threshold)
    assert layout.bands == threshold + 1
    assert sum(layout.widths) == 64 and max(layout.widths) - min(layout.widths) <= 1
    covered = 0
    for band in range(layout.bands):
        covered |= int(layout.mask(band))
    assert covered == 2**64 - 1


def planted_hashes(rng, n, threshold, clusters=True):
    """Random hashes, a third of them with a partner 0..threshold+2 bits away,
    plus (optionally) tight clusters, so pairs exist on both sides of the threshold."""
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    for k in range(0, n - 1, 3):
        flips = rng.choice(64, size=int(rng.integers(0, threshold + 3)), replace=False)
        hashes[k + 1] = hashes[k] ^ np.uint64(sum(1 << int(b) for b in flips))
    if clusters:
        for k in range(0, n - 8, 97):
            for m in range(1, 6):
                flips = rng.choice(64, size=int(rng.integers(0, threshold + 1)), replace=False)
                hashes[k + m] = hashes[k] ^ np.uint64(sum(1 << int(b) for b in flips))
    return hashes


def brute_force(hashes, threshold):
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(dist <= threshold, 1))
    return {(int(a), int(b)): int(dist[a, b]) for a, b in zip(i, j)}


@pytest.mark.parametrize("threshold", [0, 2, 6, 9])
def test_near_pairs_equal_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    hashes = planted_hashes(rng, 2500, threshold)
    i, j, d = near_pairs(hashes, threshold)
    found = list(zip(i.tolist(), j.tolist()))
    assert len(found) == len(set(found)), "a pair was reported twice"
    assert dict(zip(found, d.tolist())) == brute_force(hashes, threshold)


def test_long_runs_are_compared_in_tiles(monkeypatch):
    monkeypatch.setattr(dedup, "_TILE_ROWS", 16)
    monkeypatch.setattr(dedup, "_TILE_COLS", 50)
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
    keep, losers = dedup.collapse_identical(hashes, neg_pixels, keys)
    # 5: c and b have 20 px, b has the smaller key; 9: e and f tie, e wins.
    assert keep.tolist() == [3, 4, 5]
    assert sorted((keys[a], keys[b]) for a, b in losers) == [("a", "b"), ("c", "b"), ("f", "e")]
    keep, losers = dedup.collapse_identical(np.array([1, 2, 3], dtype=np.uint64), np.zeros(3), ["x", "y", "z"])
    assert keep.tolist() == [0, 1, 2] and losers == []


def test_key_blob_slices_and_round_trips():
    keys = ["k1", "", "ünïcode", "a-much-longer-key-0000001", "z"]
    blob = dedup.KeyBlob.of(keys)
    assert [blob[i] for i in range(len(blob))] == keys
    taken = blob.take(np.array([3, 0, 2]))
    again = dedup.KeyBlob.from_bytes(*taken.to_bytes())
    joined = dedup.KeyBlob.concat([again, blob])
    assert [joined[i] for i in range(len(joined))] == [keys[3], keys[0], keys[2], *keys]
    assert len(blob.take(np.array([], dtype=np.int64))) == 0


def test_key_partition_is_stable_across_processes():
    # CRC-32, not the per-process salted hash(): every worker must agree.
    assert dedup.key_partition("abc", 1 << 32) == 0x352441C2
    assert all(0 <= dedup.key_partition(f"k{i}", 7) < 7 for i in range(100))


# ------------------------------------------------------------ decisions


def item(key, pixels, sha=None, phash=None):
    return DedupItem(key, pixels, sha, phash)


def drops(decisions):
    return {k: (d.reason, d.survivor) for k, d in decisions.items()}


EXACT, NEAR = RejectReason.EXACT_DUPLICATE.value, RejectReason.NEAR_DUPLICATE.value


def test_exact_survivor_is_largest_then_smallest_key():
    items = [item("b", 100, "s1"), item("a", 100, "s1"), item("c", 99, "s1"), item("z", 400, "s2"), item("y", 1, "s2")]
    assert drops(plan_dedup(items, DedupConfig(near=False))) == {
        "b": (EXACT, "a"),
        "c": (EXACT, "a"),
        "y": (EXACT, "z"),
    }


def flip(phash: str, *bits: int) -> str:
    value = phash_to_int(phash)
    for b in bits:
        value ^= 1 << b
    return f"{value:016x}"


BASE = "9f3c1a7e5b2d4c60"


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


def kept_pairs_within(items, decisions, threshold):
    kept = [i for i in items if i.key not in decisions and i.phash is not None]
    hashes = np.array([phash_to_int(i.phash) for i in kept], dtype=np.uint64)
    return len(brute_force(hashes, threshold)) if len(kept) else 0


def random_items(rng, n, threshold):
    """Items whose sha ids are drawn with repeats (exact copies share the pHash,
    as equal bytes do), over hashes with planted near pairs; some items have an
    identical pHash under other bytes, no pHash, or no sha."""
    hashes = planted_hashes(rng, n, threshold)
    sha_ids = rng.integers(0, int(n * 0.9), size=n)
    out = []
    for i in range(n):
        source = sha_ids[i - 1] if i % 41 == 1 else sha_ids[i]
        phash = None if i % 53 == 0 else f"{int(hashes[source]):016x}"
        sha = None if i % 61 == 0 else f"sha{sha_ids[i]}"
        out.append(item(f"k{i:05d}", int(rng.integers(1, 5)) ** 2 * 100, sha, phash))
    return out


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


# ------------------------------------------------------------ Beam


def record(it: DedupItem) -> SampleRecord:
    side = math.isqrt(it.pixels)
    assert side * side == it.pixels, "test records use square images"
    return SampleRecord(
        key=it.key,
        url=f"https://example.com/{it.key}.jpg",
        caption_original="a caption",
        original_width=side,
        original_height=it.pixels // side if side else None,
        image_sha256=it.sha256,
        phash=it.phash,
        provenance=Provenance(source_file="part-0.parquet", source_row=int(it.key[1:]) if it.key[1:].isdigit() else 0),
    )


@pytest.mark.parametrize(
    "config",
    [
        DedupConfig(hamming_threshold=6, partitions_per_band=4, batch_size=97, key_partitions=7, max_survivor_rounds=3),
        DedupConfig(exact=False, hamming_threshold=4, partitions_per_band=2, batch_size=500, key_partitions=1),
        DedupConfig(near=False, batch_size=50, key_partitions=3),
    ],
    ids=["exact+near", "near-only", "exact-only"],
)
def test_deduplicate_transform_matches_plan(config):
    rng = np.random.default_rng(5)
    items = random_items(rng, 1200, config.hamming_threshold)
    records = [record(i) for i in items]
    plan = plan_dedup(items, config)
    assert plan, "the data must contain duplicates"
    expected_rejects = sorted((k, d.reason, d.survivor, d.detail) for k, d in plan.items())
    expected_kept = [r for r in records if r.key not in plan]
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(records) | Deduplicate(config)
        assert_that(out.kept, equal_to(expected_kept), label="Kept")
        rows = out.rejects | beam.Map(lambda r: (r.key, r.reason.value, r.duplicate_of, r.detail))
        assert_that(rows, equal_to(expected_rejects), label="Rejects")
        meta = out.rejects | beam.Map(lambda r: (r.stage, r.source_file, r.url == f"https://example.com/{r.key}.jpg"))
        assert_that(meta | beam.Distinct(), equal_to([(Stage.DEDUP, "part-0.parquet", True)]), label="Meta")


def test_deduplicate_in_separate_worker_processes():
    # The DoFns are pickled to SDK worker subprocesses, as on a portable runner.
    rng = np.random.default_rng(9)
    items = random_items(rng, 300, 6)
    config = DedupConfig(batch_size=50, key_partitions=5, partitions_per_band=4)
    expected = sorted((k, d.reason, d.survivor) for k, d in plan_dedup(items, config).items())
    options = PipelineOptions(flags=[], direct_num_workers=2, direct_running_mode="multi_processing")
    with BeamTestPipeline(runner=FnApiRunner(), options=options) as p:
        out = p | beam.Create([record(i) for i in items]) | Deduplicate(config)
        assert_that(out.rejects | beam.Map(lambda r: (r.key, r.reason.value, r.duplicate_of)), equal_to(expected))


def test_deduplicate_disabled_passes_everything():
    items = [item("a", 100, "s", BASE), item("b", 100, "s", BASE)]
    records = [record(i) for i in items]
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(records) | Deduplicate(DedupConfig(exact=False, near=False))
        assert_that(out.kept, equal_to(records), label="Kept")
        assert_that(out.rejects, equal_to([]), label="Rejects")


def chain_items(length):
    """A chain of records, each 4 bits from the previous and 8 from the one
    before that; ranks decrease along the chain, so k{i} points at k{i-1}."""
    hashes, current, bit = [], BASE, 0
    for _ in range(length):
        hashes.append(current)
        current = flip(current, bit, bit + 1, bit + 2, bit + 3)
        bit += 4
    return [item(f"k{i:02d}", (20 - i) ** 2, f"s{i}", h) for i, h in enumerate(hashes)]


def test_long_chain_resolves_to_its_root_in_beam():
    items = chain_items(15)  # 14 links: 4 rounds resolve up to 15
    config = DedupConfig(hamming_threshold=6, max_survivor_rounds=4, batch_size=4, key_partitions=3)
    assert {d.survivor for d in plan_dedup(items, config).values()} == {"k00"}
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create([record(i) for i in items]) | Deduplicate(config)
        rows = out.rejects | beam.Map(lambda r: (r.key, r.duplicate_of))
        assert_that(rows, equal_to([(i.key, "k00") for i in items[1:]]))


def test_unresolved_chain_is_rejected_without_a_survivor():
    items = chain_items(5)
    config = DedupConfig(hamming_threshold=6, max_survivor_rounds=1)
    plan = plan_dedup(items, config)
    assert plan["k01"].survivor == "k00" and plan["k04"].survivor is None
    with BeamTestPipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create([record(i) for i in items]) | Deduplicate(config)
        rows = out.rejects | beam.Map(lambda r: (r.key, r.duplicate_of, "raise max_survivor_rounds" in r.detail))
        expected = [("k01", "k00", False), ("k02", None, True), ("k03", None, True), ("k04", None, True)]
        assert_that(rows, equal_to(expected))


def test_duplicate_keys_fail_loudly():
    records = [record(item("k1", 100, "s1", BASE)), record(item("k1", 100, "s2", "0f0f0f0f0f0f0f0f"))]
    with pytest.raises(Exception, match="keys must be unique"):
        with BeamTestPipeline(runner=FnApiRunner()) as p:
            _ = p | beam.Create(records) | Deduplicate(DedupConfig())


def test_records_travel_as_exact_json():
    full = SampleRecord(
        key="000003-0000017",
        url="https://example.com/a.jpg",
        caption_original="a red kite over a beach",
        caption_synthetic="a kite",
        caption="a kite",
        declared_width=800,
        declared_height=600,
        original_width=1600,
        original_height=1200,
        width=512,
        height=384,
        image_format="jpg",
        image_bytes=12345,
        image_sha256="ab" * 32,
        phash=BASE,
        clip_similarity=0.3141592653589793,
        nsfw_score=1e-7,
        aesthetic_score=5.5,
        provenance=Provenance(
            source_file="s3://bucket/part-00003.parquet",
            source_row=17,
            final_url="https://cdn.example.com/a.jpg",
            http_status=200,
            content_type="image/jpeg",
            fetched_at="2024-05-01T12:34:56.789+02:00",
            pipeline_version="0.1.0",
        ),
        image_ref={"path": "/staging/0.bin", "offset": 10, "length": 99},
    )
    sparse = record(item("k7", 100, None, None))
    for original in (full, sparse):
        key, record_json, sha, neg_pixels, phash = dedup._row(original)
        assert SampleRecord.model_validate_json(record_json) == original
        assert (key, sha, neg_pixels, phash) == (original.key, original.image_sha256, -original.pixels, original.phash)
    with pytest.raises(ValueError, match="'k7'.*not 16 hex digits"):
        dedup._row(sparse.model_copy(update={"phash": "xyz"}))


def test_dofns_pickle():
    config = DedupConfig()
    dofns = [
        dedup._Split(True, True, config.key_partitions),
        dedup._Chunk("record", 0, config.key_partitions),
        dedup._ExactSurvivors(),
        dedup._BandChunks(config.hamming_threshold, config.partitions_per_band),
        dedup._NearPairs(config.hamming_threshold, config.partitions_per_band),
        dedup._NearLink(config.hamming_threshold),
        dedup._Jump(),
        dedup._Unresolved(3),
        dedup._Join(),
    ]
    for dofn in dofns:
        assert type(pickle.loads(pickle.dumps(dofn))) is type(dofn)
        assert type(pickler.loads(pickler.dumps(dofn))) is type(dofn)
    assert pickler.loads(pickler.dumps(Deduplicate(config))).config == config
