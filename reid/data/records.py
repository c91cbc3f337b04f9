"""Readers that turn any supported dataset layout into one table of image records.

Three layouts are accepted, detected in this order:

1. a folder with ``labels.csv`` (``path``, ``identity``, optional ``view``, optional ``split``);
2. a Zindi Turtle Recall folder as downloaded: ``train.csv`` (``image_id,image_location,turtle_id``), optional
   ``extra_images.csv`` (``image_id,turtle_id``), images in ``images/<image_id>.JPG`` (any extension case);
3. one sub-folder per individual, holding that individual's photos.

Every reader returns the same :class:`pandas.DataFrame` with the columns of :data:`RECORD_COLUMNS`; everything
downstream (splits, sampler, training, evaluation, enrolment) reads only that table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from reid.errors import DatasetError, ImageDecodeError
from reid.imageio import check_image_header, configured_max_pixels, limit_hint

log = logging.getLogger(__name__)

#: ``path`` is absolute; ``view`` and ``split`` are lower-case, ``""`` where unknown.
RECORD_COLUMNS = ["image_id", "path", "identity", "view", "split"]
#: file extensions read as photos: every format :data:`reid.imageio.SUPPORTED_FORMATS` decodes
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm",
                              ".ppm", ".gif"})
VALID_SPLITS = frozenset({"", "train", "val", "test"})


def read_csv_table(path: Path, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read any CSV a user hands the project (labels, Zindi tables, submissions) as stripped strings.

    Every way a file can be wrong ends in a :class:`DatasetError` naming it: missing, not a file, unreadable, not
    UTF-8 text, not CSV (pandas' message names the line), or without the ``required`` columns.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: {'is a folder, not a CSV file' if path.is_dir() else 'no such file'}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise DatasetError(f"{path}: cannot be parsed as CSV ({error})") from error
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame.apply(lambda column: column.str.strip())


def normalise_view(view: str) -> str:
    """Views are compared lower-case: the real Zindi train.csv mixes "Top" and "top"."""
    return view.strip().lower()


def photo_files(folders: Path | list[Path]) -> list[Path]:
    """The photos in ``folders`` (extensions matched case-insensitively), sorted within each folder.

    Other files are skipped with one warning that counts them by extension: a folder of iPhone ``.heic`` photos
    would otherwise drop a whole individual without a word. Hidden files (``.DS_Store``) are skipped silently.
    """
    photos: list[Path] = []
    skipped: dict[str, list[Path]] = {}
    for folder in [folders] if isinstance(folders, Path) else folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                photos.append(path)
            elif path.is_file() and not path.name.startswith("."):
                skipped.setdefault(path.suffix.lower() or "(no extension)", []).append(path)
    if skipped:
        counts = ", ".join(f"{len(paths)} {suffix}" for suffix, paths in sorted(skipped.items()))
        example = next(iter(skipped.values()))[0]
        log.warning("skipped %d files that are not photos turtle-reid reads (%s; e.g. %s): it reads %s",
                    sum(map(len, skipped.values())), counts, example, " ".join(sorted(IMAGE_EXTENSIONS)))
    return photos


def _index_images(folder: Path) -> dict[str, Path]:
    """Map image stem → file for every image in ``folder``, matching extensions case-insensitively."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in photo_files(folder)}


def _read_labels_csv(root: Path) -> pd.DataFrame:
    labels = root / "labels.csv"
    frame = read_csv_table(labels, ["path", "identity"])
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in frame["path"]]
    return pd.DataFrame(
        {
            "image_id": [Path(p).stem for p in frame["path"]],
            "path": [str(p) for p in paths],
            "identity": frame["identity"],
            "view": frame["view"].map(normalise_view) if "view" in frame else "",
            "split": frame["split"].str.lower() if "split" in frame else "",
            "_source": [f"{labels} row {i + 2}" for i in range(len(frame))],
        }
    )


