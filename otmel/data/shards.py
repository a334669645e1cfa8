"""WebDataset tar shards: a deterministic, atomic writer and a checked reader.

A shard is a plain (uncompressed) tar in the WebDataset convention: a sample is the run of members that
share a key, `KEY.EXT` (the key has no dot), e.g. `train-000000042.json`, `train-000000042.m.jpg`.
Member headers are fixed (mtime 0, uid/gid 0, no user/group names, mode 0644), so the same samples give the
same bytes and sha256 on every run and machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from otmel.errors import UserError
from otmel.io import atomic_write


class ShardError(UserError, RuntimeError):
    """A shard is missing, truncated or corrupt, or disagrees with the manifest. The message names it."""


class ShardIntegrityError(ShardError):
    """A shard's size or bytes differ from the manifest (truncated, replaced, bit rot), found before any of its
    samples is read."""


@dataclass
class ShardInfo:
    """One shard as the manifest records it."""

    name: str  # file name, relative to the shard folder
    samples: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return asdict(self)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


atomic_write_bytes = atomic_write  # `otmel.io.atomic_write`: temp file in the same folder, fsync, `os.replace`


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardSetWriter:
    """Writes the shards `PREFIX-000000.tar`, `PREFIX-000001.tar`, ... of a split, `shard_size` samples each.

    Each shard is written under a temporary name in the same folder, fsynced, then renamed into place.
    `close()` returns the `ShardInfo` of every shard written (none when no sample was written).
    """

    def __init__(self, out_dir: Path, prefix: str, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir, self.prefix, self.shard_size = Path(out_dir), prefix, shard_size
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._file: io.BufferedWriter | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._file = self._tmp.open("wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115
        self._count = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None and self._tmp is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        final = self.out_dir / name
        os.replace(self._tmp, final)
        self.shards.append(ShardInfo(name, self._count, final.stat().st_size, sha256_file(final)))
        self._tar = self._file = self._tmp = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: `members` maps an extension (`json`, `m.jpg`, ...) to its bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext in sorted(members):
            data = members[ext]
            self._tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._count += 1
        if self._count >= self.shard_size:
            self._finish()

    def close(self) -> list[ShardInfo]:
        """Finish the last shard and return all shards' infos."""
        if self._tar is not None:
            self._finish()
        _fsync_dir(self.out_dir)
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (on error)."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tar = self._file = self._tmp = None


def iter_shard(
    path: Path, *, expected_samples: int | None = None, expected_bytes: int | None = None,
    expected_sha256: str | None = None,
) -> Iterator[dict[str, bytes | str]]:
    """Samples of one shard, as dicts `{"__key__": key, "__url__": path, EXT: bytes, ...}`, in tar order.

    Raises `ShardError` naming the shard when it is missing, its size differs from `expected_bytes`, the tar
    is truncated or corrupt, or it holds a number of samples other than `expected_samples` (a tar cut at a
    member boundary reads as a shorter valid tar, hence the count check). With `expected_sha256` the whole shard
    is read into memory and hashed *before* its first sample is yielded (shards are a few MB): a mismatch raises
    `ShardIntegrityError` and no sample of that shard ever reaches the caller.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ShardError(f"shard {path}: cannot be read ({exc})") from exc
    if expected_bytes is not None and size != expected_bytes:
        raise ShardIntegrityError(
            f"shard {path}: {size} bytes, the manifest says {expected_bytes} (truncated or replaced; "
            "run `otmel verify`)"
        )
    count = 0
    current: dict[str, bytes | str] | None = None
    source: io.BufferedReader | io.BytesIO
    try:
        if expected_sha256 is not None:
            blob = path.read_bytes()
            digest = hashlib.sha256(blob).hexdigest()
            if digest != expected_sha256:
                raise ShardIntegrityError(
                    f"shard {path}: sha256 {digest[:12]}..., the manifest says {expected_sha256[:12]}... (corrupt "
                    "or replaced; run `otmel verify`)")
            source = io.BytesIO(blob)
        else:
            source = path.open("rb")
        with source as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, dot, ext = base.partition(".")
                if not dot:
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if current is None or current["__key__"] != key:
                    if current is not None:
                        count += 1
                        yield current
                    current = {"__key__": key, "__url__": str(path)}
                current[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"shard {path}: truncated or corrupt tar after {count} samples ({exc})") from exc
    if current is not None:
        count += 1
        yield current
    if expected_samples is not None and count != expected_samples:
        raise ShardError(
            f"shard {path}: {count} samples, the manifest says {expected_samples} (truncated or replaced; "
            "run `otmel verify`)"
        )
