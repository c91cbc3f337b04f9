"""Gallery search at scale by index kind: build time, memory, latency, and agreement with exact search.

Run by hand (prints a markdown table; the 1M run took 16 min on 2 cores and peaked at 5.9 GiB):

    .venv/bin/python bench/gallery_search.py --photos 1000000 --dim 512 --queries 500

Data. Seeded synthetic embeddings with the structure of real ones, generated in float32 chunks so that making
them needs little memory beyond the photos: individuals belong to a few hundred populations (one per 2,000
photos, of lognormal sizes), some come in families of look-alikes (hard near neighbours), and each has 4-12
photos. A photo's cosine to its individual's other photos is ~0.65-0.85, to photos of unrelated individuals ~0,
~0.2-0.4 within a population and more within a family; the run prints the measured spread. Queries are
held-out photos of enrolled individuals (one each, never in the gallery).

Protocol. Each kind is a ``reid.gallery.Gallery`` built as the service loads its store (``ivf`` trained once, on a
seeded sample drawn from all the photos: ``reid.gallery.train_for_batches``), then filled in 10,000-photo batches,
and searched one query at a time
with ``Gallery.search(query, k=5)``, which ranks individuals by their best photo. Exact (``flat``) search runs
first in the same process, and every other kind is compared with it:

- recall@5 of individuals: for query q let E(q) be the individuals exact search ranks in its top 5 and A(q)
  those the approximate index ranks in its top 5; recall@5 = mean over queries of |A(q) & E(q)| / |E(q)|;
- recall@5, hits >= 0.3: the same with E(q) cut to the individuals whose best photo has cosine >= 0.3 with the
  query (queries with none are left out): the hits a person might look at, as opposed to unrelated photos that
  rank 2nd-5th only because a query has one true match (such photos are scattered over every IVF list);
- top-1 agreement: share of queries whose first individual is exact search's first individual;
- p50 / p99: wall time of one ``Gallery.search`` call (one query) after 5 untimed warm-up queries;
- speed vs exact: exact p50 / this kind's p50, both from this run;
- build: seconds to train (ivf) and add every photo;
- index MiB: size of the FAISS index written to a file (vectors, lists, graph, ids); RSS +MiB: growth of the
  process's resident memory while the gallery was built, which adds the gallery's Python-side id maps, unused
  capacity of growing arrays and heap the allocator kept after training (the gallery keeps no copy of the vectors
  beside FAISS).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import tempfile
import time
from dataclasses import dataclass

import faiss
import numpy as np

from reid.gallery import Gallery, train_for_batches

BATCH = 10_000  # photos per Gallery.add, as service.store.Store.embeddings yields them
K = 5
STRONG = 0.3  # cosine of the "hits >= 0.3" recall: above unrelated photos (p95 0.07), below related individuals


@dataclass
class Synthetic:
    vectors: np.ndarray  # photos x dim, unit rows
    owner: np.ndarray  # individual of each photo
    queries: np.ndarray  # queries x dim, unit rows
    query_owner: np.ndarray  # individual of each query


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def synthetic(photos: int, dim: int, queries: int, seed: int = 0, families_per_chunk: int = 5_000) -> Synthetic:
    """Embeddings with populations, families and individuals (see the module docstring), built chunk by chunk.

    An individual's vector is sqrt(wp)*population + sqrt(wf)*family + sqrt(1-wp-wf)*own, all unit and nearly
    orthogonal in high dimension, so two individuals' cosine is the weight they share; a photo adds noise of
    variance 0.1-0.6 to its individual and is normalised.
    """
    rng = np.random.default_rng(seed)
    populations = max(1, photos // 2_000)
    centres = _unit(rng, populations, dim)
    population_share = rng.lognormal(0.0, 1.0, populations)
    counts = rng.integers(4, 13, size=photos // 4 + 1)  # photos per individual; enough individuals for `photos`
    individuals = int(np.searchsorted(np.cumsum(counts), photos)) + 1
    counts = counts[:individuals]
    counts[-1] -= int(counts.sum()) - photos
    family = np.repeat(np.arange(individuals), rng.geometric(0.6, size=individuals))[:individuals]
    families = int(family[-1]) + 1
    family_population = rng.choice(populations, size=families, p=population_share / population_share.sum())
    in_family = np.bincount(family)[family] > 1
    wp = (0.05 + 0.35 * rng.beta(2, 3, size=individuals)).astype(np.float32)
    wf = np.where(in_family, rng.uniform(0.2, 0.6, size=individuals), 0.0).astype(np.float32)
    query_owner = np.sort(rng.choice(individuals, size=queries, replace=False))
    vectors = np.empty((photos, dim), np.float32)
    query_vectors = np.empty((queries, dim), np.float32)
    first_photo = np.concatenate([[0], np.cumsum(counts)])
    family_start = np.searchsorted(family, np.arange(0, families + families_per_chunk, families_per_chunk))
    for chunk, (start, stop) in enumerate(itertools.pairwise(family_start)):
        if start == stop:
            break
        chunk_rng = np.random.default_rng([seed, chunk])
        members = slice(int(start), int(stop))
        fam = family[members]
        family_vectors = _unit(chunk_rng, int(fam[-1] - fam[0]) + 1, dim)[fam - fam[0]]
        own = _unit(chunk_rng, stop - start, dim)
        individual_vectors = (np.sqrt(wp[members])[:, None] * centres[family_population[fam]]
                              + np.sqrt(wf[members])[:, None] * family_vectors
                              + np.sqrt(1.0 - wp[members] - wf[members])[:, None] * own)
        photo_rows = slice(int(first_photo[start]), int(first_photo[stop]))
        photo_owner = np.repeat(np.arange(stop - start), counts[members])
        vectors[photo_rows] = _noisy(chunk_rng, individual_vectors[photo_owner])
        asked = np.flatnonzero((query_owner >= start) & (query_owner < stop))
        query_vectors[asked] = _noisy(chunk_rng, individual_vectors[query_owner[asked] - start])
    return Synthetic(vectors, np.repeat(np.arange(individuals), counts), query_vectors, query_owner)


def _noisy(rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Photos of individuals: noise of variance 0.1-0.6 (photo quality varies) added, then normalised."""
    noise = np.sqrt(rng.uniform(0.1, 0.6, size=len(centres))).astype(np.float32)
    photos = centres + noise[:, None] * _unit(rng, len(centres), centres.shape[1])
    return photos / np.linalg.norm(photos, axis=1, keepdims=True)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _percentiles(values: np.ndarray) -> str:
    return "/".join(f"{v:.2f}" for v in np.nanpercentile(values, [5, 50, 95]))


