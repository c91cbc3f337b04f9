"""Deterministic synthetic multi-view re-identification dataset ("synthetic sea turtles").

Unit tests and the quickstart demo need a dataset that is small, fast to make, identical on every run, and that
actually exercises re-identification: a model must learn *who* is in the photo, not *what the photo looks like*.
So every design choice below removes a shortcut a network could otherwise take:

* **Identity lives in geometry only.** Each individual has a fixed "face" made of ~10-15 polygonal scales (Voronoi
  cells around individual-specific seed points) with thick dark seams, an individual-specific light/dark shading
  of those scales and a few bold dark spots. The scale *colours* come from a palette shared by everybody and are
  re-drawn, with jitter, for every photo, so colour statistics say nothing about identity.
* **Views change the geometry, not the identity.** ``top`` shows the pattern frontally; ``left`` and ``right``
  show it foreshortened (a perspective squash, mirrored between the two sides), so the same scales are visible
  from every view and matching across views is possible but not trivial.
* **Nothing else is stable.** Pose (rotation ±20°, scale, translation), lighting (brightness, contrast, gamma, a
  soft gradient, a colour cast), blur, noise and the background (sand-, water- or rock-like noise in random
  colours) are drawn independently for every photo.

Randomness comes from :func:`numpy.random.default_rng` streams keyed by ``(seed, individual, ...)`` so an
individual's pattern and its first photos do not change when more individuals or more photos are requested, and
``ind_003`` is the same animal whatever ``individuals`` or ``first_individual`` range it is generated in.
Images are written as PNG (lossless, no timestamps), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from reid.errors import DatasetError

__all__ = ["VIEWS", "generate_synthetic_dataset", "identity_name"]

log = logging.getLogger(__name__)

#: Views cycle in this order over an individual's photos, so anyone with >= 3 photos has all three.
VIEWS: tuple[str, ...] = ("top", "left", "right")

# Tags that separate the random streams of one (seed, individual): the pattern stream must never coincide with a
# photo stream. (SeedSequence pads short entropy with zeros, so [s, i] and [s, i, 0] would be the *same* stream;
# explicit non-zero tags avoid that trap.)
_PATTERN_STREAM = 1
_PHOTO_STREAM = 2

# Half-width of the canonical texture domain: the head ellipse fits in [-1, 1], the neck runs on to the edge.
_TEX_EXTENT = 1.4

# Shared palette of (scale colour A, scale colour B, neck skin colour) in linear-ish RGB [0, 1]. Every
# individual is drawn with every palette entry, so colour cannot encode identity.
_PALETTE = np.array(
    [
        [[0.55, 0.40, 0.22], [0.70, 0.55, 0.30], [0.55, 0.52, 0.45]],  # brown / tan
        [[0.42, 0.42, 0.22], [0.60, 0.58, 0.33], [0.50, 0.52, 0.44]],  # olive
        [[0.62, 0.48, 0.25], [0.78, 0.66, 0.40], [0.60, 0.56, 0.48]],  # amber
        [[0.38, 0.30, 0.20], [0.55, 0.45, 0.30], [0.45, 0.44, 0.40]],  # dark brown
        [[0.48, 0.46, 0.30], [0.66, 0.62, 0.44], [0.56, 0.56, 0.50]],  # grey-olive
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class _Pattern:
    """An individual's identity, in canonical texture coordinates (S x S float32 maps).

    ``shade`` multiplies the scale colour (seams and spots are dark), ``tint`` mixes palette colours A and B per
    scale, ``head`` is the soft head mask and ``alpha`` the head + neck mask that is composited over the background.
    """

    shade: np.ndarray
    tint: np.ndarray
    head: np.ndarray
    alpha: np.ndarray


def identity_name(index: int) -> str:
    """Folder/identity name of individual ``index`` (``ind_007``); one place so callers never re-derive it."""
    return f"ind_{index:03d}"


def _canonical_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an ``size`` x ``size`` texture in the canonical [-EXTENT, EXTENT] domain."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * (2 * _TEX_EXTENT) - _TEX_EXTENT
    return np.meshgrid(axis, axis)  # x varies along columns, y along rows (y grows towards the neck)


def _head_field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Implicit head shape shared by all individuals (< 1 inside): an egg that narrows towards the snout (top)."""
    half_width = 0.80 * (1.0 - 0.18 * (1.0 - y) / 2.0)
    return (x / half_width) ** 2 + (y / 1.0) ** 2


