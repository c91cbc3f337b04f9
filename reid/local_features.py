"""Local features and geometric verification: does a query photo show the *same pattern* as an enrolled photo?

Embedding similarity ranks candidates well but confuses individuals whose scale patterns look alike at 224 px.
Classic animal re-identification (HotSpotter, Crall et al. 2013, the engine behind Wildbook; WildFusion, Cermak
et al. 2024) re-scores the top candidates by matching local descriptors and counting the matches that agree on
one geometric transform. This module does exactly that, in three steps that each work alone:

* :func:`extract_features` runs once per photo, when it is enrolled: the grey photo's local contrast equalised
  (CLAHE, Zuiderveld 1994), then SIFT keypoints (Lowe 2004) with RootSIFT descriptors (Arandjelovic & Zisserman
  2012, "Three things everyone should know to improve object retrieval": L1-normalise, square-root, so Euclidean
  distance compares histograms by the Hellinger kernel). The result, :class:`LocalFeatures`, serialises to a
  compact blob (:meth:`LocalFeatures.to_bytes`) for storage, so a query never recomputes a gallery photo's features.
* :func:`match_features` runs once per (query, candidate photo): nearest-neighbour matching with Lowe's ratio
  test, then a homography fitted with MAGSAC++ (Barath et al. 2020); the inlier count is the score.
* :func:`draw_matches` shows the evidence to a person: both photos side by side, inliers joined by lines.

Keypoints are always in the *original* photo's pixel coordinates, whatever size extraction ran at, so matches
can be drawn on (and checked against) the photo the user sees.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import zipfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import threadpoolctl

from reid.errors import FeatureError

log = logging.getLogger(__name__)

__all__ = ["Extraction", "LocalFeatures", "Match", "draw_matches", "extract_features", "match_features"]

#: Blob layout version written by :meth:`LocalFeatures.to_bytes`; bump it when the stored arrays change meaning.
FORMAT_VERSION = 1
#: First bytes of every blob, so that something else stored in the same column is refused by name.
_MAGIC = b"REIDLF\x00"

#: RootSIFT components lie in [0, 1]; OpenCV's SIFT clamps each bin at 0.2 of the L2 norm (Lowe 2004), so after
#: L1 normalisation and the square root no component exceeds ~0.47. Scaling by 512 and rounding to uint8 keeps
#: them all (clipping is a no-op in practice) at a step of 0.002, far below the ~0.3-0.6 distances the ratio test
#: compares. A quarter of the float32 size; matching ranks are unchanged (the ratio test is scale-free).
DESCRIPTOR_SCALE = 512.0

#: Long side local features are extracted at: 1024 px matched 0.04 MAP@5 better than 512 px on turtles_dev.
DEFAULT_MAX_SIDE = 1024
#: CLAHE's contrast limit and tile grid: OpenCV's documented example values. A tile of a 1024 px photo is ~128 px,
#: a few scales of a turtle's face, so each scale's edges are stretched against its neighbours, not the whole photo.
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = (8, 8)
#: SIFT keypoints kept a photo (the strongest responses). Matching cost grows with the square of it.
DEFAULT_MAX_KEYPOINTS = 1500

#: Homographies are fitted with each photo's points rescaled so that its long side is this many units, so that
#: the reprojection threshold means the same fraction of the photo whatever its resolution.
_NORMALISED_SIDE = 1000.0


@dataclass(frozen=True)
class LocalFeatures:
    """One photo's keypoints and RootSIFT descriptors.

    Attributes:
        keypoints: ``N x 2`` float32 (x, y) positions in the original photo's pixels (pixel centres at integers).
        descriptors: ``N x 128`` uint8 RootSIFT descriptors quantised by :data:`DESCRIPTOR_SCALE`.
        image_size: ``(width, height)`` of the original photo.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        keypoints, descriptors = self.keypoints, self.descriptors
        if keypoints.ndim != 2 or keypoints.shape[1] != 2 or keypoints.dtype != np.float32:
            raise FeatureError(f"keypoints must be an N x 2 float32 array, got {keypoints.shape} {keypoints.dtype}")
        if descriptors.ndim != 2 or descriptors.shape[1] != 128 or descriptors.dtype != np.uint8:
            raise FeatureError(
                f"descriptors must be an N x 128 uint8 array, got {descriptors.shape} {descriptors.dtype}"
            )
        if len(keypoints) != len(descriptors):
            raise FeatureError(f"{len(keypoints)} keypoints but {len(descriptors)} descriptors")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise FeatureError(f"image_size must be (width, height) >= 1, got {self.image_size!r}")

    def __len__(self) -> int:
        return len(self.keypoints)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LocalFeatures):
            return NotImplemented
        return (tuple(self.image_size) == tuple(other.image_size) and np.array_equal(self.keypoints, other.keypoints)
                and np.array_equal(self.descriptors, other.descriptors))

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> LocalFeatures:
        """No keypoints: what a photo without texture gives, and it matches nothing."""
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), image_size)

    def rootsift(self) -> np.ndarray:
        """Descriptors as float32 (in quantised units: multiply by ``1 / DESCRIPTOR_SCALE`` for unit L2 norm)."""
        return self.descriptors.astype(np.float32)

    def to_bytes(self) -> bytes:
        """A compact, versioned blob (magic bytes + an uncompressed ``.npz``), readable by :meth:`from_bytes`.

        About 136 bytes a keypoint: 1500 keypoints take ~200 kB.
        """
        buffer = io.BytesIO()
        buffer.write(_MAGIC)
        np.savez(
            buffer,
            format=np.array(FORMAT_VERSION, dtype=np.int32),
            keypoints=self.keypoints,
            descriptors=self.descriptors,
            image_size=np.array(self.image_size, dtype=np.int64),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> LocalFeatures:
        """Read a blob written by :meth:`to_bytes`.

        Raises:
            FeatureError: the blob is not local features, is truncated or corrupt, or has another format version.
        """
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise FeatureError(f"local features must be read from bytes, got {type(blob).__name__}")
        blob = bytes(blob)
        if not blob.startswith(_MAGIC):
            raise FeatureError(f"not a local-features blob ({len(blob)} bytes starting {blob[:8]!r})")
        try:
            with np.load(io.BytesIO(blob[len(_MAGIC):]), allow_pickle=False) as arrays:
                version = int(arrays["format"])
                if version != FORMAT_VERSION:
                    raise FeatureError(
                        f"local-features blob has format version {version}; this version reads {FORMAT_VERSION} "
                        "(re-extract the features)"
                    )
                keypoints, descriptors = arrays["keypoints"], arrays["descriptors"]
                width, height = (int(v) for v in arrays["image_size"])
        except FeatureError:
            raise
        except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as error:
            raise FeatureError(f"local-features blob of {len(blob)} bytes is truncated or corrupt ({error})") from error
        try:
            return cls(keypoints, descriptors, (width, height))
        except FeatureError as error:
            raise FeatureError(f"local-features blob of {len(blob)} bytes holds malformed arrays: {error}") from error


@dataclass(frozen=True)
class Match:
    """The result of verifying a query photo against one enrolled photo.

    Attributes:
        inliers: correspondences consistent with the fitted homography (0 when none could be fitted).
        query_points: ``K x 2`` float32 inlier positions in the query photo (original pixels).
        photo_points: ``K x 2`` float32 positions of the same inliers in the enrolled photo.
        tentative: correspondences that passed the ratio test, before the geometric check.
    """

    inliers: int
    query_points: np.ndarray
    photo_points: np.ndarray
    tentative: int = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Match):
            return NotImplemented
        return (self.inliers == other.inliers and self.tentative == other.tentative
                and np.array_equal(self.query_points, other.query_points)
                and np.array_equal(self.photo_points, other.photo_points))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FeatureError(f"expected an H x W x 3 uint8 RGB image, got {description}")
    if min(image.shape[:2]) < 1:
        raise FeatureError(f"image has no pixels: shape {image.shape}")


