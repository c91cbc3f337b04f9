"""The ``reid`` command: one entry point for every task a user runs.

``reid fit`` is Lightning's own CLI (``--config``, dotted overrides, ``--print_config``); the other
sub-commands are small argparse front-ends over library functions. User mistakes (:class:`ReIDError`) end with
one ``reid: error: ...`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from reid.errors import ReIDError

log = logging.getLogger("reid")

#: Packages add sub-commands through this entry-point group (the web service adds ``serve``, ``enroll``,
#: ``reindex``), so the library never imports the service: each entry point is ``register(subparsers)``.
PLUGIN_GROUP = "reid.commands"
#: Sub-commands handed to LightningCLI unchanged.
LIGHTNING_COMMANDS = ("fit", "validate")


def _run_lightning(argv: list[str]) -> int:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from reid.module import ReIDDataModule, ReIDModule

    class ReIDLightningCLI(LightningCLI):
        """LightningCLI that always keeps the best checkpoint by validation MAP@5 and says where it is."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({
                "checkpoint.monitor": "val_map5",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.enable_version_counter": False,
            })

        def after_fit(self) -> None:
            callback = self.trainer.checkpoint_callback
            if callback is not None and callback.best_model_path:
                score = callback.best_model_score
                print(f"best checkpoint: {callback.best_model_path} (val_map5={float(score):.4f})" if score is not None
                      else f"best checkpoint: {callback.best_model_path}")

    ReIDLightningCLI(ReIDModule, ReIDDataModule, args=argv, save_config_kwargs={"overwrite": True},
                     seed_everything_default=0)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from reid.data.synth import generate_synthetic_dataset

    labels = generate_synthetic_dataset(args.out, individuals=args.individuals,
                                        images_per_individual=args.images_per_individual, seed=args.seed,
                                        image_size=args.image_size, first_individual=args.first_individual)
    print(f"wrote {labels}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid", description="Re-identify individual animals from photos.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in LIGHTNING_COMMANDS:
        commands.add_parser(name, help=f"{name} an encoder with Lightning (reid {name} --help for options)",
                            add_help=False)

    synth = commands.add_parser("synth", help="generate a synthetic multi-view dataset")
    synth.add_argument("--out", required=True, type=Path, help="output folder (labels.csv + images/)")
    synth.add_argument("--individuals", type=int, default=30)
    synth.add_argument("--images-per-individual", type=int, default=8)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=96)
    synth.add_argument("--first-individual", type=int, default=0,
                       help="index of the first individual (generate unseen individuals with a higher start)")
    synth.set_defaults(handler=_synth)
    for plugin in entry_points(group=PLUGIN_GROUP):
        try:
            register = plugin.load()
        except ImportError as error:  # a broken optional plugin must not take the whole CLI down
            log.warning("sub-commands from %s are unavailable: %s", plugin.value, error)
            continue
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        handler: Callable[[], int] = lambda: _run_lightning(argv)  # noqa: E731
        verbose = False
    else:
        args = build_parser().parse_args(argv)
        handler = lambda: args.handler(args)  # noqa: E731
        verbose = args.verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return handler()
    except ReIDError as error:
        print(f"reid: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
