"""What local verification costs and buys in the service: identify latency and accuracy with it on and off.

Starts a real ``reid serve --verify`` on 127.0.0.1 with a fresh data dir, enrols every photo of the gallery split
over HTTP (one POST /individuals per identity; local features are extracted and stored at enrolment), identifies
every photo of the query split, then restarts the server on the same data dir with ``--no-verify`` and identifies
them again. Prints a markdown table and the latency ratio: identify p50/p95; rank-1; rank-1 on enrolled
individuals' photos with new_turtle skipped (the ranking's quality whatever the threshold); MAP@5; how often
new_turtle came first. The checkpoint must be calibrated with ``reid calibrate --verify``. Run by hand:

    nice .venv/bin/python bench/identify_verification.py --checkpoint verified.ckpt \\
        --data ../shared/data/turtles_dev [--fallback-checkpoint fallback.ckpt]

``--fallback-checkpoint`` names the same checkpoint calibrated with ``reid calibrate --verify --fallback N`` (the ASIFT
fallback): a third server serves it on the same data folder, and answers the queries twice, since the first pass
extracts each gallery photo's fallback features the first time a query needs them and the second reads them back.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd

# a sibling script: python puts bench/ on the path
from service_walkthrough import free_port, wait_until_up

from reid.data.records import read_dataset
from reid.metrics import NEW_TURTLE, map_at_k

log = logging.getLogger("bench.identify_verification")

#: Requests sent before timing starts: the first ones pay for lazy initialisation (allocator, thread pools).
WARM_UP = 3


@dataclass(frozen=True)
class Run:
    """One server run's answers to every query."""

    label: str
    latencies_s: list[float]
    answers: list[list[str]]
    inliers_reported: int

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[round(q * (len(ordered) - 1))] * 1000


def start_server(checkpoint: Path, data_dir: Path, verify: bool, log_path: Path) -> tuple[subprocess.Popen, str]:
    """A `reid serve` on a free loopback port, once it answers."""
    port = free_port()
    with log_path.open("ab") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "reid.cli", "serve", "--checkpoint", str(checkpoint),
                                   "--data-dir", str(data_dir), "--port", str(port),
                                   "--verify" if verify else "--no-verify"], stdout=server_log, stderr=server_log)
    base = f"http://127.0.0.1:{port}"
    wait_until_up(base, server, limit_s=1800)  # a verifying server extracts missing features before it answers
    return server, base


def enrol(base: str, gallery: pd.DataFrame) -> float:
    """Enrol each identity's photos with one request; returns the seconds it took in all."""
    started = time.perf_counter()
    with httpx.Client(base_url=base, timeout=600.0) as client:
        for identity, rows in gallery.groupby("identity", sort=True):
            files = [("files", (Path(p).name, Path(p).read_bytes())) for p in rows["path"]]
            client.post("/individuals", data={"individual_id": identity}, files=files).raise_for_status()
    return time.perf_counter() - started


def identify_all(base: str, queries: pd.DataFrame, k: int, verify: bool, label: str) -> Run:
    latencies, answers, inliers = [], [], 0
    with httpx.Client(base_url=base, timeout=600.0) as client:
        health = client.get("/health").json()
        if health["verification"] is not verify:
            raise SystemExit(f"server says verification={health['verification']}, expected {verify}")
        uploads = [(Path(p).name, Path(p).read_bytes()) for p in queries["path"]]
        for upload in uploads[:WARM_UP]:
            client.post("/identify", files={"file": upload}, data={"k": str(k)}).raise_for_status()
        for upload in uploads:
            start = time.perf_counter()
            response = client.post("/identify", files={"file": upload}, data={"k": str(k)})
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            predictions = response.json()["predictions"]
            answers.append([p["individual_id"] for p in predictions])
            inliers += sum(p["evidence"] is not None and p["evidence"]["inliers"] is not None for p in predictions)
    return Run(label, latencies, answers, inliers)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint calibrated with --verify")
    parser.add_argument("--data", required=True, type=Path, help="dataset with a split column")
    parser.add_argument("--gallery-split", default="train", help="split whose photos are enrolled")
    parser.add_argument("--query-split", default="val", help="split whose photos are identified")
    parser.add_argument("--k", type=int, default=5, help="individuals per answer")
    parser.add_argument("--fallback-checkpoint", type=Path,
                        help="the same checkpoint calibrated with `reid calibrate --verify --fallback N`")
    parser.add_argument("--server-log", type=Path, default=Path("identify_verification_server.log"),
                        help="where the servers' output goes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    records = read_dataset(args.data)
    gallery = records[records["split"] == args.gallery_split]
    queries = records[records["split"] == args.query_split]
    if gallery.empty or queries.empty:
        raise SystemExit(f"{args.data}: no photos in split {args.gallery_split!r} or {args.query_split!r}")
    truths = [identity if identity in set(gallery["identity"]) else NEW_TURTLE for identity in queries["identity"]]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="reid-verify-bench-") as folder:
        data_dir = Path(folder)
        servers = [(args.checkpoint, True, ["on"]), (args.checkpoint, False, ["off"])]
        if args.fallback_checkpoint:
            servers.append((args.fallback_checkpoint, True, ["on + fallback, first pass", "on + fallback, again"]))
        for checkpoint, verify, labels in servers:
            server, base = start_server(checkpoint, data_dir, verify, args.server_log)
            try:
                if not runs:
                    seconds = enrol(base, gallery)
                    log.info("enrolled %d photos of %d individuals in %.0f s (%.2f s a photo, features included)",
                             len(gallery), gallery["identity"].nunique(), seconds, seconds / len(gallery))
                for label in labels:
                    runs.append(identify_all(base, queries, args.k, verify, label))
                    log.info("%s: %d queries answered", label, len(queries))
            finally:
                stop(server)

    print(f"\n{len(gallery)} photos of {gallery['identity'].nunique()} individuals enrolled ({args.gallery_split}), "
          f"{len(queries)} queries ({args.query_split}), sequential POST /identify, k={args.k}\n")
    print("| verification | identify p50 (ms) | p95 (ms) | rank-1 | rank-1, new_turtle skipped | MAP@5 "
          "| new_turtle first | predictions with inliers |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        rank1 = statistics.mean(answer[:1] == [truth] for answer, truth in zip(run.answers, truths))
        ranking = statistics.mean([label for label in answer if label != NEW_TURTLE][:1] == [truth]
                                  for answer, truth in zip(run.answers, truths) if truth != NEW_TURTLE)
        new_first = statistics.mean(answer[:1] == [NEW_TURTLE] for answer in run.answers)
        print(f"| {run.label} | {run.quantile_ms(0.5):.0f} | {run.quantile_ms(0.95):.0f} | "
              f"{rank1:.3f} | {ranking:.3f} | {map_at_k(run.answers, truths, 5):.3f} | {new_first:.3f} | "
              f"{run.inliers_reported} |")
    on, off, *fallback = runs
    print(f"\np50 with verification / without: {on.quantile_ms(0.5) / off.quantile_ms(0.5):.1f}x")
    if fallback:
        print(f"p50 with the fallback (second pass) / verification without it: "
              f"{fallback[-1].quantile_ms(0.5) / on.quantile_ms(0.5):.1f}x; p95 "
              f"{fallback[-1].quantile_ms(0.95) / on.quantile_ms(0.95):.1f}x")


if __name__ == "__main__":
    main()
