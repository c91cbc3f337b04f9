"""``reid serve``, ``reid enroll`` and ``reid reindex``: the service's sub-commands of the ``reid`` command.

Registered through the ``reid.commands`` entry point, so the library never imports the service. Heavy imports
(torch, FastAPI, uvicorn) happen inside the handlers: ``reid --help`` and ``reid synth`` stay fast.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from reid.cli import add_backend, at_least
from reid.errors import ReIDError

if TYPE_CHECKING:
    from service.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the flags given, falling back to ``REID_*`` environment variables for the rest."""
    from pydantic import ValidationError

    from service.settings import Settings

    given = {name: value for name, value in vars(args).items()
             if name in Settings.model_fields and value is not None}
    try:
        return Settings(**given)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            if not item["loc"]:  # settings that only mean something together
                problems.append(str(item["msg"]).removeprefix("Value error, "))
                continue
            name = str(item["loc"][0])
            where = f"--{name.replace('_', '-')} or REID_{name.upper()}"
            problems.append(f"{where}: {'required' if item['type'] == 'missing' else item['msg']}")
        raise ReIDError("invalid service settings: " + "; ".join(problems)) from error


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before uvicorn starts: a busy port is a one-line error, not uvicorn's
    ``[Errno 98]`` after a start-up that looked complete."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP,
    # and without it every response waits ~40 ms for a delayed ACK between its header and body writes.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ReIDError(f"cannot listen on {host}:{port}: {_listen_problem(error, host)}") from error
    return listener


def _listen_problem(error: OSError, host: str) -> str:
    """What went wrong binding, and which flag mends it (a busy port, a host that is not this machine's)."""
    if isinstance(error, socket.gaierror):
        return (f"{host!r} is not an address or a name this machine can resolve (--host: e.g. 127.0.0.1, or 0.0.0.0 "
                "for every network interface)")
    reason = os.strerror(error.errno) if error.errno else str(error)
    hint = {
        errno.EADDRINUSE: "is another server using the port? choose another with --port",
        errno.EADDRNOTAVAIL: "--host must be an address of this machine: e.g. 127.0.0.1, or 0.0.0.0 for every "
                             "network interface",
        errno.EACCES: "ports under 1024 need administrator rights: choose another with --port",
    }.get(error.errno)
    return f"{reason} ({hint})" if hint else reason


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.engine import Engine

    settings = _settings(args)
    # Opened before the server starts, so that a refusal (folder in use, wrong model for the store, bad checkpoint,
    # busy port) ends the command with a one-line error instead of a server traceback.
    engine = Engine.open(settings)
    try:
        listener = _listen(settings.host, settings.port)
    except ReIDError:
        engine.close()
        raise

    class AnnouncingServer(uvicorn.Server):
        """Says, once it listens, where to go: scripts and people wait for this line (or for /health)."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = listener.getsockname()[:2]  # with --port 0, the port the system chose
                url = f"http://{host}:{port}"
                individuals, photos = engine.store.counts()
                print(f"turtle-reid is ready at {url} ({individuals} individuals, {photos} photos): the web page is "
                      f"{url}/ and the API documentation {url}/docs", flush=True)

    server = AnnouncingServer(uvicorn.Config(create_app(settings, engine), log_level="info"))
    server.run(sockets=[listener])
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from service.offline import enroll_dataset

    report = enroll_dataset(args.checkpoint, args.data_dir, args.data, batch_size=args.batch_size,
                            backend=args.backend)
    print(f"enrolled {report.added} new photos of {report.individuals} individuals into {args.data_dir} "
          f"({report.already_enrolled} already enrolled, {report.skipped} skipped)")
    return 0


def _reindex(args: argparse.Namespace) -> int:
    from service.offline import reindex

    count = reindex(args.checkpoint, args.data_dir, batch_size=args.batch_size)
    print(f"re-embedded {count} photos in {args.data_dir}; the store now uses {args.checkpoint}")
    return 0


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="model checkpoint")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="folder the service owns: SQLite database and enrolled photos")


def _settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~service.settings.Settings` field, named and described by the field itself, so a new
    setting gets its flag and every flag says what its environment variable says. Values stay strings here:
    pydantic converts and validates them with the environment's values, in :func:`_settings`."""
    from service.settings import Settings

    for name, field in Settings.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        default = "" if field.is_required() or field.default is None else f" (default {field.default})"
        help_text = f"{field.description}{default}; or REID_{name.upper()}"
        if field.annotation in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, metavar=name.upper(), help=help_text)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``enroll`` and ``reindex`` to the ``reid`` command."""
    serve = commands.add_parser("serve", help="run the identification web service",
                                description="Run the identification service; every flag also reads REID_<NAME> "
                                            "from the environment (see docs/service.md).")
    _settings_arguments(serve)
    serve.set_defaults(handler=_serve)

    enroll = commands.add_parser("enroll", help="enrol a whole dataset into the service's store (offline)")
    _store_arguments(enroll)
    enroll.add_argument("--data", type=Path, required=True,
                        help="dataset folder (labels.csv, Zindi layout, or one folder per individual)")
    enroll.add_argument("--batch-size", type=at_least(1), default=32)
    add_backend(enroll)
    enroll.set_defaults(handler=_enroll)

    reindex = commands.add_parser("reindex", help="re-embed every stored photo with a new checkpoint (offline)")
    _store_arguments(reindex)
    reindex.add_argument("--batch-size", type=at_least(1), default=32)
    reindex.set_defaults(handler=_reindex)