def _index_mib(gallery: Gallery) -> float:
    """Size of the FAISS index written to a file (serialising in memory would add a copy to the peak RSS)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.faiss")
        faiss.write_index(gallery._master, path)
        return os.path.getsize(path) / 2**20


def _spread(data: Synthetic, exact: list[list[tuple[str, float]]]) -> str:
    """Measured cosines: query to its individual's gallery photos, to the best other individual, to any photo."""
    own: list[np.ndarray] = []
    best_other: list[float] = []
    order = np.argsort(data.owner, kind="stable")
    starts = np.searchsorted(data.owner[order], data.query_owner)
    stops = np.searchsorted(data.owner[order], data.query_owner, side="right")
    for query, start, stop in zip(data.queries, starts, stops):
        own.append(data.vectors[order[start:stop]] @ query)
    for owner, ranking in zip(data.query_owner, exact):
        others = [score for name, score in ranking if name != f"ind{owner}"]
        best_other.append(others[0] if others else float("nan"))
    sample = np.random.default_rng(1).choice(len(data.vectors), 2_000, replace=False)
    anyone = (data.queries[:100] @ data.vectors[sample].T).ravel()
    top1_true = np.mean([ranking[0][0] == f"ind{owner}" for ranking, owner in zip(exact, data.query_owner)])
    return (f"cosine (p5/p50/p95): query to own photos {_percentiles(np.concatenate(own))}, to best other "
            f"individual {_percentiles(np.array(best_other))}, to a random photo {_percentiles(anyone)}; exact "
            f"top-1 is the true individual for {top1_true:.3f} of queries")


@dataclass
class Row:
    kind: str
    build_s: float
    index_mib: float
    rss_mib: float
    p50_ms: float
    p99_ms: float
    rankings: list[list[tuple[str, float]]]