def _sample_seeds(rng: np.random.Generator, count: int) -> np.ndarray:
    """Well-spread random points inside the head (dart throwing with a minimum distance), so cells are big and bold.

    Candidates are drawn once and accepted greedily; if the spacing is too strict to place ``count`` points, it is
    relaxed and the same candidates are scanned again, which keeps this deterministic and bounded in time.
    """
    cand = rng.uniform([-0.9, -1.05], [0.9, 1.05], size=(600, 2)).astype(np.float32)
    cand = cand[_head_field(cand[:, 0], cand[:, 1]) <= 1.05]
    count = min(count, len(cand))  # never loop forever, however unlucky the candidates
    min_dist = 0.5
    while True:
        points: list[tuple[float, float]] = []
        for px, py in cand.tolist():
            if all((px - qx) ** 2 + (py - qy) ** 2 >= min_dist**2 for qx, qy in points):
                points.append((px, py))
                if len(points) == count:
                    return np.array(points, dtype=np.float32)
        min_dist *= 0.92


def _make_pattern(seed: int, index: int, size: int) -> _Pattern:
    """Draw individual ``index``'s face pattern; depends only on ``(seed, index, size)``, never on the photo."""
    rng = np.random.default_rng([seed, index, _PATTERN_STREAM])
    x, y = _canonical_grid(size)
    px = 2 * _TEX_EXTENT / size  # canonical units per texture pixel, to keep edges ~1 px soft at any size

    seeds = _sample_seeds(rng, int(rng.integers(9, 15)))
    # Distances from every pixel to every seed: nearest gives the cell, nearest-vs-second gives the seams.
    d = np.sqrt((x[..., None] - seeds[:, 0]) ** 2 + (y[..., None] - seeds[:, 1]) ** 2)
    order = np.argsort(d, axis=-1)
    label = order[..., 0]
    d_sorted = np.take_along_axis(d, order[..., :2], axis=-1)
    gap = d_sorted[..., 1] - d_sorted[..., 0]

    # Individual-specific light/dark scale layout: bold relative contrast that survives any colour jitter.
    cell_shade = rng.choice(np.array([0.45, 0.75, 1.05, 1.4], dtype=np.float32), size=len(seeds))
    cell_tint = rng.uniform(0.0, 1.0, size=len(seeds)).astype(np.float32)
    # Scales are slightly domed: brighter towards their centre, which reads as polygonal scutes.
    dome = 1.0 - 0.25 * np.clip(d_sorted[..., 0] / 0.35, 0.0, 1.0) ** 2
    shade = cell_shade[label] * dome
    tint = np.where(_head_field(x, y) <= 1.2, cell_tint[label], 0.5)  # neck skin: no per-cell tint

    seam_width = 0.075
    seam = np.clip((seam_width - gap) / px + 0.5, 0.0, 1.0)  # 1 on the seam, anti-aliased
    shade = shade * (1.0 - 0.85 * seam)

    # A few bold dark spots at individual-specific positions and sizes.
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(-0.6, 0.6), rng.uniform(-0.75, 0.75)
        r = rng.uniform(0.12, 0.19)
        spot = np.clip((r - np.hypot(x - cx, y - cy)) / px + 0.5, 0.0, 1.0)
        shade = shade * (1.0 - 0.9 * spot)

    field = _head_field(x, y)
    head = np.clip((1.0 - np.sqrt(field)) / px * 0.8 + 0.5, 0.0, 1.0).astype(np.float32)
    # Head outline: a dark rim so the silhouette reads against any background.
    rim = np.clip((0.06 - np.abs(1.0 - np.sqrt(field))) / px + 0.5, 0.0, 1.0)
    shade = shade * (1.0 - 0.6 * rim)
    # Neck: an unpatterned skin-coloured band behind the head that runs off the texture edge (shared shape).
    neck_half_width = 0.45 + 0.15 * (y - 0.3)
    neck = np.clip((neck_half_width - np.abs(x)) / px + 0.5, 0.0, 1.0) * np.clip((y - 0.3) / px + 0.5, 0.0, 1.0)
    alpha = np.maximum(head, neck.astype(np.float32))
    return _Pattern(
        shade=shade.astype(np.float32), tint=tint.astype(np.float32), head=head, alpha=alpha.astype(np.float32)
    )


