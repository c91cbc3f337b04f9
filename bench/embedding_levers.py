"""Cheap levers on top of a checkpoint's embeddings, measured on one dataset: test-time flips, alpha query
expansion, scoring an individual by the mean of its two best photos instead of its best one.

    .venv/bin/python bench/embedding_levers.py --checkpoint C [--data ../shared/data/turtles_dev]

Each lever is scored on the dataset's own split (val queries against train photos) and on three re-drawn by-image
splits (a third of each individual's photos as queries, seeds 1-3); printed as a markdown table. For a checkpoint
fine-tuned on the dataset's train split, the re-drawn splits put training photos among the queries, so only the
dataset's split is an honest measure for it; for frozen features both are.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from reid.data.records import read_dataset
from reid.data.splits import split_by_image
from reid.imageio import decode_image
from reid.inference import Embedder
from reid.metrics import map_at_k, rank_individuals


def normalised(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def ranked(queries: np.ndarray, gallery: np.ndarray, identities: np.ndarray, by: str) -> list[list[str]]:
    """Top-5 individuals per query, each scored by its best photo (``max``) or the mean of its best two."""
    answers = []
    for scores in queries @ gallery.T:
        order = np.argsort(-scores)
        if by == "max":
            answers.append([hit.individual for hit in rank_individuals(scores[order], identities[order].tolist(), 5)])
            continue
        per_individual: dict[str, list[float]] = {}
        for j in order:
            per_individual.setdefault(identities[j], []).append(float(scores[j]))
        mean_top2 = {name: float(np.mean(values[:2])) for name, values in per_individual.items()}
        answers.append(sorted(mean_top2, key=lambda name: -mean_top2[name])[:5])
    return answers


def query_expansion(queries: np.ndarray, gallery: np.ndarray, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """alpha-QE (Radenovic et al., 2018): add the top-k gallery neighbours, weighted by similarity**alpha."""
    scores = queries @ gallery.T
    top = np.argsort(-scores, axis=1)[:, :k]
    weights = np.take_along_axis(scores, top, 1).clip(0) ** alpha
    return normalised(queries + (weights[:, :, None] * gallery[top]).sum(axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/turtles_dev"))
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    records = read_dataset(args.data)
    identities = np.asarray(records["identity"].tolist(), dtype=object)
    embedder = Embedder.from_checkpoint(args.checkpoint)
    plain = embedder.embed(records["path"].tolist(), batch_size=args.batch_size, progress=True)
    flipped = embedder.embed([np.ascontiguousarray(decode_image(p)[:, ::-1]) for p in records["path"]],
                             batch_size=args.batch_size, progress=True)
    splits = [("dataset split", (records["split"] == "val").to_numpy())]
    splits += [(f"by image, seed {s}", (split_by_image(records, 0.33, s) == "val").to_numpy()) for s in (1, 2, 3)]
    variants: dict[str, Callable[[], np.ndarray]] = {"plain": lambda: plain,
                                                     "flip TTA": lambda: normalised(plain + flipped)}
    print(f"checkpoint {args.checkpoint}, data {args.data}\n")
    print("| embedding | individual scored by | query expansion | MAP@5 dataset split | MAP@5 re-drawn (mean ± std) |")
    print("|---|---|---|---|---|")
    for name, vectors in variants.items():
        embeddings = vectors()
        for by in ("max", "mean of top 2"):
            for expand in (False, True):
                scores = []
                for _, is_query in splits:
                    queries, gallery = embeddings[is_query], embeddings[~is_query]
                    if expand:
                        queries = query_expansion(queries, gallery)
                    answers = ranked(queries, gallery, identities[~is_query], "max" if by == "max" else "top2")
                    scores.append(map_at_k(answers, identities[is_query].tolist()))
                print(f"| {name} | {'best photo' if by == 'max' else by} | {'alpha-QE' if expand else 'no'} | "
                      f"{scores[0]:.4f} | {np.mean(scores[1:]):.4f} ± {np.std(scores[1:]):.4f} |", flush=True)


if __name__ == "__main__":
    main()
