"""Gallery search time and agreement with exact search, by index kind and gallery size.

Random unit vectors stand in for embeddings (clustered around "individuals" so neighbours mean something). Each
kind is built from the same vectors in one run; "agreement" is the share of queries whose top individual is the
one exact (flat) search returns. Run by hand:

    .venv/bin/python bench/gallery_search.py --photos 100000 --dim 1280 --queries 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from reid.gallery import Gallery


def clustered(rng: np.random.Generator, photos: int, dim: int, per_individual: int) -> tuple[np.ndarray, list[str]]:
    individuals = max(1, photos // per_individual)
    centres = rng.normal(size=(individuals, dim)).astype(np.float32)
    owner = np.repeat(np.arange(individuals), per_individual)[:photos]
    vectors = centres[owner] + 0.7 * rng.normal(size=(photos, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, [f"ind{i}" for i in owner]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--per-individual", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vectors, identities = clustered(rng, args.photos, args.dim, args.per_individual)
    queries = vectors[rng.choice(len(vectors), args.queries, replace=False)] + 0.3 * rng.normal(
        size=(args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_top: list[str] = []
    print(f"{args.photos} photos of {args.photos // args.per_individual} individuals, dim {args.dim}, "
          f"{args.queries} queries, k=5 individuals")
    print("| index | build (s) | search per query (ms) | top-1 agrees with flat |")
    print("|---|---|---|---|")
    for kind in ("flat", "hnsw", "ivf"):
        start = time.perf_counter()
        gallery = Gallery(args.dim, kind=kind)
        gallery.add(np.arange(len(vectors)), vectors, identities)
        built = time.perf_counter() - start
        start = time.perf_counter()
        rankings = [gallery.search(queries[i:i + 1], k=5)[0] for i in range(args.queries)]
        per_query = (time.perf_counter() - start) / args.queries * 1000
        top = [r[0][0] for r in rankings]
        if kind == "flat":
            exact_top = top
        agreement = float(np.mean([a == b for a, b in zip(top, exact_top)]))
        print(f"| {kind} | {built:.1f} | {per_query:.2f} | {agreement:.3f} |")


if __name__ == "__main__":
    main()
