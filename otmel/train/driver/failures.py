"""A failed training run, as the driver reports it: Ray Train's `TrainingFailedError` turned into an otmel error.

Ray Train (V2) ends `trainer.fit()` with a `WorkerGroupError` whose `worker_failures` maps each failed worker's
rank to the exception it raised (pickled over from the worker), or a `ControllerError` (`controller_failure`) when
the run could not go on for Ray's own reasons. Its message is Ray's traceback snippet, cut at 1000 characters:
usually before the line that names the problem. `worker_error` picks the failure that explains the run, frees its
message of the DataLoader's wrapping (an exception raised in a DataLoader worker process is re-raised by torch as
"Caught X in DataLoader worker process N. Original Traceback ...: X: message") and returns a `WorkerError`:

- `WorkerUserError` (kind "user") when the worker's exception is the user's to fix: what the console script
  treats as a user error in the driver (`otmel.errors.USER_ERROR_TYPES`: every `UserError` — a corrupt or missing
  shard, a checkpoint that cannot be written or is corrupt, a config value — and the built-in value / key / file
  errors, e.g. a record whose JSON does not parse, unless Ray's own), and `NonFiniteLossError` (the run diverged:
  the fix is in the config). Its message is the one line the driver would print for that exception, then the
  worker's log.
- kind "internal" for any other exception of the training code (a bug): its type, message and log.
- kind "ray" for Ray's own failures (a `ray.exceptions.RayError` or Ray Train error: a worker process or its node
  died, a health check timed out, not enough resources, a preemption): a short cause line.

The console script prints these (`otmel.cli.common.worker_failed`); library callers can catch `WorkerError` (or
`UserError`) and read `cause`, `rank` and `log`.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import sys
from pathlib import Path
from typing import Any

from otmel.errors import USER_ERROR_TYPES, UserError, WorkerError, WorkerUserError, one_line, rebuild_exception
from otmel.train.worker.progress import LOG_DIR

# torch.utils.data's ExceptionWrapper.reraise: f"Caught {type name} {where}.\nOriginal {formatted traceback}"
_CAUGHT = re.compile(r"\ACaught (?P<name>\w+) (?P<where>in [^\n]*?)\.\nOriginal (?P<tb>.*)\Z", re.DOTALL)
RAY_CAUSE_LIMIT = 300  # characters of a Ray failure's own message on the console line


def worker_log(run_dir: Path | str, rank: int) -> Path:
    """Where worker `rank` of a quiet run writes its stdout / stderr (`otmel.train.worker.progress`)."""
    return Path(run_dir) / LOG_DIR / f"worker-rank{rank}.log"


def _resolve(qualified: str) -> type[BaseException] | None:
    """The exception class named `module.Class` (or a built-in `Class`) in a formatted traceback: looked up in the
    modules already imported, or imported when it is otmel's own; None when unknown."""
    module, _, name = qualified.rpartition(".")
    if not module:
        obj = getattr(builtins, name, None)
    else:
        mod = sys.modules.get(module)
        if mod is None and (module == "otmel" or module.startswith("otmel.")):
            try:
                mod = importlib.import_module(module)
            except Exception:
                mod = None
        obj = getattr(mod, name, None) if mod is not None else None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def unwrap_loader_error(exc: BaseException) -> tuple[BaseException, str]:
    """(the exception, its class name) as raised where it began: an exception re-raised from a DataLoader worker
    (or pin-memory thread) gets back its own message and, where torch had to fall back to RuntimeError, its own
    class (rebuilt without calling its constructor). Any other exception is returned as it is."""
    match = _CAUGHT.match(str(exc.args[0]) if exc.args else "")
    if match is None:
        return exc, type(exc).__name__
    name, tb = match["name"], match["tb"]
    # the last line of the traceback that starts the exception's own line: "[module.]Name: message" or "[module.]Name"
    last = None
    for m in re.finditer(rf"^(?P<qual>(?:\w+\.)*{re.escape(name)})(?P<sep>: |$)", tb, re.MULTILINE):
        last = m
    if last is None:
        return exc, name
    message = tb[last.end():].rstrip("\n") if last["sep"] else ""
    cls: type[BaseException] | None = type(exc) if type(exc).__name__ == name else _resolve(last["qual"])
    if cls is None:
        cls = type(exc)
    arg: Any = message
    if issubclass(cls, KeyError) and not issubclass(cls, UserError):
        try:  # a KeyError's str() is the repr of its argument
            arg = ast.literal_eval(message)
        except (ValueError, SyntaxError):
            arg = message
    try:
        rebuilt = rebuild_exception(cls, (arg,), {k: v for k, v in vars(exc).items() if not k.startswith("__")})
    except Exception:
        return exc, name
    return rebuilt, name


def _ray_error_types() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayError
    from ray.train.v2._internal.exceptions import RayTrainError

    return (RayError, RayTrainError)