def check_integer(name: str, value: int, minimum: int) -> None:
    """A local-feature setting must be a true integer (not a bool, not a float) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise FeatureError(f"{name} must be an integer >= {minimum}, got {value!r}")


def extract_features(image: np.ndarray, max_side: int = DEFAULT_MAX_SIDE, max_keypoints: int = DEFAULT_MAX_KEYPOINTS,
                     equalise: bool = True, affine_tilt: int = 0) -> LocalFeatures:
    """SIFT keypoints and RootSIFT descriptors of an RGB photo, keypoints in the photo's own pixels.

    The photo is converted to grey and area-downscaled so its long side is at most ``max_side`` (never
    upscaled): SIFT's cost grows with pixels while turtle scales stay recognisable at ~1000 px. With ``equalise``
    its local contrast is then equalised (CLAHE, tile by tile, limited so that noise is not amplified): underwater
    and shaded photos keep their scale edges under SIFT's contrast threshold otherwise. On turtles_dev it raised
    the fused MAP@5 of verification in 5 of 5 runs (mean 0.918 -> 0.929; docs/results.md). OpenCV keeps the
    ``max_keypoints`` strongest responses. A photo with no texture (e.g. uniform) gives empty arrays, not an error.
    The result is deterministic for a given image and arguments.

    ``affine_tilt`` > 0 also looks at the photo under simulated camera tilts up to that factor (ASIFT: Morel & Yu,
    2009, through OpenCV's ``AffineFeature``), for a turtle seen from a slant SIFT alone cannot match;
    ``max_keypoints`` then caps each simulated view: a tilt of 2 is ten views (the photo, four at tilt sqrt(2), five at
    tilt 2), so up to ten times as many keypoints. Verification's fallback (:class:`reid.verification.Fallback`)
    extracts this way for the queries plain SIFT cannot match.

    Raises:
        FeatureError: ``image`` is not H x W x 3 uint8, or an argument is out of range.
    """
    _check_image(image)
    check_integer("max_side", max_side, 16)
    check_integer("max_keypoints", max_keypoints, 1)
    check_integer("affine_tilt", affine_tilt, 0)
    height, width = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    factor = min(1.0, max_side / max(width, height))
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    if equalise:
        grey = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILES).apply(grey)
    small_height, small_width = grey.shape
    detector = cv2.SIFT_create(nfeatures=int(max_keypoints))
    if affine_tilt:
        detector = cv2.AffineFeature.create(detector, maxTilt=int(affine_tilt), minTilt=0)
    points, raw = detector.detectAndCompute(grey, None)
    if raw is None or len(points) == 0:
        log.debug("no SIFT keypoints in a %dx%d image (extracted at %dx%d)", width, height, small_width, small_height)
        return LocalFeatures.empty((width, height))
    # OpenCV keeps ties at the cut-off response, so it can return a few more than asked: keep the strongest.
    responses = np.array([p.response for p in points], dtype=np.float32)
    keep = np.argsort(-responses, kind="stable")[:None if affine_tilt else max_keypoints]
    xy = np.array([points[i].pt for i in keep], dtype=np.float64)
    raw = raw[keep].astype(np.float32)
    # RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then square-root; the result has unit L2 norm.
    rootsift = np.sqrt(raw / np.maximum(raw.sum(axis=1, keepdims=True), 1e-7))
    descriptors = np.clip(np.rint(rootsift * DESCRIPTOR_SCALE), 0, 255).astype(np.uint8)
    # Back to the original pixels: cv2.resize maps pixel centres, x_small + 0.5 = (x + 0.5) * small_w / w.
    xy[:, 0] = (xy[:, 0] + 0.5) * (width / small_width) - 0.5
    xy[:, 1] = (xy[:, 1] + 0.5) * (height / small_height) - 0.5
    return LocalFeatures(xy.astype(np.float32), descriptors, (width, height))


@dataclass(frozen=True)
class Extraction:
    """How photos' local features are extracted, as one value.

    Features extracted in different ways do not match as well as features extracted alike, and a fusion's inlier
    calibration holds only for the extraction it was learnt with: so a fusion stores its extraction, every cache of
    features is keyed by it, and the service stores it beside each photo's features.
    """

    max_side: int = DEFAULT_MAX_SIDE
    #: CLAHE before SIFT; False is how every fusion stored before it existed was learnt
    equalise: bool = True
    max_keypoints: int = DEFAULT_MAX_KEYPOINTS
    #: simulated camera tilts up to this factor (ASIFT; 0: none), ``max_keypoints`` then a simulated view's budget
    affine_tilt: int = 0

    def __post_init__(self) -> None:
        check_integer("max_side", self.max_side, 16)
        check_integer("max_keypoints", self.max_keypoints, 1)
        check_integer("affine_tilt", self.affine_tilt, 0)

    @property
    def method(self) -> str:
        """The name of the method without the resolution (stored beside features, in caches' keys). A keypoint
        budget other than the default and simulated tilts are part of it, so such features never mix."""
        name = "rootsift-clahe" if self.equalise else "rootsift"
        name = name if self.max_keypoints == DEFAULT_MAX_KEYPOINTS else f"{name}-{self.max_keypoints}"
        return f"{name}-asift{self.affine_tilt}" if self.affine_tilt else name

    def describe(self) -> str:
        return f"{self.method} at {self.max_side} px"

    def to_dict(self) -> dict[str, int | bool]:
        return {"max_side": self.max_side, "equalise": self.equalise, "max_keypoints": self.max_keypoints,
                "affine_tilt": self.affine_tilt}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Extraction:
        """Read :meth:`to_dict`'s values. Those stored before a setting existed were extracted without it: no
        ``equalise`` means no equalisation, no ``max_keypoints`` the default budget, no ``affine_tilt`` no tilts."""
        return cls(int(data["max_side"]), bool(data.get("equalise", False)),
                   int(data.get("max_keypoints", DEFAULT_MAX_KEYPOINTS)), int(data.get("affine_tilt", 0)))

    def extract(self, image: np.ndarray) -> LocalFeatures:
        return extract_features(image, max_side=self.max_side, max_keypoints=self.max_keypoints,
                                equalise=self.equalise, affine_tilt=self.affine_tilt)


def _empty_match(tentative: int = 0) -> Match:
    empty = np.zeros((0, 2), np.float32)
    return Match(0, empty, empty.copy(), tentative)


def _two_nearest(query: np.ndarray, photo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query row: index of its nearest photo row, and the Euclidean distances to the nearest two.

    Exact brute force like ``cv2.BFMatcher(NORM_L2).knnMatch(k=2)``, but through one BLAS matrix product
    (|q - p|^2 = |q|^2 + |p|^2 - 2 q.p): about three times faster on CPU for 1500 x 1500 descriptors. The product is
    turned into distances in place, and |q|^2 (the same along a row, so it cannot change which photo row is
    nearest) is added to the two winners only: a third less time than building the full distance matrix anew.
    """
    squared = query @ photo.T
    squared *= -2.0
    squared += (photo * photo).sum(axis=1)[None, :]
    rows = np.arange(len(query))
    nearest = squared.argmin(axis=1)
    first = squared[rows, nearest]
    squared[rows, nearest] = np.inf
    second = squared.min(axis=1)
    query_squared = (query * query).sum(axis=1)
    return (nearest, np.sqrt(np.maximum(first + query_squared, 0.0)),
            np.sqrt(np.maximum(second + query_squared, 0.0)))


def match_features(query: LocalFeatures, photo: LocalFeatures, ratio: float = 0.8,
                   reprojection_threshold: float = 8.0) -> Match:
    """Verify ``query`` against ``photo``: ratio-tested nearest neighbours, then a MAGSAC++ homography.

    Each query descriptor's two nearest photo descriptors are found (exact brute force); the match is kept when
    the nearest is clearly closer than the second (Lowe's ratio test; 0.8 is Lowe 2004's value). Each photo
    keypoint keeps only its best query match, so SIFT's duplicated keypoints (one per dominant orientation) are
    not counted twice. A homography is fitted with ``cv2.USAC_MAGSAC``; its inliers are the score. Fewer than 4
    tentative matches cannot define a homography and give zero inliers.

    ``reprojection_threshold`` is in units of a photo rescaled to a 1000-pixel long side, so it means the same
    at any resolution. OpenCV's RNG is seeded, so the result is deterministic.

    Raises:
        FeatureError: ``ratio`` is not in (0, 1] or the threshold is not positive.
    """
    if not 0.0 < ratio <= 1.0:
        raise FeatureError(f"ratio must be in (0, 1], got {ratio!r}")
    if not reprojection_threshold > 0.0:
        raise FeatureError(f"reprojection_threshold must be positive, got {reprojection_threshold!r}")
    if len(query) < 2 or len(photo) < 2:
        return _empty_match()
    nearest, first, second = _two_nearest(query.rootsift(), photo.rootsift())
    passed = np.flatnonzero(first < ratio * second)
    if len(passed) == 0:
        return _empty_match()
    # One match per photo keypoint (the closest): sort by distance, keep each photo index's first occurrence.
    passed = passed[np.argsort(first[passed], kind="stable")]
    _, unique = np.unique(nearest[passed], return_index=True)
    query_index = passed[np.sort(unique)]
    photo_index = nearest[query_index]
    tentative = len(query_index)
    if tentative < 4:
        return _empty_match(tentative)
    query_xy = query.keypoints[query_index]
    photo_xy = photo.keypoints[photo_index]
    query_norm = _NORMALISED_SIDE / max(query.image_size)
    photo_norm = _NORMALISED_SIDE / max(photo.image_size)
    cv2.setRNGSeed(0)
    homography, mask = cv2.findHomography(
        (query_xy * query_norm).reshape(-1, 1, 2), (photo_xy * photo_norm).reshape(-1, 1, 2),
        cv2.USAC_MAGSAC, reprojection_threshold, maxIters=2000, confidence=0.999,
    )
    if homography is None or mask is None:
        return _empty_match(tentative)
    inlier = mask.ravel().astype(bool)
    return Match(int(inlier.sum()), query_xy[inlier].copy(), photo_xy[inlier].copy(), tentative)


class _OneBlasThread:
    """Holds the BLAS libraries to one thread while any caller matches in parallel, and restores them after the
    last one. threadpoolctl's limit is process-wide, so concurrent callers (service requests) share one limit
    rather than each restoring the others' setting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._limiter: threadpoolctl.ThreadpoolLimiter | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._limiter = threadpoolctl.threadpool_limits(1, user_api="blas")
            self._users += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None


_ONE_BLAS_THREAD = _OneBlasThread()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _matching_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="reid-match")
        return _pool


def _forget_pool_in_child() -> None:
    """A forked child (a DataLoader worker) inherits the pool object but none of its threads: it makes its own."""
    global _pool, _pool_lock, _ONE_BLAS_THREAD
    _pool, _pool_lock, _ONE_BLAS_THREAD = None, threading.Lock(), _OneBlasThread()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def match_all(pairs: Sequence[tuple[LocalFeatures, LocalFeatures]], ratio: float = 0.8,
              reprojection_threshold: float = 8.0) -> list[Match]:
    """:func:`match_features` of each (query, photo) pair, in order, the pairs matched in parallel, one per core.

    A match is a matrix product of a few thousand descriptors and a homography fit, both of which release the GIL.
    Left to itself, numpy's BLAS splits each small product over every core, and its threads wait for one another,
    worst when another process holds a core. Whole matches side by side, BLAS held to one thread while they run,
    matched a query's 80 photos 1.1x faster on an idle 2-core CPU and 1.6-1.7x faster with one core busy
    (BENCHMARKS.md, "Matching in parallel").
    """
    if len(pairs) <= 1 or (os.cpu_count() or 1) == 1:
        return [match_features(query, photo, ratio, reprojection_threshold) for query, photo in pairs]
    with _ONE_BLAS_THREAD:
        return list(_matching_pool().map(lambda pair: match_features(pair[0], pair[1], ratio, reprojection_threshold),
                                         pairs))


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only: replace anything else rather than drawing '?' boxes mid-word."""
    return text.encode("ascii", "replace").decode("ascii")


def _fit_text(text: str, width: int, font: int, font_scale: float) -> str:
    """``text``, shortened from the left with "..." until it fits ``width`` pixels (a path's end says most)."""
    while len(text) > 3 and cv2.getTextSize(text, font, font_scale, 1)[0][0] > width:
        text = "..." + text[4:] if text.startswith("...") else "..." + text[3:]
    return text


#: the widest a photo's panel in :func:`draw_matches` may be, in panel heights (a 3:1 panorama fits)
MAX_PANEL_ASPECT = 3


def draw_matches(query_image: np.ndarray, photo_image: np.ndarray, match: Match, max_lines: int = 100,
                 labels: tuple[str, str] | None = None, height: int = 480) -> np.ndarray:
    """The evidence for a verification, for a person to judge: an RGB image of both photos and their inliers.

    The photos are scaled to ``height`` pixels (a photo wider than :data:`MAX_PANEL_ASPECT` times that, shorter)
    and placed side by side (query left), each inlier pair is joined
    by a thin line ending in small circles, coloured along a rainbow by the point's height in the query so that
    crossing lines stay tellable apart. At most ``max_lines`` pairs are drawn, spread over the whole set. A
    caption band below names each photo under it (``labels``, shortened from the left when too long) and states
    the inlier count.

    Raises:
        FeatureError: an image is not H x W x 3 uint8, or ``max_lines`` / ``height`` is out of range.
    """
    _check_image(query_image)
    _check_image(photo_image)
    if max_lines < 0:
        raise FeatureError(f"max_lines must be >= 0, got {max_lines!r}")
    if height < 32:
        raise FeatureError(f"height must be >= 32 pixels, got {height!r}")
    if labels is not None and len(labels) != 2:
        raise FeatureError(f"labels must be two strings (query, photo), got {labels!r}")
    gap = max(4, height // 60)
    panels, scales = [], []
    for image in (query_image, photo_image):
        # A panel is at most MAX_PANEL_ASPECT heights wide: a 20,000 x 1 photo, within any pixel limit, would
        # otherwise be drawn 9.6 million pixels wide (gigabytes). Such a photo is drawn shorter, top-aligned.
        scale = min(height / image.shape[0], MAX_PANEL_ASPECT * height / image.shape[1])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        panels.append(cv2.resize(image, size, interpolation=interpolation))
        scales.append(scale)
    offset = panels[0].shape[1] + gap
    row_height = max(20, height // 16)
    canvas = np.full((height + 2 * row_height, offset + panels[1].shape[1], 3), 255, dtype=np.uint8)
    canvas[: panels[0].shape[0], : panels[0].shape[1]] = panels[0]
    canvas[: panels[1].shape[0], offset:] = panels[1]

    count = len(match.query_points)
    chosen = np.arange(count)
    if count > max_lines:
        chosen = np.unique(np.linspace(0, count - 1, max_lines).round().astype(np.int64)) if max_lines else chosen[:0]
    # Draw at 4x sub-pixel precision (shift=2) so lines between close points do not snap to the pixel grid.
    thickness = max(1, height // 320)
    radius = max(3, height // 120)
    order = np.argsort(match.query_points[chosen, 1], kind="stable") if len(chosen) else chosen
    for rank, index in enumerate(chosen[order]):
        hue = int(150 * rank / max(1, len(chosen) - 1))  # OpenCV hue 0-179; stop before wrapping back to red
        colour = cv2.cvtColor(np.uint8([[[hue, 230, 255]]]), cv2.COLOR_HSV2RGB)[0, 0].tolist()
        # pixel centres map as (x + 0.5) * scale - 0.5, the convention cv2.resize uses
        qx, qy = (match.query_points[index] + 0.5) * scales[0] - 0.5
        px, py = (match.photo_points[index] + 0.5) * scales[1] - 0.5
        start = (round(float(qx) * 4), round(float(qy) * 4))
        end = (round((float(px) + offset) * 4), round(float(py) * 4))
        cv2.line(canvas, start, end, colour, thickness, cv2.LINE_AA, shift=2)
        for centre in (start, end):
            cv2.circle(canvas, centre, radius * 4, (255, 255, 255), thickness + 2, cv2.LINE_AA, shift=2)
            cv2.circle(canvas, centre, radius * 4, colour, thickness, cv2.LINE_AA, shift=2)

    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, row_height / 42
    dark = (30, 30, 30)
    names = labels if labels is not None else ("query", "enrolled photo")
    for name, left, panel in zip(names, (0, offset), panels, strict=True):
        text = _fit_text(_ascii(str(name)), panel.shape[1] - 16, font, font_scale)
        cv2.putText(canvas, text, (left + 8, height + int(row_height * 0.72)), font, font_scale, dark, 1, cv2.LINE_AA)
    shown = f" (showing {len(chosen)})" if len(chosen) < count else ""
    verdict = f"{match.inliers} matching points (inliers){shown}"  # read by biologists and engineers alike
    (verdict_width, _), _ = cv2.getTextSize(verdict, font, font_scale, 2)
    cv2.putText(canvas, verdict, ((canvas.shape[1] - verdict_width) // 2, height + int(row_height * 1.72)), font,
                font_scale, dark, 2, cv2.LINE_AA)
    return canvas
