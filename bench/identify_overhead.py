"""What ``POST /identify`` costs beyond the model: HTTP latency against the raw parts, measured in one run.

The raw parts are what identification cannot avoid, done by hand in this process: OpenCV decode, resize,
normalise, one forward pass of the same encoder (same backend), and an exact FAISS search of the same gallery.
The service does the same work plus everything around it (multipart parsing, EXIF-aware decoding, hashing, the thread pool,
ranking, evidence, JSON). Raw and HTTP requests alternate, so the machine's load drifts equally on both, and the
ratio of their medians is the figure to read.

Each photo is sent by two clients in turn: httpx (what the test suite and most Python users use) and the standard
library's ``http.client`` with the multipart body built once, whose figure is the service's cost without a client
library's (httpx spends ~2 ms a request building and parsing).

The gallery (``--gallery`` photos of ``--gallery / 5`` individuals) is written straight into a store as random
unit vectors with tiny placeholder photos: search costs what it costs at that size without embedding 10,000
photos first. The query photo is ``--photo`` re-encoded as a small JPEG (640 x 480) and as a camera-size one
(4000 x 3000). Run by hand:

    .venv/bin/python bench/identify_overhead.py --photo ../shared/data/turtles_dev/images/t001/CAluWEgwPX.jpg
"""

from __future__ import annotations

import argparse
import http.client
import io
import shlex
import statistics
import subprocess
import sys
import socket
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import faiss
import httpx
import numpy as np
import torch
from PIL import Image

# a sibling script: python puts bench/ on the path
from service_walkthrough import free_port, wait_until_up

from reid.inference import Embedder, export_encoder
from reid.onnx_backend import BACKENDS
from service.engine import model_record
from service.photos import read_photo
from service.store import Store

PHOTOS_PER_INDIVIDUAL = 5
#: Each query is sent this many times before timing (lazy initialisation, allocator warm-up).
WARM_UP = 5


