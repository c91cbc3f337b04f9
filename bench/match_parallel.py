"""Local-feature matching: one pair at a time (numpy's BLAS left to its own threads, or held to one) against
``reid.local_features.match_all`` (the pairs side by side, one core each), idle and beside a busy process.

A verified identify matches its query against the 80 most similar enrolled photos; `reid fit --verify` and
`reid calibrate --verify` do that for every validation and gallery photo. This times exactly that batch: each
query photo's features against 80 others, the three ways in turn on the same pairs (so the machine's drift falls
on all three), over ``--queries`` queries. ``--busy`` starts a process that spins on one core for the whole run,
as a second request or another job would. Run by hand:

    .venv/bin/python bench/match_parallel.py --data ../shared/data/turtles_dev [--busy]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import threadpoolctl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reid.data.records import read_dataset  # noqa: E402
from reid.local_features import LocalFeatures, match_all, match_features  # noqa: E402
from reid.verification import extract_all  # noqa: E402

CANDIDATES = 80


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _time(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a dataset of real photos (any layout)")
    parser.add_argument("--queries", type=int, default=12, help="query photos, each matched against 80 others")
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    args = parser.parse_args()

    paths = read_dataset(args.data)["path"].tolist()
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(paths), size=min(len(paths), args.queries + CANDIDATES), replace=False).tolist())
    features: list[LocalFeatures] = extract_all([paths[i] for i in chosen], progress=True)
    queries, gallery = features[:args.queries], features[args.queries:]
    batches = [[(query, photo) for photo in gallery] for query in queries]

    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,)) if args.busy else None
    if spinner is not None:
        spinner.start()
    times: dict[str, list[float]] = {"serial, BLAS's own threads": [], "serial, BLAS on one thread": [],
                                     "match_all (parallel)": []}
    try:
        for batch in batches:  # the three ways in turn on each query's 80 pairs
            times["serial, BLAS's own threads"].append(_time(lambda: [match_features(q, p) for q, p in batch]))
            with threadpoolctl.threadpool_limits(1, user_api="blas"):
                times["serial, BLAS on one thread"].append(_time(lambda: [match_features(q, p) for q, p in batch]))
            times["match_all (parallel)"].append(_time(lambda: match_all(batch)))
    finally:
        stop.set()
        if spinner is not None:
            spinner.join()

    reference = statistics.median(times["serial, BLAS's own threads"])
    print(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{len(batches)} queries x {CANDIDATES} photos of {args.data}, {os.cpu_count()} cores"
          + (", one kept busy by another process" if args.busy else ", idle") + "\n")
    print("| matching 80 photos a query | median (ms) | per match (ms) | speed-up |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.0f} | {median * 1000 / CANDIDATES:.1f} | {reference / median:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