def _base(exc: BaseException) -> tuple[BaseException, str]:
    """A worker failure without its wrappers, and its class name: the user's exception inside Ray's
    `UserExceptionWithTraceback`, the cause of a `RayTaskError` (an exception of a task the worker waited on), the
    exception of a DataLoader worker (`unwrap_loader_error`)."""
    from ray.exceptions import RayTaskError

    for _ in range(5):
        inner = getattr(exc, "_base_exc", None)  # UserExceptionWithTraceback
        cause = getattr(exc, "cause", None)
        if isinstance(inner, BaseException):
            exc = inner
        elif isinstance(exc, RayTaskError) and isinstance(cause, BaseException):
            exc = cause
        else:
            break
    return unwrap_loader_error(exc)


def is_users(exc: BaseException) -> bool:
    """Whether a worker's exception is the user's to fix (exit status 2): see the module docstring. Ray's own errors
    that are also a built-in `ValueError` or `OSError` (`GetTimeoutError`, `ActorHandleNotFoundError`) are not."""
    if isinstance(exc, UserError):  # NonFiniteLossError included
        return True
    return isinstance(exc, USER_ERROR_TYPES) and not isinstance(exc, _ray_error_types())


def _is_ray(exc: BaseException) -> bool:
    return isinstance(exc, _ray_error_types()) and not is_users(exc)


def _short(text: str, limit: int = RAY_CAUSE_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def ray_cause(exc: BaseException, rank: int | None) -> str:
    """One short line for one of Ray's own failures (of worker `rank`, or of the run when None)."""
    from ray.exceptions import ActorDiedError, NodeDiedError, OutOfMemoryError, RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    who = f"the Ray Train worker of rank {rank}" if rank is not None else "the run"
    if isinstance(exc, WorkerHealthCheckFailedError):
        exc = exc.health_check_failure
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else ""
    if isinstance(exc, OutOfMemoryError):
        what = f"{who} was killed by Ray's memory monitor (out of memory)"
    elif isinstance(exc, (ActorDiedError, RayActorError)):
        what = f"{who} died"
        detail = re.search(r"Worker exit detail: (.+)", text) or re.search(r"^(?!\t)(?!The actor died)(.+)$", text,
                                                                           re.MULTILINE)
        first = f"{first} {detail[1]}" if detail and detail[1] not in first else first
    elif isinstance(exc, NodeDiedError):
        what = f"the node of {who} died"
    elif isinstance(exc, WorkerHealthCheckTimeoutError):
        what = f"{who} stopped answering Ray Train's health checks"
    else:
        what = f"{who} failed" if rank is not None else "Ray Train stopped the run"
    return f"{what}: {type(exc).__name__}: {_short(first)}" if first else f"{what}: {type(exc).__name__}"


def _pick(failures: dict[int, BaseException]) -> tuple[int, BaseException, str]:
    """The failure that explains the run: a user error first (lowest rank), then Ray's own failures (a worker that
    died leaves the others with broken collectives), then any other exception."""
    def order(item: tuple[int, BaseException, str]) -> tuple[int, int]:
        rank, exc, _ = item
        return (0 if is_users(exc) else 1 if _is_ray(exc) else 2, rank)

    return min(((r, *_base(e)) for r, e in failures.items()), key=order)


def worker_error(exc: BaseException, run_dir: Path | str | None = None, *, logs: bool = True) -> WorkerError | None:
    """The otmel error for a `TrainingFailedError` of `trainer.fit()` (None for any other exception). `run_dir`:
    the run's local directory (where `logs/worker-rank{R}.log` and `logs/driver.log` are when `logs`: the quiet
    console)."""
    from ray.train import TrainingFailedError

    if not isinstance(exc, TrainingFailedError):
        return None
    failures = getattr(exc, "worker_failures", None)
    controller = getattr(exc, "controller_failure", None)
    rank: int | None = None
    if isinstance(failures, dict) and failures:
        rank, cause, name = _pick(failures)
    elif isinstance(controller, BaseException):
        cause, name = _base(controller)
    else:  # e.g. a preemption: Ray's own
        cause, name = exc, type(exc).__name__
    log = None
    if logs and run_dir is not None:  # the failed worker's log; the driver's for a failure of the run as a whole
        log = str(worker_log(run_dir, rank) if rank is not None else Path(run_dir) / LOG_DIR / "driver.log")
    where = f" ({'worker' if rank is not None else 'driver'} log: {log})" if log else ""
    if is_users(cause):
        return WorkerUserError(one_line(cause) + where, cause=cause, cause_type=name, rank=rank, log=log)
    if _is_ray(cause):
        return WorkerError(ray_cause(cause, rank) + where, cause=cause, rank=rank, log=log, kind="ray")
    return WorkerError(f"{name}: {_short(one_line(cause), 500)}{where}", cause=cause, cause_type=name, rank=rank,
                       log=log, kind="internal")


def raise_worker_error(exc: BaseException, run_dir: Path | str | None, *, logs: bool = True) -> None:
    """Raise the `WorkerError` of `exc` (chained to it) when it is a failed training run; else return."""
    err = worker_error(exc, run_dir, logs=logs)
    if err is not None:
        raise err from exc


__all__ = ["is_users", "raise_worker_error", "ray_cause", "unwrap_loader_error", "worker_error", "worker_log"]