def jpeg(image: Image.Image, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def fill_store(data_dir: Path, embedder: Embedder, checkpoint: Path, photos: int, seed: int) -> np.ndarray:
    """A store of ``photos`` random unit vectors (5 per individual), each with a distinct 8 x 8 placeholder PNG."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(photos, embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = Store(data_dir)
    store.bind_model(model_record(embedder, str(checkpoint.resolve())))
    for start in range(0, photos, PHOTOS_PER_INDIVIDUAL):
        placeholders = []
        for _ in range(start, min(start + PHOTOS_PER_INDIVIDUAL, photos)):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
            placeholders.append(read_photo(buffer.getvalue(), 10**6))
        store.add_images(f"ind{start // PHOTOS_PER_INDIVIDUAL:06d}", placeholders,
                         vectors[start:start + len(placeholders)], embedder.fingerprint, "new")
    return vectors


class RawParts:
    """Decode, resize, normalise, forward and search by hand: the floor under any identify."""

    def __init__(self, embedder: Embedder, gallery: np.ndarray) -> None:
        self.embedder = embedder
        size = embedder.preprocess.image_size
        self.size = (size, size)
        self.mean = np.array(embedder.preprocess.mean, np.float32) * 255
        self.std = np.array(embedder.preprocess.std, np.float32) * 255
        self.index = faiss.IndexFlatIP(gallery.shape[1])
        self.index.add(gallery)

    @torch.inference_mode()
    def __call__(self, data: bytes) -> None:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(cv2.resize(bgr, self.size, interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        tensor = torch.from_numpy(((rgb.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1))
        vector = self.embedder.forward(tensor.unsqueeze(0)).numpy()
        self.index.search(vector, 50)


class BareClient:
    """``POST /identify`` over one keep-alive ``http.client`` connection with a prebuilt multipart body."""

    def __init__(self, port: int, data: bytes) -> None:
        boundary = uuid.uuid4().hex
        self.headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        self.body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="query.jpg"\r\n'
                     "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.connection.connect()
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __call__(self) -> None:
        self.connection.request("POST", "/identify", body=self.body, headers=self.headers)
        response = self.connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"identify answered {response.status}")


def timed(call, *arguments) -> float:  # noqa: ANN001
    started = time.perf_counter()
    call(*arguments)
    return time.perf_counter() - started


def quantile_ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photo", type=Path, required=True, help="a real photo to send, re-encoded at two sizes")
    parser.add_argument("--checkpoint", type=Path,
                        help="encoder to serve (default: ImageNet MobileNetV2 at 224 px, frozen, made offline)")
    parser.add_argument("--gallery", type=int, default=10_000, help="photos in the gallery")
    parser.add_argument("--requests", type=int, default=60, help="timed requests per query photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="how both the server and the raw parts run the encoder")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or export_encoder(work / "frozen.ckpt", "mobilenetv2_100", "imagenet-offline",
                                                       image_size=224)
        embedder = Embedder.from_checkpoint(checkpoint, device="cpu", backend=args.backend)
        gallery = fill_store(work / "data", embedder, Path(checkpoint), args.gallery, args.seed)
        raw = RawParts(embedder, gallery)
        source = Image.open(args.photo).convert("RGB")
        queries = {"small JPEG 640x480": jpeg(source, (640, 480)),
                   "camera JPEG 4000x3000": jpeg(source, (4000, 3000))}

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with (work / "server.log").open("ab") as server_log:
            server = subprocess.Popen([sys.executable, "-m", "reid.cli", "serve", "--checkpoint", str(checkpoint),
                                       "--data-dir", str(work / "data"), "--port", str(port), "--no-verify",
                                       "--backend", args.backend],
                                      stdout=server_log, stderr=server_log)
        rows = []
        try:
            wait_until_up(base, server)
            with httpx.Client(base_url=base, timeout=120) as client:

                def identify(data: bytes) -> None:
                    response = client.post("/identify", files={"file": ("query.jpg", data, "image/jpeg")})
                    response.raise_for_status()

                for name, data in queries.items():
                    bare = BareClient(port, data)
                    for _ in range(WARM_UP):
                        identify(data)
                        bare()
                        raw(data)
                    raw_s, http_s, bare_s = [], [], []
                    for _ in range(args.requests):  # alternating: drift in the machine's load hits all alike
                        raw_s.append(timed(raw, data))
                        http_s.append(timed(identify, data))
                        bare_s.append(timed(bare))
                    bare.connection.close()
                    rows.append((name, len(data), raw_s, http_s, bare_s))
        finally:
            server.terminate()
            server.wait(timeout=30)

    print("## Identify overhead: HTTP against the raw parts\n")
    print(f"```bash\n{shlex.join(['.venv/bin/python', *sys.argv])}\n```\n")
    print(f"`{embedder.name}` at {embedder.preprocess.image_size} px ({args.backend}), {args.gallery:,} photos in an exact (flat) "
          f"index, {args.requests} sequential requests per photo on one keep-alive connection, alternating with "
          "the raw parts in this process.\n")
    print("| query | bytes | raw p50 (ms) | identify p50 / p99, httpx (ms) | p50 ratio | "
          "identify p50 / p99, http.client (ms) | p50 ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, size, raw_s, http_s, bare_s in rows:
        raw_p50 = statistics.median(raw_s)
        print(f"| {name} | {size:,} | {quantile_ms(raw_s, 0.5):.1f} | {quantile_ms(http_s, 0.5):.1f} / "
              f"{quantile_ms(http_s, 0.99):.1f} | **{statistics.median(http_s) / raw_p50:.2f}x** | "
              f"{quantile_ms(bare_s, 0.5):.1f} / {quantile_ms(bare_s, 0.99):.1f} | "
              f"**{statistics.median(bare_s) / raw_p50:.2f}x** |")


if __name__ == "__main__":
    main()
