"""What every command module shares: the one way a command reports a failure, and the one `--address` flag of the
commands that start Ray."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from otmel.errors import WorkerError, one_line


def fail(cmd: str, problem: BaseException | str) -> int:
    """Print `otmel CMD: error: problem` (one line) to stderr and return exit status 2 (a KeyError shows its bare
    message)."""
    print(f"otmel {cmd}: error: {one_line(problem)}", file=sys.stderr)
    return 2


def debug_wanted(args: argparse.Namespace) -> bool:
    """`--debug` or OTMEL_DEBUG=1: re-raise, with the traceback, instead of the one-line report."""
    return bool(getattr(args, "debug", False)) or os.environ.get("OTMEL_DEBUG", "") not in ("", "0")


def worker_failed(cmd: str, exc: WorkerError) -> int:
    """Report a failed training run (`otmel.train.driver.failures`) in one line on stderr; returns the exit status.

    - the worker raised an error the user can fix (`WorkerUserError`): `otmel CMD: error: MESSAGE (worker log: PATH)`,
      the line the driver prints for that error, and 2;
    - any other exception of the training code: `otmel CMD: internal error: TYPE: MESSAGE (worker log: PATH)` (the
      log holds the worker's traceback), and 1;
    - Ray's own failure (a worker process or node died ...): `otmel CMD: Ray error: CAUSE (worker log: PATH)`, and 1.
    """
    if exc.kind == "user":
        return fail(cmd, exc)
    label = "Ray error" if exc.kind == "ray" else "internal error"
    print(f"otmel {cmd}: {label}: {one_line(exc)}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------ --address

Handler = Callable[[argparse.Namespace], int]

ADDRESS_HELP = ("Ray cluster to join: HOST:PORT (its GCS, port 6379 by default), ray://HOST:10001 (Ray Client), auto "
                "(the cluster `ray start --head` started on this machine) or local; default: RAY_ADDRESS when set (a "
                "`ray job submit` job), else a local Ray of this command's own on 127.0.0.1. A failed join is one "
                "error line, exit 2")


def add_address(p: argparse.ArgumentParser, config_key: bool = True) -> None:
    """The `--address` flag of every command that starts Ray (train, baseline, tune, ablate, study, index, eval,
    serve); `config_key`: the command's run config has `run.ray_address`, which the flag sets (`address_overrides`)."""
    p.add_argument("--address", default=None, metavar="ADDRESS",
                   help=ADDRESS_HELP + (" (the same as run.ray_address=ADDRESS)" if config_key else ""))


def address_overrides(args: argparse.Namespace) -> list[str]:
    """`--address A` as the config override `run.ray_address=A` (JSON-quoted: YAML reads it back as that string)."""
    address = getattr(args, "address", None)
    return [f"run.ray_address={json.dumps(address)}"] if address else []


def ray_handler(cmd: str, run: Handler) -> Handler:
    """`run` for `otmel CMD`: its `--address` is checked first (nothing there, an http:// address ...: one line,
    exit 2, before any work), and the Ray that the command starts or joins speaks for it (`otmel CMD: started a
    local Ray of its own ...` / `joined the Ray cluster at ...`; `otmel.ray_runtime.ray_command`)."""
    def handler(args: argparse.Namespace) -> int:
        from otmel.ray_runtime import check_address, ray_command

        address = getattr(args, "address", None)
        check_address(address)
        with ray_command(cmd, address):
            return run(args)

    return handler