def _view_homography(view: str, rng: np.random.Generator) -> np.ndarray:
    """Canonical -> canonical homography for a view: identity for ``top``, a foreshortening squash for the sides.

    ``left`` keeps the left side of the face near the camera (full height) and pushes the right side away
    (compressed and shorter); ``right`` is its mirror image. The pattern itself is never flipped, so the same
    scales stay recognisable from every view. Small per-photo jitter keeps side views from being one exact warp.
    """
    if view == "top":
        return np.eye(3, dtype=np.float64)
    near_x, far_x = -1.0, 1.0 - 2.0 * rng.uniform(0.28, 0.4)  # squash width to ~60-72 %
    near_h, far_h = rng.uniform(1.0, 1.05), rng.uniform(0.68, 0.8)
    shift = -0.5 * (near_x + far_x)  # re-centre the squashed face
    src = np.float32([[-1, -1], [1, -1], [1, 1], [-1, 1]])
    dst = np.float32(
        [
            [near_x + shift, -near_h],
            [far_x + shift, -far_h],
            [far_x + shift, far_h],
            [near_x + shift, near_h],
        ]
    )
    if view == "right":
        dst[:, 0] = -dst[:, 0]
        dst = dst[[1, 0, 3, 2]]  # keep corner correspondence (left corners stay on the left)
    return cv2.getPerspectiveTransform(src, dst).astype(np.float64)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a coarse random grid upsampled bicubically to ``size`` x ``size``."""
    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(grid, (size + 3 * size // cells, size + 3 * size // cells), interpolation=cv2.INTER_CUBIC)
    off = size // cells  # crop the border where bicubic upsampling is biased
    return big[off : off + size, off : off + size]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random sand-, water- or rock-like background in a random colour, drawn fresh for every photo."""
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    fbm = sum(_smooth_noise(rng, size, c) * w for c, w in ((3, 0.5), (7, 0.3), (17, 0.2)))
    grain = rng.standard_normal((size, size)).astype(np.float32)
    if kind == 0:  # sand: warm light base, low-frequency dunes plus fine grain
        base = np.array([rng.uniform(0.6, 0.9), rng.uniform(0.5, 0.8), rng.uniform(0.3, 0.6)], dtype=np.float32)
        lum = 1.0 + 0.12 * fbm + 0.08 * grain
    elif kind == 1:  # water: blue/teal base with wavy caustic ripples
        base = np.array([rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.6), rng.uniform(0.4, 0.8)], dtype=np.float32)
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(6.0, 14.0)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) * freq * 2 * np.pi + 3.0 * fbm
        lum = 1.0 + 0.18 * np.sin(phase) + 0.1 * fbm + 0.03 * grain
    else:  # rock / reef: any muted colour, blotchy
        base = rng.uniform(0.2, 0.75, size=3).astype(np.float32)
        blotch = _smooth_noise(rng, size, 5)
        lum = 1.0 + 0.3 * np.tanh(2.0 * blotch) + 0.1 * fbm + 0.05 * grain
    return np.clip(lum[..., None] * base, 0.0, 1.0)


