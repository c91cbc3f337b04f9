"""How long a user waits: ``reid serve`` to its first answered ``/health``, and the quickstart end to end.

Start-up is measured from the moment the process is spawned to the first ``200`` from ``/health`` (polled every
20 ms), with a gallery of ``--gallery`` enrolled photos, for each backend. Beside it, in the same run and with the
same interpreter: the time to import the service alone (``python -c "import service.app"``) and to start a bare
Python, so the table says how much of the wait is imports, how much is the model and the gallery. Peak memory is
the server's ``VmHWM`` (peak resident set) read from ``/proc`` once it answers.

``--quickstart`` also times the README's quickstart (``reid synth`` then ``reid fit --config
configs/quickstart.yaml``) and reports its peak memory (the largest resident set of the two commands, workers
included through ``RUSAGE_CHILDREN``). Run by hand, on a quiet machine:

    .venv/bin/python bench/startup.py --rounds 5 [--quickstart]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# sibling scripts: python puts bench/ on the path
from identify_overhead import fill_store
from service_walkthrough import free_port

from reid.inference import Embedder, export_encoder

ROOT = Path(__file__).resolve().parent.parent
#: Polling interval while waiting for /health: small against the seconds measured.
POLL_S = 0.02


def seconds_to_run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_until_healthy(checkpoint: Path, data_dir: Path, backend: str, log_file: Path) -> tuple[float, float]:
    """Seconds from spawning ``reid serve`` to the first 200 from /health, and the server's peak RSS then."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/health"
    with log_file.open("ab") as log:
        start = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "reid.cli", "serve", "--checkpoint", str(checkpoint),
                                   "--data-dir", str(data_dir), "--port", str(port), "--no-verify",
                                   "--backend", backend], stdout=log, stderr=log, cwd=ROOT)
    try:
        deadline = start + 300
        while time.perf_counter() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"reid serve exited with code {server.returncode}: see {log_file}")
            try:
                if httpx.get(url, timeout=5.0).status_code == 200:
                    return time.perf_counter() - start, peak_rss_mib(server.pid)
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
        raise SystemExit(f"reid serve did not answer /health within 300 s: see {log_file}")
    finally:
        server.terminate()
        server.wait(timeout=60)


def quickstart(work: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of the README's quickstart, run as a user runs it."""
    data = work / "synth"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "reid.cli", "synth", "--out", str(data)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "reid.cli", "fit", "--config", "configs/quickstart.yaml",
                    "--data.root", str(data), "--trainer.default_root_dir", str(work / "runs")],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path,
                        help="encoder to serve (default: ImageNet MobileNetV2 at 224 px, frozen, made offline)")
    parser.add_argument("--gallery", type=int, default=1_000, help="photos enrolled before starting the server")
    parser.add_argument("--rounds", type=int, default=5, help="start-ups per backend (median reported)")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    parser.add_argument("--quickstart", action="store_true", help="also time the README's quickstart (~3-5 min)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or export_encoder(work / "frozen.ckpt", "mobilenetv2_100", "imagenet-offline",
                                                       image_size=224)
        fill_store(work / "data", Embedder.from_checkpoint(checkpoint, device="cpu"), Path(checkpoint), args.gallery,
                   seed=0)
        timings: dict[str, list[float]] = {"python -c pass": [], "python -c 'import service.app'": []}
        peaks: dict[str, list[float]] = {}
        for backend in args.backends:
            # the first start of the onnx backend exports the model once into its cache: not what is measured
            serve_until_healthy(Path(checkpoint), work / "data", backend, work / "server.log")
        for _ in range(args.rounds):  # interleaved, so the machine's drift falls on every row alike
            timings["python -c pass"].append(seconds_to_run([sys.executable, "-c", "pass"]))
            timings["python -c 'import service.app'"].append(
                seconds_to_run([sys.executable, "-c", "import service.app"]))
            for backend in args.backends:
                seconds, peak = serve_until_healthy(Path(checkpoint), work / "data", backend, work / "server.log")
                timings.setdefault(f"reid serve --backend {backend} -> first /health", []).append(seconds)
                peaks.setdefault(f"reid serve --backend {backend} -> first /health", []).append(peak)

        print(f"{args.gallery} enrolled photos, {args.rounds} rounds, medians (min-max)\n")
        print("| what | seconds | peak RSS MiB |")
        print("|---|---|---|")
        for name, values in timings.items():
            peak = f"{statistics.median(peaks[name]):.0f}" if name in peaks else "-"
            print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | {peak} |")
        if args.quickstart:
            seconds, peak = quickstart(work)
            print(f"| quickstart: reid synth + reid fit --config configs/quickstart.yaml | {seconds:.0f} | "
                  f"{peak:.0f} (largest process) |")


if __name__ == "__main__":
    main()
