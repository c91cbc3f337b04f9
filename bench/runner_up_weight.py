"""How much the runner-up's score should raise the new_turtle bar: held-out open-set scores per weight.

    .venv/bin/python bench/runner_up_weight.py --checkpoint C [--split image --val-fraction 0.33 --seed N]

The checkpoint's validation photos are searched against its training photos exactly as ``reid fit`` validates:
the individuals with validation photos are dealt into four seeded folds, each fold in turn is removed from the
gallery so that its photos play new turtles, and the threshold fitted on the other folds is scored on it
(:func:`reid.evaluation.calibrate_on_held_out_individuals`, the function ``reid fit`` calls). Each weight is scored
on similarity alone and, when the checkpoint has verification (``verify: true``), on verified fused scores with the
checkpoint's own fusion. Printed after the closed-set MAP@5 by similarity (all validation individuals enrolled), as
a markdown table: known, unknown and balanced accuracy, and the AUROC of the
new_turtle score. The split options must be those the checkpoint was trained with (the file's split by default).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from reid.data.datamodule import ReIDDataModule
from reid.evaluation import calibrate_on_held_out_individuals, score_rankings, search_gallery
from reid.inference import CHECKPOINT_KEY, Embedder, read_checkpoint
from reid.verification import extract_all, verifier_factory


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name a checkpoint and the validation split it was trained with."""
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/turtles_dev"))
    parser.add_argument("--split", default="auto", help="the data.split the checkpoint was trained with")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0, help="data.seed: the split's and the folds' seed")
    parser.add_argument("--backend", default="onnx", choices=["torch", "onnx"])
    parser.add_argument("--test-crops", type=float, nargs="*", default=None,
                        help="embed with these centre crops instead of the checkpoint's own (model.test_crops)")


def validation_sets(args: argparse.Namespace) -> tuple[Embedder, pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray]:
    """The checkpoint's embedder, and its training (gallery) and validation (query) photos with their embeddings,
    drawn exactly as ``reid fit`` validated it."""
    embedder = Embedder.from_checkpoint(args.checkpoint, device="cpu", backend=args.backend)
    if args.test_crops is not None:
        embedder.preprocess = replace(embedder.preprocess, crops=tuple(args.test_crops))
    backbone = read_checkpoint(args.checkpoint)[CHECKPOINT_KEY]["backbone"]
    data = ReIDDataModule(str(args.data), split=args.split, val_fraction=args.val_fraction, seed=args.seed,
                          backbone=backbone, image_size=embedder.preprocess.image_size, check_images=False)
    data.setup("validate")
    gallery, queries = data.gallery_records, data.query_records
    return (embedder, gallery, embedder.embed(gallery["path"].tolist(), progress=True), queries,
            embedder.embed(queries["path"].tolist(), progress=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="runner-up weights to score")
    args = parser.parse_args()

    embedder, gallery, gallery_vectors, queries, query_vectors = validation_sets(args)
    modes = {"similarity": None}
    if embedder.verification is not None:
        fusion = embedder.verification.fusion
        modes["verified"] = verifier_factory(fusion, extract_all(gallery["path"].tolist(), fusion.extraction, True),
                                             extract_all(queries["path"].tolist(), fusion.extraction, True), memo={})

    identities = gallery["identity"].tolist()
    closed = score_rankings(search_gallery(gallery_vectors, identities, query_vectors, 5),
                            queries["identity"].tolist(), known=set(identities))
    print(f"{args.checkpoint} (split {args.split}, seed {args.seed}): {len(queries)} validation photos against "
          f"{len(gallery)} training photos; closed-set MAP@5 by similarity {closed.metrics['map5']:.3f}\n")
    print("| scores | runner-up weight | known | unknown | balanced accuracy | AUROC |")
    print("|---|---|---|---|---|---|")
    for mode, factory in modes.items():
        for weight in (float(w) for w in args.weights.split(",")):
            calibration = calibrate_on_held_out_individuals(
                gallery_vectors, gallery["identity"].tolist(), query_vectors, queries["identity"].tolist(),
                seed=args.seed, verifier_for=factory, runner_up_weight=weight)
            m = calibration.metrics
            print(f"| {mode} | {weight:g} | {m['known_accuracy']:.3f} | {m['unknown_accuracy']:.3f} | "
                  f"{m['balanced_accuracy']:.3f} | {m['auroc']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
