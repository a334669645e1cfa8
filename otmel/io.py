"""Writing files so that a crash never leaves a half-written one: write a temporary name beside the target,
then rename it over the target (atomic on POSIX within one file system).

`atomic_path(path)` is the general form: it yields the temporary path for any writer (``torch.save``,
``safetensors.save_file``, ``json.dump``) and renames it on success, removing it on failure. `atomic_write` writes
bytes or text. The temporary name carries the process id, so two processes writing one target never share it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit rename it onto `path`, on an error remove it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_json(path: str | Path, obj: Any, **dump_kw: Any) -> None:
    """`json.dumps(obj, **dump_kw)` written to `path` atomically."""
    atomic_write(path, json.dumps(obj, **dump_kw))


__all__ = ["atomic_json", "atomic_path", "atomic_write"]
