"""Real-process fixtures for the service: tiny checkpoints, and ``reid serve`` running on a free local port.

Every server is a real uvicorn process with a real SQLite file and a real FAISS index; fixtures always stop it,
and every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
import torch

from reid.data.records import read_dataset
from reid.inference import export_encoder

API_KEY = "test-key-5f2c"
#: Tiny limits so that the size and pixel refusals are cheap to trigger (synthetic photos are ~10 KB, 64x64).
MAX_UPLOAD_BYTES = 300_000
MAX_PIXELS = 1_000_000
STARTUP_TIMEOUT_S = 60


def _export(path: Path, seed: int) -> Path:
    """A random-weight encoder small enough for a 2-core machine; the seed makes A and B different models."""
    torch.manual_seed(seed)
    return export_encoder(path, "test_efficientnet", pretrained=False, image_size=64)


@pytest.fixture(scope="session")
def checkpoint_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("models") / "model_a.ckpt", seed=0)


@pytest.fixture(scope="session")
def checkpoint_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("models") / "model_b.ckpt", seed=1)


@pytest.fixture(scope="session")
def verified(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random-weight encoder calibrated for verification, and its dataset: 10 synthetic individuals x 6 photos at
    160 px (big enough for SIFT). About 15-30 s on a 2-core machine, so it is made once (tests copy it to change it)."""
    from reid import cli
    from reid.data.synth import generate_synthetic_dataset
    from reid.inference import Embedder

    root = tmp_path_factory.mktemp("verified")
    torch.manual_seed(0)
    checkpoint = export_encoder(root / "verified.ckpt", "lcnet_050", pretrained=False, image_size=64)
    generate_synthetic_dataset(root / "data", individuals=10, images_per_individual=6, seed=0, image_size=160,
                               progress=False)
    assert cli.main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(root / "data"), "--verify"]) == 0
    assert Embedder.from_checkpoint(checkpoint).verification is not None
    return checkpoint, root / "data"


@pytest.fixture(scope="session")
def verified_records(verified: tuple[Path, Path]) -> pd.DataFrame:
    return read_dataset(verified[1])


@pytest.fixture(scope="session")
def records(synth_dataset: Path) -> pd.DataFrame:
    """The shared synthetic dataset (8 individuals x 4 photos) as records."""
    return read_dataset(synth_dataset)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without REID_* leftovers, with one thread per math library (2 cores)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    environment.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    environment.update(extra or {})
    return environment


def reid_command(*arguments: str | Path, environment: dict[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``reid ...`` to completion (enroll, reindex, a serve that must refuse to start)."""
    return subprocess.run([sys.executable, "-m", "reid.cli", *map(str, arguments)], capture_output=True, text=True,
                          env=server_environment(environment), timeout=timeout)


class Server:
    """A ``reid serve`` process on 127.0.0.1; ``start`` returns once /health answers."""

    def __init__(self, checkpoint: Path, data_dir: Path, log_path: Path, *arguments: str,
                 environment: dict[str, str] | None = None) -> None:
        self.checkpoint, self.data_dir, self.log_path = checkpoint, data_dir, log_path
        self.arguments = arguments
        self.environment = environment
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, via_environment: bool = False) -> "Server":
        """Start with ``--checkpoint/--data-dir/--port`` flags, or with ``REID_*`` variables instead."""
        store = {"checkpoint": str(self.checkpoint), "data_dir": str(self.data_dir), "port": str(self.port)}
        if via_environment:
            flags: list[str] = []
            environment = {**(self.environment or {}), **{f"REID_{k.upper()}": v for k, v in store.items()}}
        else:
            flags = [part for name, value in store.items() for part in (f"--{name.replace('_', '-')}", value)]
            environment = self.environment or {}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "reid.cli", "serve", *flags, *self.arguments],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env=server_environment(environment))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2, headers={"X-API-Key": API_KEY}).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer /health within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def client(self, api_key: str | None = API_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={"X-API-Key": api_key} if api_key else {})

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, exactly like a crash or the OOM killer."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)


#: ``start_server(checkpoint, data_dir, *flags, environment=None, via_environment=False) -> Server``
StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Factory: ``start_server(checkpoint, data_dir, *flags, environment=..., via_environment=...)``; every server
    started is stopped at teardown."""
    servers: list[Server] = []

    def start(checkpoint: Path, data_dir: Path, *arguments: str, environment: dict[str, str] | None = None,
              via_environment: bool = False) -> Server:
        server = Server(checkpoint, data_dir, tmp_path / f"server{len(servers)}.log", *arguments,
                        environment=environment)
        servers.append(server)
        return server.start(via_environment)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoint_a: Path) -> Iterator[Server]:
    """One server shared by the API, bad-input and auth tests (each uses its own individual ids), with an API key
    and lowered upload and pixel limits."""
    root = tmp_path_factory.mktemp("service")
    running = Server(checkpoint_a, root / "data", root / "server.log", "--api-key", API_KEY,
                     "--max-upload-bytes", str(MAX_UPLOAD_BYTES), "--max-pixels", str(MAX_PIXELS)).start()
    yield running
    running.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http
