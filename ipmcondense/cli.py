"""The ``ipmcondense`` command line: a thin dispatcher over the subcommand modules.

Each module in :mod:`ipmcondense.commands` exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` (a callable taking the parsed arguments and returning an exit code).
User errors (``ValueError``, ``TypeError``) and environment errors (``OSError``: a missing file, an
unwritable output folder, a full disk) are printed as one line on stderr with exit code 2, never as a
traceback; anything else (``KeyError``, ``IndexError``, ...) is an internal bug and keeps its traceback.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set), every subcommand runs inside the
job's process group (:func:`ipmcondense.distributed.launched`: gloo, or NCCL with ``--device cuda``):
``condense`` is class-parallel, ``evaluate`` spreads its models, ``distance`` shards its kernel sums;
rank 0 prints the result and writes the files.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

_COMMAND_MODULES = ("distance", "condense", "experts", "generator")
#: the subcommands that run on every rank of a torchrun job (the others refuse to)
_DISTRIBUTED_COMMANDS = ("condense", "evaluate", "distance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipmcondense",
        description="Dataset condensation and distances between datasets as integral probability metrics.",
    )
    parser.add_argument("--version", action="version", version=f"ipmcondense {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"ipmcondense.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        from .distributed import launched, launched_by_torchrun, world_from_env

        if launched_by_torchrun() and world_from_env().world_size > 1 and args.command not in _DISTRIBUTED_COMMANDS:
            raise ValueError(f"{args.command} does not run on several processes; run it without torchrun "
                             f"(distributed: {', '.join(_DISTRIBUTED_COMMANDS)})")
        with launched(getattr(args, "device", None)):
            return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as err:  # OSError: unwritable output, disk full, missing file
        # (a KeyError, IndexError, ... is an internal bug and keeps its traceback)
        message = str(err)
        if isinstance(err, OSError) and err.strerror:
            message = err.strerror + (f": {str(err.filename)!r}" if err.filename else "")
        print(f"ipmcondense {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
