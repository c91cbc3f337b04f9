"""Cheap levers on top of a checkpoint's embeddings, measured on one dataset: test-time flips, alpha query
expansion, scoring an individual by the mean of its two best photos instead of its best one, and with ``--frozen F``
(the starting weights, written by `reid export`) two ways of keeping what fine-tuning forgot: the frozen embedding
concatenated with weight ``--frozen-weight`` (cosine + w x frozen cosine) and weight-space ensembles (WiSE-FT,
Wortsman et al. 2022: backbone weights and BatchNorm statistics (1 - a) x frozen + a x fine-tuned, for each
``--interpolate a``).

    .venv/bin/python bench/embedding_levers.py --checkpoint C [--data ../shared/data/turtles_dev] \
        [--frozen F --frozen-weight 0.5 --interpolate 0.7 0.85]

Each lever is scored on the dataset's own split (val queries against train photos) and on three re-drawn by-image
splits (a third of each individual's photos as queries, seeds 1-3); printed as a markdown table. For a checkpoint
fine-tuned on the dataset's train split, the re-drawn splits put training photos among the queries, so only the
dataset's split is an honest measure for it; for frozen features both are.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid.data.records import read_dataset
from reid.data.splits import split_by_image
from reid.imageio import decode_image
from reid.inference import Embedder, read_checkpoint
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


def interpolated(tuned: dict[str, Any], start: dict[str, Any], alpha: float) -> Embedder:
    """The fine-tuned checkpoint ``tuned`` with its backbone's float tensors moved back towards those of the
    checkpoint ``start`` (WiSE-FT); both are read once by the caller, and neither is changed."""
    state = {key: (1 - alpha) * start["state_dict"][key] + alpha * value
             if key.startswith("encoder.backbone.") and value.is_floating_point() else value
             for key, value in tuned["state_dict"].items()}
    with tempfile.TemporaryDirectory() as folder:
        torch.save({**tuned, "state_dict": state}, Path(folder) / "interpolated.ckpt")
        return Embedder.from_checkpoint(Path(folder) / "interpolated.ckpt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/turtles_dev"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--frozen", type=Path, help="the starting weights as a checkpoint (`reid export`)")
    parser.add_argument("--frozen-weight", type=float, default=0.5, help="w in cosine + w x frozen cosine")
    parser.add_argument("--interpolate", type=float, nargs="*", default=[], help="WiSE-FT alphas (needs --frozen)")
    args = parser.parse_args()
    if args.interpolate and args.frozen is None:
        parser.error("--interpolate needs --frozen")

    records = read_dataset(args.data)
    identities = np.asarray(records["identity"].tolist(), dtype=object)
    embedder = Embedder.from_checkpoint(args.checkpoint)

    def embedded(by: Embedder, images: list | None = None) -> np.ndarray:
        """The dataset's photos (or ``images`` made from them) embedded by ``by``."""
        return by.embed(records["path"].tolist() if images is None else images, batch_size=args.batch_size,
                        progress=True)

    plain = embedded(embedder)
    flipped = embedded(embedder, [np.ascontiguousarray(decode_image(p)[:, ::-1]) for p in records["path"]])
    splits = [("dataset split", (records["split"] == "val").to_numpy())]
    splits += [(f"by image, seed {s}", (split_by_image(records, 0.33, s) == "val").to_numpy()) for s in (1, 2, 3)]
    variants: dict[str, Callable[[], np.ndarray]] = {"plain": lambda: plain,
                                                     "flip TTA": lambda: normalised(plain + flipped)}
    if args.frozen is not None:
        frozen = embedded(Embedder.from_checkpoint(args.frozen))
        variants[f"+ {args.frozen_weight} x frozen"] = lambda: normalised(
            np.hstack([plain, np.sqrt(args.frozen_weight) * frozen]))
        tuned, start = read_checkpoint(args.checkpoint), read_checkpoint(args.frozen)
        for alpha in args.interpolate:
            variants[f"WiSE-FT a={alpha}"] = lambda alpha=alpha: embedded(interpolated(tuned, start, alpha))
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
