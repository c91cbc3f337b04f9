"""Zindi submissions: which photos to answer, writing ``image_id,prediction1..prediction5``, and scoring one.

The format is the Turtle Recall competition's: one row per query in the order of ``test.csv``, five distinct
labels per row, ``new_turtle`` a label like any other; the score is MAP@5 (:mod:`reid.metrics`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from reid.identify import Answer

from reid.data.records import photo_files, read_csv_table, read_dataset
from reid.errors import DatasetError, SubmissionError
from reid.fileio import write_atomically
from reid.metrics import map_at_k, top_k_accuracy

if TYPE_CHECKING:
    from reid.verification import Fusion

PREDICTION_COLUMNS = [f"prediction{i}" for i in range(1, 6)]
#: Columns accepted as the true label in a truth file (Zindi's train.csv says turtle_id; labels.csv identity).
TRUTH_LABEL_COLUMNS = ("turtle_id", "identity", "label")


def read_queries(source: str | Path) -> pd.DataFrame:
    """The query photos to answer, in order, as a table with ``image_id`` and ``path``.

    ``source`` is a Zindi ``test.csv`` (images in ``images/`` beside it, any extension case), a folder of images
    (sorted by name; the id is the file stem), or a dataset folder / ``labels.csv`` (every photo, in file order).
    """
    source = Path(source).expanduser().resolve()
    if source.is_file() and source.name != "labels.csv":
        frame = read_csv_table(source, ["image_id"])
        folder = source.parent / "images"
        images = {p.stem: p for p in photo_files(folder)} if folder.is_dir() else {}
        missing = [(i, image_id) for i, image_id in enumerate(frame["image_id"]) if image_id not in images]
        if missing:
            row, image_id = missing[0]
            raise DatasetError(f"{source} row {row + 2}: image {image_id!r} not found in {folder} "
                               f"({len(missing)} of {len(frame)} rows have no image)")
        return _one_row_per_id(pd.DataFrame({"image_id": frame["image_id"],
                                             "path": [str(images[i]) for i in frame["image_id"]]}), source)
    if source.is_file():
        source = source.parent
    if source.is_dir() and not (source / "labels.csv").exists() and not (source / "train.csv").exists():
        files = photo_files(source)
        if files:
            return _one_row_per_id(pd.DataFrame({"image_id": [p.stem for p in files], "path": [str(p) for p in files]}),
                                   source)
    records = read_dataset(source)
    return _one_row_per_id(records[["image_id", "path"]].reset_index(drop=True), source)


def _one_row_per_id(queries: pd.DataFrame, source: Path) -> pd.DataFrame:
    """``queries``, refused when two rows share an image id: a submission answers each id once, and ids are file
    stems, which repeat across folders and cameras (``a/IMG_0001.JPG``, ``b/IMG_0001.JPG``, ``001.png`` beside
    ``001.jpg``)."""
    repeated = queries["image_id"].duplicated(keep=False)
    if repeated.any():
        first = queries.loc[repeated, "image_id"].iloc[0]
        paths = queries.loc[queries["image_id"] == first, "path"].tolist()
        raise DatasetError(f"{source}: {int(repeated.sum())} query photos share image ids, e.g. {first!r} for "
                           f"{', '.join(paths)}; a submission answers each id once: rename the photos so that "
                           "their names (without extension) differ")
    return queries


#: What a gallery too small for a Zindi submission lacks, and the two ways to get there.
_FIVE_LABELS = ("a Zindi submission needs five distinct labels a query: enroll at least five individuals in the "
                "gallery, or four with a new_turtle threshold (reid calibrate, or --threshold)")


def check_gallery_fills_a_submission(gallery: str | Path, individuals: int, new_turtle: bool) -> None:
    """Refuse, before any photo is embedded, a gallery whose individuals (and new_turtle, when a threshold is in
    force) cannot make up five distinct labels a query.

    Raises:
        SubmissionError: naming the gallery and what it has.
    """
    if individuals + new_turtle < 5:
        raise SubmissionError(f"{gallery}: {individuals} individual{'s' * (individuals != 1)}"
                              f"{' and new_turtle' if new_turtle else ', and no new_turtle threshold'}; {_FIVE_LABELS}")


def write_submission(path: str | Path, image_ids: Sequence[str], predictions: Sequence[Sequence[str]]) -> Path:
    """Write a submission: one row per query, in the given order, with five distinct labels.

    Raises :class:`SubmissionError` naming the row when a prediction has fewer than five distinct labels (the
    gallery then has too few individuals for a valid Zindi file).
    """
    path = Path(path).expanduser()
    for image_id, labels in zip(image_ids, predictions):
        distinct = list(dict.fromkeys(labels))[:5]
        if len(distinct) < 5:
            raise SubmissionError(f"query {image_id}: only {len(distinct)} distinct labels {distinct}; {_FIVE_LABELS}")
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["image_id", *PREDICTION_COLUMNS])
    for image_id, labels in zip(image_ids, predictions):
        writer.writerow([image_id, *list(dict.fromkeys(labels))[:5]])
    # all or nothing: a Ctrl-C or a full disk must not leave a truncated file for `reid score` or Zindi to read
    write_atomically(path, text.getvalue().encode())
    return path


def write_report(path: str | Path, queries: pd.DataFrame, answers: Sequence[Answer], gallery: pd.DataFrame,
                 fusion: Fusion | None) -> Path:
    """Write each query's ranked answer with its evidence as JSON, for a person to confirm matches by eye.

    For every predicted individual: its score and the gallery photo that matched best (``image_id``, ``view``,
    ``path``, cosine ``similarity``, and where local verification ran by ``fusion`` (None: it did not), ``inliers``
    and whether the score counted them, ``inliers_counted``; both None for a photo that was not verified). ``answers[i]`` answers ``queries`` row ``i``; an evidence
    ``image_id`` is a row number of ``gallery``.
    """
    from reid.verification import inliers_counted

    rows = []
    for query, answer in zip(queries.itertuples(index=False), answers):
        predictions = []
        for prediction in answer.predictions:
            entry = {"individual": prediction.individual, "score": prediction.score, "evidence": None}
            if prediction.image_id is not None:
                photo = gallery.iloc[prediction.image_id]
                entry["evidence"] = {"image_id": str(photo["image_id"]), "view": str(photo["view"]),
                                     "path": str(photo["path"]), "similarity": prediction.similarity,
                                     "inliers": prediction.inliers,
                                     "inliers_counted": inliers_counted(prediction.inliers, fusion)}
            predictions.append(entry)
        rows.append({"image_id": str(query.image_id), "path": str(query.path), "new_turtle": answer.new_turtle,
                     "predictions": predictions})
    threshold = asdict(answers[0].threshold) if answers else None
    path = Path(path).expanduser()
    write_atomically(path, (json.dumps({"threshold": threshold, "queries": rows}, indent=1) + "\n").encode())
    return path


def score_submission(submission: str | Path, truth: str | Path) -> dict[str, float]:
    """Score a submission file against a truth file exactly as Zindi does.

    The truth file has ``image_id`` and a label column (``turtle_id`` as in Zindi's train.csv, or ``identity``);
    queries of individuals outside the known set carry the label ``new_turtle`` there. Every truth row must be
    answered, and every answered id must be in the truth.
    """
    submission, truth = Path(submission).expanduser(), Path(truth).expanduser()
    answers = read_csv_table(submission)
    expected = ["image_id", *PREDICTION_COLUMNS]
    if list(answers.columns) != expected:
        raise SubmissionError(f"{submission}: columns must be {expected}, found {list(answers.columns)}")
    truths = read_csv_table(truth)
    label = next((c for c in TRUTH_LABEL_COLUMNS if c in truths.columns), None)
    if "image_id" not in truths.columns or label is None:
        raise SubmissionError(f"{truth}: needs image_id and one of {list(TRUTH_LABEL_COLUMNS)}; "
                              f"found {list(truths.columns)}")
    duplicated = answers["image_id"][answers["image_id"].duplicated()]
    if len(duplicated):
        raise SubmissionError(f"{submission}: image_id {duplicated.iloc[0]!r} is answered more than once")
    truth_of = dict(zip(truths["image_id"], truths[label]))
    unknown = [i for i in answers["image_id"] if i not in truth_of]
    if unknown:
        raise SubmissionError(f"{submission}: {len(unknown)} image ids not in {truth}, e.g. {unknown[:3]}")
    answered = set(answers["image_id"])
    missing = [i for i in truths["image_id"] if i not in answered]
    if missing:
        raise SubmissionError(f"{submission}: {len(missing)} rows of {truth} are not answered, e.g. {missing[:3]}")
    predictions = answers[PREDICTION_COLUMNS].to_numpy().tolist()
    actual = [truth_of[i] for i in answers["image_id"]]
    return {"map5": map_at_k(predictions, actual), "top1": top_k_accuracy(predictions, actual, 1),
            "top5": top_k_accuracy(predictions, actual, 5), "rows": len(actual)}
