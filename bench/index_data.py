"""Data for bench/index.py part (c): a base KG, 1% new entities (new QIDs), and both together, packed.

    .venv/bin/python bench/index_data.py [--scale 50] [--extra-scale 0.5]

- data/synth-100k: `otmel synth --scale 50 --mentions 3000` (100,000 entities) -> shards/synth-100k;
- data/synth-1k-new: `otmel synth --scale 0.5 --seed 7` with every QID renamed Q... -> N... (1,000 entities,
  its images renamed alike) -> shards/synth-1k-new (its own mentions are not used);
- data/synth-101k: the two KGs in one (base rows first, then the new ones; the base's mentions) -> shards/synth-101k.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otmel.data.pack import pack  # noqa: E402
from otmel.data.synth import generate  # noqa: E402


def rename(src: Path, dst: Path, prefix: str) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for img in (dst / "kb_image").iterdir():
        img.rename(img.with_name(prefix + img.name[1:]))
    for f in dst.glob("*.json"):
        f.write_text(f.read_text().replace('"Q1', f'"{prefix}1').replace("/Q1", f"/{prefix}1"))


def merge(base: Path, extra: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(base, dst)
    for img in (extra / "kb_image").iterdir():
        shutil.copy(img, dst / "kb_image" / img.name)
    kb = json.loads((base / "kb_entity.json").read_text()) + json.loads((extra / "kb_entity.json").read_text())
    (dst / "kb_entity.json").write_text(json.dumps(kb))
    q = json.loads((base / "qid2id.json").read_text())
    n = len(q)
    q.update({k: n + v for k, v in json.loads((extra / "qid2id.json").read_text()).items()})
    (dst / "qid2id.json").write_text(json.dumps(q))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=50)
    p.add_argument("--extra-scale", type=float, default=0.5)
    a = p.parse_args()
    data, shards = ROOT / "data", ROOT / "shards"
    if not (data / "synth-100k" / "synth_stats.json").exists():
        generate(data / "synth-100k", seed=0, scale=a.scale, mentions=3000, workers=2)
    if not (data / "synth-1k-src" / "synth_stats.json").exists():
        generate(data / "synth-1k-src", seed=7, scale=a.extra_scale, workers=2)
    rename(data / "synth-1k-src", data / "synth-1k-new", "N")
    merge(data / "synth-100k", data / "synth-1k-new", data / "synth-101k")
    for name in ("synth-100k", "synth-1k-new", "synth-101k"):
        shutil.rmtree(shards / name, ignore_errors=True)
        pack(data / name, "cleaned", shards / name, shard_size=5000, progress=False)
        print("packed", name, flush=True)


if __name__ == "__main__":
    main()
