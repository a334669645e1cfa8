"""Writing files so that a crash never leaves a half-written one: write a temporary name beside the target,
then rename it over the target (atomic on POSIX within one file system).

`atomic_path(path)` is the general form: it yields the temporary path for any writer (``torch.save``,
``safetensors.save_file``, ``json.dump``) and renames it on success, removing it on failure. `atomic_write` writes
bytes or text. The temporary name carries the process id (`.NAME.tmp-PID`), so two processes writing one target
never share it, and `otmel pack` recognises its leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` (`.NAME.tmp-PID`); on a clean exit fsync it, rename it onto `path` and
    fsync the folder (so the rename survives a power loss); on an error remove it. `durable=False` skips both fsyncs
    (the rename stays): for files in a staging folder that another writer copies and deletes (a Ray Train checkpoint
    folder), whose copy is what must be whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent, directory=True)


def atomic_write(path: str | Path, data: bytes | str, durable: bool = True) -> None:
    """Write `data` (text as UTF-8) to `path` atomically (`durable`: see `atomic_path`)."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_json(path: str | Path, obj: Any, durable: bool = True, **dump_kw: Any) -> None:
    """`json.dumps(obj, **dump_kw)` written to `path` atomically (`durable`: see `atomic_path`)."""
    atomic_write(path, json.dumps(obj, **dump_kw), durable)


__all__ = ["atomic_json", "atomic_path", "atomic_write"]
