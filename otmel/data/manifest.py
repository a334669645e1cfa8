"""`manifest.json` of a shard folder: reading it, shard lists and counts, and `verify`.

The manifest is written last by `pack` (atomically), so a folder with a manifest is a complete pack.
Format: docs/data.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otmel.data.shards import ShardError, ShardInfo, atomic_write_bytes, iter_shard, sha256_file

MANIFEST = "manifest.json"
SCHEMA = "otmel-shards"
SCHEMA_VERSION = 1
KG = "kg"


class ManifestError(RuntimeError):
    """A shard folder has no usable manifest."""


def write_manifest(shard_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` atomically (sorted keys, so the same pack gives the same bytes)."""
    path = Path(shard_dir) / MANIFEST
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    """The manifest of a shard folder (raises `ManifestError` when it is absent or of another schema)."""
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(
            f"{path} not found: not a packed shard folder, or `otmel pack` did not finish"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON ({exc})") from exc
    if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema {manifest.get('schema')!r} v{manifest.get('schema_version')!r}, "
            f"expected {SCHEMA!r} v{SCHEMA_VERSION}"
        )
    return manifest


def _manifest(shard_dir: Path | dict[str, Any]) -> dict[str, Any]:
    return shard_dir if isinstance(shard_dir, dict) else read_manifest(Path(shard_dir))


def shard_infos(shard_dir: Path, split: str, manifest: dict[str, Any] | None = None) -> list[ShardInfo]:
    """The shards of `split` ("train", "dev", "test" or "kg") in order, as recorded in the manifest."""
    manifest = manifest or read_manifest(shard_dir)
    if split not in manifest["shards"]:
        raise KeyError(f"{shard_dir}: no split {split!r}; the manifest has {sorted(manifest['shards'])}")
    return [ShardInfo(**s) for s in manifest["shards"][split]]


def shard_paths(shard_dir: Path, split: str, manifest: dict[str, Any] | None = None) -> list[Path]:
    """Paths of the shards of `split`, in order."""
    return [Path(shard_dir) / s.name for s in shard_infos(shard_dir, split, manifest)]


def split_counts(shard_dir: Path | dict[str, Any]) -> dict[str, int]:
    """Samples per split, KG included: `{"train": n, "dev": n, "test": n, "kg": n}`."""
    return dict(_manifest(shard_dir)["counts"])


def num_entities(shard_dir: Path | dict[str, Any]) -> int:
    """Number of KG entities (rows of the entity order)."""
    return int(_manifest(shard_dir)["counts"][KG])


@dataclass
class VerifyReport:
    """Result of `verify`: `ok` when every shard matches the manifest."""

    shard_dir: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    bad_shards: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(shard_dir: Path, *, deep: bool = True) -> VerifyReport:
    """Re-check every shard against the manifest: presence, byte size, sha256 and (when `deep`, the default)
    the sample count read back from the tar, plus per-split totals. Never raises for bad shards: they are
    listed in the report (a missing / unreadable manifest is a problem too).
    """
    shard_dir = Path(shard_dir)
    report = VerifyReport(str(shard_dir))
    try:
        manifest = read_manifest(shard_dir)
    except ManifestError as exc:
        report.problems.append(str(exc))
        return report
    for split, shards in manifest["shards"].items():
        total = 0
        for entry in shards:
            info = ShardInfo(**entry)
            report.checked += 1
            total += info.samples
            problem = _check_shard(shard_dir / info.name, info, deep)
            if problem:
                report.problems.append(f"{info.name}: {problem}")
                report.bad_shards.append(info.name)
        expected = manifest["counts"].get(split)
        if expected != total:
            report.problems.append(f"split {split}: manifest counts {expected} but its shards hold {total}")
    return report


def preflight(shard_dir: Path, *, skip_train: bool = False) -> list[str]:
    """The cheap check a run makes before it starts (no hashing: presence and byte size of every shard of every
    split, seconds for any pack). Raises `ShardError` listing the bad shards; with `skip_train`, bad *training*
    shards are returned instead (the stream will skip them) while bad dev / test / KG shards still raise —
    skipping evaluation data would silently change the metrics."""
    manifest = read_manifest(Path(shard_dir))
    fatal: list[str] = []
    skipped: list[str] = []
    for split, shards in manifest["shards"].items():
        for entry in shards:
            info = ShardInfo(**entry)
            path = Path(shard_dir) / info.name
            problem = "missing" if not path.is_file() else (
                None if path.stat().st_size == info.bytes else
                f"{path.stat().st_size} bytes, manifest says {info.bytes} (truncated or replaced)")
            if problem:
                (skipped if skip_train and split == "train" else fatal).append(f"{path}: {problem}")
    if fatal:
        raise ShardError(f"{len(fatal)} bad shard(s) in {shard_dir} (run `otmel verify`): " + "; ".join(fatal))
    return skipped


def _check_shard(path: Path, info: ShardInfo, deep: bool) -> str | None:
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != info.bytes:
        return f"{size} bytes, manifest says {info.bytes} (truncated or replaced)"
    digest = sha256_file(path)
    if digest != info.sha256:
        return f"sha256 {digest[:12]}..., manifest says {info.sha256[:12]}... (corrupt or replaced)"
    if deep:
        try:
            count = sum(1 for _ in iter_shard(path))
        except ShardError as exc:
            return f"unreadable tar ({exc})"
        if count != info.samples:
            return f"{count} samples, manifest says {info.samples}"
    return None