def _render_photo(pattern: _Pattern, view: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render one uint8 RGB photo of ``pattern`` from ``view``: pose, palette, background, lighting, blur, noise."""
    render = 2 * size  # supersample, then area-downsample: clean edges without a slow renderer
    tex = pattern.shade.shape[0]

    # texture pixel -> canonical -> view -> pose -> output pixel
    to_canonical = np.array(
        [[2 * _TEX_EXTENT / tex, 0, -_TEX_EXTENT], [0, 2 * _TEX_EXTENT / tex, -_TEX_EXTENT], [0, 0, 1]]
    )
    view_h = _view_homography(view, rng)
    angle = np.deg2rad(rng.uniform(-20.0, 20.0))
    scale = rng.uniform(0.68, 0.84)
    tx, ty = rng.uniform(-0.1, 0.1, size=2)
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    pose = np.array([[c, -s, tx], [s, c, ty], [0, 0, 1]])
    to_pixels = np.array([[render / 2, 0, render / 2], [0, render / 2, render / 2], [0, 0, 1]])
    homography = to_pixels @ pose @ view_h @ to_canonical

    layers = np.dstack([pattern.shade, pattern.tint, pattern.head, pattern.alpha])
    warped = cv2.warpPerspective(
        layers, homography, (render, render), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    shade, tint, head, alpha = (warped[..., k : k + 1] for k in range(4))

    # Colours: a shared palette entry, jittered per photo (never per individual).
    entry = _PALETTE[rng.integers(0, len(_PALETTE))] * rng.uniform(0.85, 1.15, size=(3, 3)).astype(np.float32)
    color_a, color_b, skin = entry
    scale_rgb = (1.0 - tint) * color_a + tint * color_b
    face = np.where(head > 0, scale_rgb * shade, 0.0)
    body = head * np.clip(face, 0, 1) + (1.0 - head) * skin * (0.9 + 0.2 * tint)
    image = alpha * body + (1.0 - alpha) * _background(rng, render)

    # Downsample first: lighting is smooth, so applying it at output resolution looks the same and is 4x cheaper.
    image = cv2.resize(image.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)

    # Lighting: brightness/contrast around mid-grey, a soft directional gradient, a colour cast, then gamma.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    g_angle = rng.uniform(0, 2 * np.pi)
    g_strength = rng.uniform(0.0, 0.5)
    gradient = 1.0 + (g_strength * np.cos(g_angle)) * xx + (g_strength * np.sin(g_angle)) * yy
    image = image * gradient[..., None].astype(np.float32) * np.float32(rng.uniform(0.7, 1.3))
    image = (image - 0.5) * np.float32(rng.uniform(0.8, 1.2)) + 0.5
    image = image * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    image = np.clip(image, 0.0, 1.0) ** np.float32(rng.uniform(0.8, 1.25))

    sigma = rng.uniform(0.0, 0.8) * size / 96
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.035), size=image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


#: ``image_format`` -> (file suffix, Pillow format, save options).
_IMAGE_FORMATS: dict[str, tuple[str, str, dict[str, int]]] = {
    "png": (".png", "PNG", {}),
    "jpeg": (".jpg", "JPEG", {"quality": 90}),
}


def _check_int(name: str, value: int, minimum: int) -> None:
    """Raise :class:`DatasetError` naming ``name`` and ``value`` unless it is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DatasetError(f"{name} must be an integer >= {minimum}, got {value!r}")


def generate_synthetic_dataset(
    out: str | Path,
    individuals: int = 30,
    images_per_individual: int = 8,
    seed: int = 0,
    image_size: int = 96,
    first_individual: int = 0,
    progress: bool = True,
    image_format: str = "png",
) -> Path:
    """Write a synthetic multi-view re-identification dataset to ``out`` and return the path of its labels.csv.

    Photos go to ``out/images/ind_XXX/ind_XXX_NN_<view>.png`` (``.jpg`` for JPEG) and ``out/labels.csv`` lists them
    with columns
    ``path,identity,view`` (paths relative to ``out``). Views cycle top/left/right per individual.

    Args:
        out: Output folder (created if missing). An existing labels.csv is replaced so it lists only this run's
            images; other files already in the folder are left alone.
        individuals: Number of individuals to generate (>= 1).
        images_per_individual: Photos per individual (>= 1; >= 3 gives every individual all three views).
        seed: Non-negative seed. The same seed gives byte-identical files.
        image_size: Side of the square RGB images in pixels (>= 32).
        first_individual: Index of the first individual, so other (e.g. unseen, open-set) individuals can be
            generated: ``first_individual=100`` gives ``ind_100``, ``ind_101``, ... Individual ``i`` is the same
            animal whichever range it is generated in.
        progress: Show a tqdm progress bar over individuals.
        image_format: ``png`` (lossless, the default) or ``jpeg`` (quality 90, as cameras write: what a loading
            benchmark should decode).

    Raises:
        DatasetError: An argument is out of range (the message names it and its value), or ``out`` is not a
            writable folder.
    """
    _check_int("individuals", individuals, 1)
    _check_int("images_per_individual", images_per_individual, 1)
    _check_int("image_size", image_size, 32)
    _check_int("seed", seed, 0)
    _check_int("first_individual", first_individual, 0)
    if image_format not in _IMAGE_FORMATS:
        raise DatasetError(f"image_format must be one of {', '.join(_IMAGE_FORMATS)}, got {image_format!r}")
    suffix, pillow_format, save_options = _IMAGE_FORMATS[image_format]
    individuals, images_per_individual, image_size = int(individuals), int(images_per_individual), int(image_size)
    seed, first_individual = int(seed), int(first_individual)

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"output path {str(out)!r} exists and is not a folder")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create output folder {str(out)!r}: {exc}") from exc

    log.debug(  # the progress bar shows the work; `reid synth` says what it wrote
        "generating %d synthetic individuals x %d photos at %d px (seed %d, first ind_%03d) in %s",
        individuals, images_per_individual, image_size, seed, first_individual, out,
    )
    # The pattern texture scales with the output so seams stay a few pixels wide after warping.
    texture_size = 2 * image_size
    rows: list[tuple[str, str, str]] = []
    indices = range(first_individual, first_individual + individuals)
    for index in tqdm(indices, desc="synthetic individuals", unit="ind", disable=not progress):
        name = identity_name(index)
        folder = out / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        pattern = _make_pattern(seed, index, texture_size)
        for photo in range(images_per_individual):
            view = VIEWS[photo % len(VIEWS)]
            rng = np.random.default_rng([seed, index, _PHOTO_STREAM, photo])
            pixels = _render_photo(pattern, view, rng, image_size)
            rel = f"images/{name}/{name}_{photo:02d}_{view}{suffix}"
            Image.fromarray(pixels).save(out / rel, format=pillow_format, **save_options)
            rows.append((rel, name, view))

    labels = out / "labels.csv"
    tmp = out / "labels.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("path", "identity", "view"))
        writer.writerows(rows)
    os.replace(tmp, labels)  # atomic: readers never see a half-written labels.csv
    log.debug("wrote %d images and %s", len(rows), labels)  # the caller says what it made: `reid synth` prints it
    return labels
