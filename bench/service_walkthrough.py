"""The README's service walk-through, measured: enroll known individuals over HTTP, identify other photos.

Starts ``reid serve`` on 127.0.0.1 with a fresh data dir, enrolls the first ``--enroll`` individuals of a
dataset with their first ``--gallery-photos`` photos (POST /individuals), identifies their remaining photos and
every photo of the individuals in ``--unseen`` (POST /identify), and prints rank-1 accuracy on known
individuals, the share of unseen photos answered "new_turtle", and identify latency. Run by hand:

    .venv/bin/python bench/service_walkthrough.py --checkpoint demo/runs/.../best.ckpt \\
        --data demo/data --unseen demo/unseen
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from reid.data.records import read_dataset


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(base: str, server: subprocess.Popen, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with code {server.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server did not answer /health within {limit_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="dataset of the individuals to enroll")
    parser.add_argument("--unseen", required=True, type=Path, help="dataset of individuals never enrolled")
    parser.add_argument("--enroll", type=int, default=20, help="individuals to enroll")
    parser.add_argument("--gallery-photos", type=int, default=4, help="photos enrolled per individual")
    args = parser.parse_args()

    known = read_dataset(args.data)
    unseen = read_dataset(args.unseen)
    individuals = sorted(known["identity"].unique())[: args.enroll]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="reid-walkthrough-") as data_dir:
        server = subprocess.Popen([sys.executable, "-m", "reid.cli", "serve", "--checkpoint", str(args.checkpoint),
                                   "--data-dir", data_dir, "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_up(base, server)
            queries: list[tuple[Path, str]] = []
            with httpx.Client(base_url=base, timeout=60.0) as client:
                for identity in individuals:
                    photos = known.loc[known["identity"] == identity, "path"].tolist()
                    enrolled, rest = photos[: args.gallery_photos], photos[args.gallery_photos:]
                    files = [("files", (Path(p).name, Path(p).read_bytes())) for p in enrolled]
                    response = client.post("/individuals", data={"individual_id": identity}, files=files)
                    response.raise_for_status()
                    queries += [(Path(p), identity) for p in rest]
                queries += [(Path(p), "new_turtle") for p in unseen["path"]]
                latencies, known_hits, known_total, unseen_new, unseen_total = [], 0, 0, 0, 0
                threshold = None
                for path, truth in queries:
                    start = time.perf_counter()
                    response = client.post("/identify", files={"file": (path.name, path.read_bytes())})
                    latencies.append(time.perf_counter() - start)
                    response.raise_for_status()
                    answer = response.json()
                    threshold = answer["threshold"]
                    first = answer["predictions"][0]["individual_id"] if answer["predictions"] else None
                    if truth == "new_turtle":
                        unseen_total += 1
                        unseen_new += int(answer["new_turtle"])
                    else:
                        known_total += 1
                        known_hits += int(first == truth)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"enrolled {len(individuals)} individuals x {args.gallery_photos} photos; threshold {threshold}")
    print(f"known individuals, other photos: rank-1 {known_hits}/{known_total} = {known_hits / known_total:.3f}")
    print(f"unseen individuals: new_turtle {unseen_new}/{unseen_total} = {unseen_new / unseen_total:.3f}")
    print(f"identify latency: median {statistics.median(latencies) * 1000:.0f} ms, "
          f"p95 {sorted(latencies)[int(0.95 * (len(latencies) - 1))] * 1000:.0f} ms over {len(latencies)} requests")


if __name__ == "__main__":
    main()
