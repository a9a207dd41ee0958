"""Semantic dedup at scale: `SemanticDecisions` over synthetic CLIP-like embeddings.

    python -m benchmarks.semantic_bench [--embeddings 1000000] [--pairs 5000] [--dim 512]

Data: `--embeddings` L2-normalised `--dim`-d float16 vectors drawn around
`--centres` random centres (cosine ~0.55 to their centre, ~0.3 between two
vectors of one centre: CLIP-like neighbourhoods, no natural duplicates), with
`--pairs` planted near-duplicate pairs whose cosine is drawn uniformly from
[threshold + 0.005, 0.995]. Rows are generated inside the pipeline (by chunk,
from a seed), never held by the launcher.

Run on the DirectRunner with the default `SemanticDedupConfig` (threshold
0.95, 1000 clusters, a 100k sample, bound 20k embeddings per worker). Figures,
all from this one run:

* recall of planted pairs: both members end in one group (target 1.0)
* pairs compared (the `pairs_compared` counter) against all N(N-1)/2 pairs
* precision and recall against brute force on one generated chunk (every
  pair of the chunk compared with numpy), and every drop's cosine to its
  named neighbour >= the threshold
* wall time (target < 10 min for 1e6) and time per million embeddings, and a
  brute-force baseline: all pairs of one 20k-row chunk timed here and scaled
  by (N / 20k)**2 (an extrapolation, labelled as such)
* peak memory: the largest block pair a worker held (`block_rows` max) with
  the memory that block costs, and the peak RSS of this process, which holds
  every DirectRunner worker and the runner's shuffle buffers together (an
  upper bound on any one worker)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter

from schemas.config import SemanticDedupConfig
from stages.core.semantic import assign, brute_force_pairs, normalise, one_blas_thread
from stages.semantic_dedup import NAMESPACE, SemanticDecisions

CHUNK = 20_000


def _centres(count: int, dim: int, seed: int) -> np.ndarray:
    return normalise(np.random.default_rng(seed).standard_normal((count, dim)))


def generate_chunk(chunk: int, n: int, pairs: int, dim: int, centres: int, threshold: float, seed: int):
    """Rows `chunk*CHUNK ..` of the data set: (keys, float16 [m, dim], planted
    (key_a, key_b, cosine)). Each chunk holds its share of the planted pairs."""
    rng = np.random.default_rng([seed, chunk])
    start = chunk * CHUNK
    m = min(CHUNK, n - start)
    chunks = -(-n // CHUNK)
    planted = pairs // chunks + (1 if chunk < pairs % chunks else 0)
    c = _centres(centres, dim, seed)
    x = normalise(c[rng.integers(0, centres, m)] + 1.5 / np.sqrt(dim) * rng.standard_normal((m, dim)))
    found = []
    for p in range(planted):
        a, b = 2 * p, 2 * p + 1  # b becomes a near copy of a
        cos = rng.uniform(threshold + 0.005, 0.995)
        u = rng.standard_normal(dim).astype(np.float32)
        u -= (u @ x[a]) * x[a]
        u /= np.linalg.norm(u)
        x[b] = cos * x[a] + np.sqrt(1 - cos**2) * u
        found.append((a, b))
    keys = [f"{start + i:08d}" for i in range(m)]
    x16 = x.astype(np.float16)
    real = [(keys[a], keys[b], float(x16[a].astype(np.float32) @ x16[b].astype(np.float32))) for a, b in found]
    return keys, x16, real


class _Generate(beam.DoFn):
    def __init__(self, **params):
        self.params = params

    def process(self, chunk: int):
        keys, x, _ = generate_chunk(chunk, **self.params)
        clip = np.random.default_rng([7, chunk]).uniform(0.2, 0.4, len(keys))
        for key, vector, score in zip(keys, x, clip):
            yield (key, float(score), 512 * 512, vector.tobytes(), b"")


def run(args) -> dict:
    config = SemanticDedupConfig() if args.boundary is None else SemanticDedupConfig(boundary=args.boundary)
    params = dict(n=args.embeddings, pairs=args.pairs, dim=args.dim, centres=args.centres, threshold=config.threshold, seed=args.seed)
    chunks = -(-args.embeddings // CHUNK)
    out = tempfile.mkdtemp(prefix="semantic_bench_")
    decisions_path = os.path.join(out, "decisions")

    p = beam.Pipeline(runner="DirectRunner", options=beam.options.pipeline_options.PipelineOptions(["--direct_num_workers=1"]))
    rows = p | "Chunks" >> beam.Create(list(range(chunks))) | "Spread" >> beam.Reshuffle() | "Generate" >> beam.ParDo(_Generate(**params))
    (
        rows
        | SemanticDecisions(config, out)
        | "Json" >> beam.Map(lambda kv: json.dumps(list(kv[1])))
        | beam.io.WriteToText(decisions_path, shard_name_template="")
    )
    load_before = os.getloadavg()
    cpu_before = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    started = time.perf_counter()
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - started
    pipeline_cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu_before
    load_after = os.getloadavg()

    duplicates = {}
    with open(decisions_path) as f:
        for line in f:
            key, survivor, neighbour, similarity, size = json.loads(line)
            duplicates[key] = (survivor, neighbour, similarity, size)

    def root(key):
        return duplicates[key][0] if key in duplicates else key

    # The planted pairs, and how many of them k-means alone splits (nearest centroids differ: found only
    # through the boundary rule).
    centroids = np.load(os.path.join(out, "semantic", "centroids.npy"))
    planted, split = [], 0
    for chunk in range(chunks):
        keys_c, x_c, planted_c = generate_chunk(chunk, **params)
        planted += planted_c
        index_c = {k: i for i, k in enumerate(keys_c)}
        members = sorted({index_c[k] for a, b, _ in planted_c for k in (a, b)})
        with one_blas_thread():
            labels = dict(zip(members, assign(normalise(x_c[members]), centroids).tolist()))
        split += sum(labels[index_c[a]] != labels[index_c[b]] for a, b, _ in planted_c)
    found = sum(root(a) == root(b) for a, b, _ in planted)

    # Brute force on chunk 0: every pair above the threshold, and the groups the pipeline gave them.
    keys0, x0, _ = generate_chunk(0, **params)
    t0 = time.perf_counter()
    with one_blas_thread():  # as the pipeline's products run
        truth = brute_force_pairs(x0.astype(np.float32), config.threshold)
    brute_s = time.perf_counter() - t0
    brute_recall = sum(root(keys0[i]) == root(keys0[j]) for i, j in truth) / max(len(truth), 1)
    index0 = {k: i for i, k in enumerate(keys0)}
    x0f = x0.astype(np.float32)
    # Precision on chunk 0: every pair the pipeline joined (member, neighbour) is above the threshold by brute force.
    joined = [(k, v[1]) for k, v in duplicates.items() if k in index0 and v[1] in index0]
    precise = sum(float(x0f[index0[a]] @ x0f[index0[b]]) >= config.threshold - 1e-3 for a, b in joined)
    below = sum(v[2] < config.threshold for v in duplicates.values())

    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters = {c.key.metric.name: c.committed for c in metrics["counters"]}
    block_rows = [d.committed for d in metrics["distributions"] if d.key.metric.name == "block_rows"][0]
    n = args.embeddings
    all_pairs = n * (n - 1) // 2
    brute_1m = brute_s * (n / len(keys0)) ** 2
    block_bytes = block_rows.max * args.dim * (2 + 4) + config.batch_rows * block_rows.max * 4
    return {
        "embeddings": n,
        "dim": args.dim,
        "planted_pairs": len(planted),
        "planted_pairs_found": found,
        "recall_planted": found / len(planted),
        "planted_pairs_split_by_nearest_cluster": int(split),
        "boundary_assignments": counters.get("boundary_assignments", 0),
        "boundary_assignments_per_embedding": round(counters.get("boundary_assignments", 0) / n, 3),
        "boundary_capped": counters.get("boundary_capped", 0),
        "members_in_several_clusters": counters.get("members_in_several_clusters", 0),
        "dropped": len(duplicates),
        "drops_below_threshold": below,
        "brute_force_chunk_rows": len(keys0),
        "brute_force_chunk_pairs_above_threshold": len(truth),
        "recall_vs_brute_force_chunk": brute_recall,
        "precision_vs_brute_force_chunk": precise / max(len(joined), 1),
        "pairs_compared": counters.get("pairs_compared"),
        "all_pairs": all_pairs,
        "pairs_compared_fraction": counters.get("pairs_compared", 0) / all_pairs,
        "wall_s": round(wall, 1),
        "pipeline_cpu_s": round(pipeline_cpu, 1),
        "process_cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "cpus": os.cpu_count(),
        "load_average_1_5_15_min_before": [round(v, 2) for v in load_before],
        "load_average_1_5_15_min_after": [round(v, 2) for v in load_after],
        "s_per_million": round(wall / (n / 1e6), 1),
        "brute_force_s_extrapolated_to_n": round(brute_1m, 1),
        "block_rows_max": block_rows.max,
        "block_rows_mean": round(block_rows.mean, 1),
        "block_pairs": block_rows.count,
        "block_memory_mib_max": round(block_bytes / 2**20, 1),
        "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "config": config.model_dump(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", type=int, default=1_000_000)
    parser.add_argument("--pairs", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--centres", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boundary", type=float, default=None, help="override SemanticDedupConfig.boundary (0: plain SemDeDup)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