def measure(kind: str, data: Synthetic, identities: list[str]) -> Row:
    """Build one kind's gallery as the service loads its store (an IVF index trained once on a sample of all the
    photos, then the photos added in service-sized batches) and time one-query searches."""
    gc.collect()
    rss = _rss_mib()
    start = time.perf_counter()
    gallery = Gallery(data.vectors.shape[1], kind=kind, use_gpu=False)
    train_for_batches(gallery, len(data.vectors),
                      (data.vectors[first:first + BATCH] for first in range(0, len(data.vectors), BATCH)))
    for first in range(0, len(data.vectors), BATCH):
        rows = slice(first, first + BATCH)
        gallery.add(np.arange(first, min(first + BATCH, len(data.vectors))), data.vectors[rows], identities[rows])
    build = time.perf_counter() - start
    grown = _rss_mib() - rss
    for query in data.queries[:5]:
        gallery.search(query[None], k=K)
    latencies: list[float] = []
    rankings: list[list[tuple[str, float]]] = []
    for query in data.queries:
        start = time.perf_counter()
        ranking = gallery.search(query[None], k=K)[0]
        latencies.append(time.perf_counter() - start)
        rankings.append([(hit.individual, hit.score) for hit in ranking])
    row = Row(_describe(kind, gallery), build, _index_mib(gallery), grown,
              float(np.percentile(latencies, 50)) * 1000, float(np.percentile(latencies, 99)) * 1000, rankings)
    del gallery
    return row


def _describe(kind: str, gallery: Gallery) -> str:
    index = gallery._master
    if kind == "ivf":
        return f"ivf ({index.nlist} lists, nprobe {index.nprobe}, trained at {gallery._ivf_trained_on:,} photos)"
    if kind == "hnsw":
        hnsw = faiss.downcast_index(index.index).hnsw
        return f"hnsw (M {hnsw.nb_neighbors(1)}, efConstruction {hnsw.efConstruction}, efSearch {hnsw.efSearch})"
    return "flat (exact, default)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", default="hnsw,ivf", help="approximate kinds to compare with flat, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("```bash\n.venv/bin/python bench/gallery_search.py " + " ".join(
        f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items()) + "\n```\n")
    start = time.perf_counter()
    data = synthetic(args.photos, args.dim, args.queries, args.seed)
    identities = [f"ind{i}" for i in data.owner]
    print(f"{args.photos:,} photos of {len(np.unique(data.owner)):,} individuals, dim {args.dim}, "
          f"{args.queries} held-out queries, k={K} individuals; data made in {time.perf_counter() - start:.0f} s; "
          f"FAISS {faiss.__version__} with {faiss.omp_get_max_threads()} OpenMP threads, "
          f"{os.cpu_count()} CPUs, no GPU used")
    exact = measure("flat", data, identities)
    print(_spread(data, exact.rankings) + "\n")
    print("| index | build (s) | index MiB | RSS +MiB | p50 ms/query | p99 ms/query | recall@5 individuals "
          f"| recall@5, hits >= {STRONG} | top-1 agreement | speed vs exact (p50) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in ["flat", *[k for k in args.kinds.split(",") if k and k != "flat"]]:
        row = exact if kind == "flat" else measure(kind, data, identities)
        recall = _recall(row.rankings, exact.rankings, -math.inf)
        strong = _recall(row.rankings, exact.rankings, STRONG)
        top1 = np.mean([got[0][0] == want[0][0] for got, want in zip(row.rankings, exact.rankings)])
        print(f"| {row.kind} | {row.build_s:.1f} | {row.index_mib:,.0f} | {row.rss_mib:,.0f} | {row.p50_ms:.2f} "
              f"| {row.p99_ms:.2f} | {recall:.4f} | {strong:.4f} | {top1:.3f} | {exact.p50_ms / row.p50_ms:.1f}x |",
              flush=True)
    print(f"\npeak RSS {_peak_rss_gib():.1f} GiB, total {time.perf_counter() - start:.0f} s")


def _recall(rankings: list[list[tuple[str, float]]], exact: list[list[tuple[str, float]]], floor: float) -> float:
    """Mean share of each query's exact top-k individuals scoring >= ``floor`` that ``rankings`` also holds."""
    shares = []
    for got, want in zip(rankings, exact):
        wanted = {name for name, score in want if score >= floor}
        if wanted:
            shares.append(len({name for name, _ in got} & wanted) / len(wanted))
    return float(np.mean(shares))


def _peak_rss_gib() -> float:
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return peak_kib / 2**20


if __name__ == "__main__":
    main()