def _read_zindi(root: Path) -> pd.DataFrame:
    images = _index_images(root / "images")
    parts = []
    for name, required in (("train.csv", ["image_id", "image_location", "turtle_id"]),
                           ("extra_images.csv", ["image_id", "turtle_id"])):
        csv_path = root / name
        if not csv_path.exists():
            continue
        frame = read_csv_table(csv_path, required)
        missing_rows = [i for i, image_id in enumerate(frame["image_id"]) if image_id not in images]
        if missing_rows:
            first = missing_rows[0]
            raise DatasetError(
                f"{csv_path} row {first + 2}: image {frame['image_id'].iloc[first]!r} not found in "
                f"{root / 'images'} ({len(missing_rows)} of {len(frame)} rows have no image)"
            )
        parts.append(
            pd.DataFrame(
                {
                    "image_id": frame["image_id"],
                    "path": [str(images[i]) for i in frame["image_id"]],
                    "identity": frame["turtle_id"],
                    "view": frame["image_location"].map(normalise_view) if "image_location" in frame else "",
                    "split": "",
                    "_source": [f"{csv_path} row {i + 2}" for i in range(len(frame))],
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _system_folder(path: Path) -> bool:
    """Folders that file systems and archivers add (``.thumbnails``, Synology's ``@eaDir``, macOS zips'
    ``__MACOSX``): never anyone's photos."""
    return path.name.startswith((".", "@", "__"))


def _nested_photos(folders: list[Path]) -> list[Path]:
    """Photos in sub-folders of the individuals' folders, which the layout does not read."""
    return sorted(path for folder in folders for sub in folder.iterdir() if sub.is_dir() and not _system_folder(sub)
                  for path in sub.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


def _read_folders(root: Path) -> pd.DataFrame:
    """One folder per individual, its photos directly in it. Photos one level deeper (``t001/2023-07-14/a.jpg``)
    and photos lying in ``root`` itself are not read, and a warning counts them: reading deeper would also take a
    dataset pointed at one folder too high (``images/t001/a.jpg``, ``train/t001/a.jpg``) for individuals named
    ``images`` or ``train``."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not _system_folder(p))
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        log.warning("skipped %d photos directly in %s (e.g. %s): they belong to no individual; put each in the "
                    "folder named after its individual", len(loose), root, sorted(loose)[0].name)
    nested = _nested_photos(folders)
    if nested:
        log.warning("skipped %d photos in sub-folders of the individuals' folders (e.g. %s): only the photos "
                    "directly in an individual's folder are read; move them up into it, or list every photo in a "
                    "labels.csv (path,identity)", len(nested), nested[0].relative_to(root))
    rows = [
        {
            "image_id": f"{image.parent.name}/{image.stem}",
            "path": str(image),
            "identity": image.parent.name,
            "view": "",
            "split": "",
            "_source": str(image),
        }
        for image in photo_files(folders)
    ]
    return pd.DataFrame(rows, columns=[*RECORD_COLUMNS, "_source"])


def detect_format(root: Path) -> str:
    """Name the layout of ``root``: ``labels_csv``, ``zindi`` or ``folders``; raise if none fits."""
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is a file; expected a folder (labels.csv, Zindi or per-individual)")
    if (root / "labels.csv").is_file():
        return "labels_csv"
    if (root / "train.csv").is_file():
        return "zindi"
    subfolders = [p for p in root.iterdir() if p.is_dir() and not _system_folder(p)]
    if any(f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() for d in subfolders for f in d.iterdir()):
        return "folders"
    nested = _nested_photos(subfolders)
    if nested:
        example = nested[0].relative_to(root)
        raise DatasetError(
            f"no photos directly in the sub-folders of {root}, but {len(nested)} one level deeper (e.g. {example}): "
            f"if {example.parts[0]}/ holds one folder per individual, give {root / example.parts[0]} as the "
            "dataset; if each individual keeps its photos in sub-folders, move them up into its folder, or list "
            "them in a labels.csv (path,identity)")
    raise DatasetError(
        f"unknown dataset format in {root}: expected labels.csv (path,identity[,view][,split]), "
        "a Zindi folder with train.csv and images/, or one sub-folder of images per individual"
    )


def _validate(frame: pd.DataFrame, root: Path, check_images: bool) -> None:
    """Reject the mistakes that would otherwise surface as a crash mid-training, naming file and row."""
    if frame.empty:
        raise DatasetError(f"dataset {root} has no images")
    for column in ("identity", "path"):
        empty = frame.index[frame[column] == ""]
        if len(empty):
            raise DatasetError(f"{frame.at[empty[0], '_source']}: empty {column}")
    duplicated = frame.index[frame["path"].duplicated()]
    if len(duplicated):
        row = duplicated[0]
        raise DatasetError(f"{frame.at[row, '_source']}: duplicate path {frame.at[row, 'path']}")
    bad_split = frame.index[~frame["split"].isin(VALID_SPLITS)]
    if len(bad_split):
        row = bad_split[0]
        raise DatasetError(
            f"{frame.at[row, '_source']}: split {frame.at[row, 'split']!r} is not one of train, val, test"
        )
    max_pixels = configured_max_pixels() if check_images else None
    for row, path in frame["path"].items():
        if not Path(path).is_file():
            raise DatasetError(f"{frame.at[row, '_source']}: image file {path} does not exist")
        if check_images:
            try:
                check_image_header(path, max_pixels)
            except ImageDecodeError as error:
                source = frame.at[row, "_source"]  # a folder dataset's row is its path, which the error names
                raise DatasetError((str(error) if source == str(path) else f"{source}: {error}")
                                   + limit_hint(error)) from error


def read_dataset(root: str | Path, check_images: bool = True) -> pd.DataFrame:
    """Read any supported dataset layout into a table of records (columns :data:`RECORD_COLUMNS`).

    Args:
        root: the dataset folder.
        check_images: open every image's header so that a corrupt file is reported with its row now.

    Raises:
        DatasetError: the folder has no known layout, or a row is wrong (the message names file and row).
    """
    root = Path(root).expanduser().resolve()
    layout = detect_format(root)
    reader = {"labels_csv": _read_labels_csv, "zindi": _read_zindi, "folders": _read_folders}[layout]
    frame = reader(root)
    _validate(frame, root, check_images)
    log.info("read %d images of %d individuals from %s (%s)", len(frame), frame["identity"].nunique(), root, layout)
    return frame[RECORD_COLUMNS].reset_index(drop=True)
