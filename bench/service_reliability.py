"""The service under a long mixed load and many ``kill -9`` rounds, with the harness of the reliability tests.

Builds a tiny random-weight encoder (as the tests do) and a synthetic dataset, then:

* starts ``reid serve`` on 127.0.0.1 and runs ``--clients`` concurrent clients for ``--seconds`` (identify, enrol,
  add a photo, delete), counting 5xx answers, connection errors, unexpected 4xx and identifies that missed a photo
  they had to find, and checks at the end that the search index and the database agree;
* runs ``--crash-rounds`` rounds of: stream enrolments, ``kill -9`` the server at a random moment, restart it, check
  that every acknowledged enrolment survived, byte for byte and searchable, and that nothing else appeared.

Prints a markdown section for BENCHMARKS.md and exits 1 when anything failed. Run by hand:

    .venv/bin/python bench/service_reliability.py --seconds 60 --crash-rounds 20
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# the harness lives with the tests, which are not an installed package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reid.data.records import read_dataset  # noqa: E402
from reid.data.synth import generate_synthetic_dataset  # noqa: E402
from reid.inference import export_encoder  # noqa: E402
from tests.service.conftest import Server  # noqa: E402
from tests.service.reliability import KINDS, CrashReport, LoadReport, crash_rounds, index_equals_store, run_load  # noqa: E402,E501

API_KEY = "bench-key"
#: Problems listed in the report before "... and N more".
SHOWN = 10


def command_line() -> str:
    """The command as typed, with the interpreter relative to the current folder where it lies under it."""
    interpreter = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return shlex.join([interpreter, *sys.argv])


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def listed(problems: list[str]) -> str:
    lines = [f"- {problem}" for problem in problems[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"- ... and {len(problems) - SHOWN} more")
    return "\n".join(lines)


def load_section(report: LoadReport, clients: int, agreement: str) -> str:
    rows = [f"| {kind} | {report.requests[kind]} | {milliseconds(report.percentile(50, kind))} | "
            f"{milliseconds(report.percentile(99, kind))} |" for kind in KINDS]
    rows.append(f"| **all** | {report.total} | {milliseconds(report.percentile(50))} | "
                f"{milliseconds(report.percentile(99))} |")
    text = [f"### Mixed load: {clients} clients for {report.seconds:.0f} s", "",
            "| request | count | p50 (ms) | p99 (ms) |", "|---|---|---|---|", *rows, "",
            f"**{report.requests_per_second:.1f} requests/s**. 5xx: {len(report.server_errors)}, connection errors: "
            f"{len(report.connection_errors)}, unexpected 4xx: {len(report.unexpected)}, misses: "
            f"{len(report.misses)} of {report.checked_identifies} identifies of a photo that had to be found. "
            f"Index and store at the end: {agreement}."]
    if report.failures():
        text += ["", listed(report.failures())]
    return "\n".join(text)


def crash_section(report: CrashReport) -> str:
    restarts = [r.restart_s for r in report.rounds]
    kills = [r.killed_after_s for r in report.rounds]
    text = [f"### kill -9 during enrolment: {len(report.rounds)} rounds", "",
            f"**{report.passed}/{len(report.rounds)} rounds passed**: every enrolment acknowledged before a kill "
            f"(all rounds) still there byte for byte and ranked first by identify, no individual that was never sent, "
            f"index = store, no temporary file left. Enrolments acknowledged before the kills: {report.acknowledged} "
            f"of {sum(r.sent for r in report.rounds)} sent; kill after {min(kills):.1f}-{max(kills):.1f} s of "
            f"streaming; restart after the kill until /health answers: median {statistics.median(restarts):.1f} s, "
            f"max {max(restarts):.1f} s."]
    if report.problems():
        text += ["", listed(report.problems())]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="length of the mixed load")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the mixed load")
    parser.add_argument("--crash-rounds", type=int, default=20, help="kill -9 rounds (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="reid-reliability-") as folder:
        root = Path(folder)
        generate_synthetic_dataset(root / "synth", individuals=8, images_per_individual=4, seed=args.seed,
                                   image_size=64, progress=False)
        records = read_dataset(root / "synth")
        torch.manual_seed(args.seed)
        checkpoint = export_encoder(root / "model.ckpt", "test_efficientnet", pretrained=False, image_size=64)
        servers: list[Server] = []

        def start(checkpoint: Path, data_dir: Path) -> Server:
            server = Server(checkpoint, data_dir, root / f"server{len(servers)}.log", "--api-key", API_KEY)
            servers.append(server)
            return server.start()

        try:
            load_dir = root / "load"
            server = start(checkpoint, load_dir)
            load = run_load(server.url, API_KEY, records, clients=args.clients, seconds=args.seconds, seed=args.seed)
            counts = index_equals_store(server.url, API_KEY, load_dir)
            server.stop()
            agreement = (f"gallery {counts.gallery_size}, photos {counts.photos}, image rows {counts.image_rows}, "
                         f"embedding rows {counts.embedding_rows}" + ("" if counts.agree else " **(disagree)**"))
            crashes, crash_seconds = None, 0.0
            if args.crash_rounds:
                started = time.monotonic()
                crashes = crash_rounds(start, checkpoint, root / "crash", records, args.crash_rounds, seed=args.seed,
                                       api_key=API_KEY)
                crash_seconds = time.monotonic() - started
        finally:
            for server in servers:
                server.stop()

    print("## Service reliability: load and kill -9\n")
    print(f"```bash\n{command_line()}\n```\n")
    print(f"A real `reid serve` on 127.0.0.1 ({os.cpu_count()} CPU cores, one thread per math library), a tiny "
          "random-weight encoder (test_efficientnet, 64 px) and the synthetic dataset of the tests (8 x 4 photos, "
          "each sent as copies of 48 rotated, flipped or channel-swapped versions).\n")
    print(load_section(load, args.clients, agreement))
    if crashes is not None:
        print()
        print(crash_section(crashes) + f" The rounds took {crash_seconds:.0f} s.")
    if load.failures() or not counts.agree or (crashes is not None and crashes.problems()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
