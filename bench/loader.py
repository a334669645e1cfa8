"""Benchmark: the WebDataset training stream vs a per-file loader like the public MEL code's.

Writes a cleaned-layout dataset with photo-sized JPEGs (400-640 px) into a temporary folder, packs it, then
times, with the same DataLoader workers, batch size, image size and tokenizer:
- `webdataset`: `otmel.data.loaders.train_loader` over the packed shards (pre-resized ≤224 px JPEGs read
  sequentially from tars, mention + gold entity per sample);
- `per-file`: a torch `Dataset` over the `*_train.json` list that, per sample, opens the mention image and
  the gold entity's image with PIL, resizes + CLIP-preprocesses them (the same `clip_preprocess`) and
  tokenizes both texts (the per-sample work of the public MEL code's collators);
- `per-file-hf` (with `--hf`): the same, with `transformers.CLIPImageProcessor` as the public code uses.

Run: `.venv/bin/python bench/loader.py` (see `--help`); figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otmel.data.loaders import train_loader  # noqa: E402
from otmel.data.pack import pack  # noqa: E402
from otmel.data.transforms import Preprocessor, clip_preprocess  # noqa: E402

WORDS = "the a of in is was and to born city river museum tower singer band film king queen".split()  # noqa: SIM905


def build_tokenizer() -> Any:
    """An offline word-level tokenizer with a pair template (the bench needs no downloaded vocabulary)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab_words = ["<pad>", "<unk>", "<s>", "</s>", *WORDS, *(f"w{i}" for i in range(5000))]
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


_NOISE: np.ndarray | None = None


def photo(rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: smooth structure plus fine noise, 400-640 px sides, quality 90."""
    global _NOISE
    if _NOISE is None:
        _NOISE = np.random.default_rng(1).normal(0, 10, size=(800, 800, 3)).astype(np.float32)
    w, h = int(rng.integers(400, 641)), int(rng.integers(400, 641))
    coarse = rng.integers(0, 256, size=(h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    y, x = int(rng.integers(0, 800 - h)), int(rng.integers(0, 800 - w))
    noisy = np.clip(base + _NOISE[y : y + h, x : x + w], 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format="JPEG", quality=90)
    return out.getvalue()


def sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(f"w{int(i)}" if i >= 0 else WORDS[int(-i) % len(WORDS)] for i in rng.integers(-30, 5000, n))


def write_dataset(root: Path, mentions: int, entities: int, seed: int = 0) -> None:
    """A cleaned-layout dataset; every mention and every entity has its own JPEG."""
    rng = np.random.default_rng(seed)
    (root / "kb_image").mkdir(parents=True)
    (root / "mention_image").mkdir()
    kb = []
    for i in range(entities):
        (root / "kb_image" / f"Q{i}.jpg").write_bytes(photo(rng))
        kb.append({"id": f"Q{i}", "type": "entity", "entity_name": sentence(rng, 3),
                   "attr": [sentence(rng, 8), sentence(rng, 8)], "image_list": [f"Q{i}.jpg"]})
    (root / "kb_entity.json").write_text(json.dumps(kb))
    (root / "qid2id.json").write_text(json.dumps({f"Q{i}": i for i in range(entities)}))
    rows = []
    for j in range(mentions):
        (root / "mention_image" / f"m{j}.jpg").write_bytes(photo(rng))
        rows.append({"id": f"m{j}", "sentence": sentence(rng, 25), "mentions": sentence(rng, 2),
                     "imgPath": f"m{j}.jpg", "answer": f"Q{int(rng.integers(entities))}"})
    (root / "bench_train.json").write_text(json.dumps(rows))
    (root / "bench_dev.json").write_text("[]")
    (root / "bench_test.json").write_text("[]")


class PerFileDataset(Dataset):
    """The public MEL code's way: per sample, open image files with PIL, preprocess, tokenize."""

    def __init__(self, root: Path, pre: Preprocessor, hf: Any = None) -> None:
        self.root, self.pre, self.hf = root, pre, hf
        self.rows = json.loads((root / "bench_train.json").read_text())
        kb = json.loads((root / "kb_entity.json").read_text())
        self.kb = {e["id"]: e for e in kb}
        self.qid2id = json.loads((root / "qid2id.json").read_text())

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, path: Path) -> torch.Tensor:
        img = Image.open(path).convert("RGB")
        if self.hf is not None:
            return torch.as_tensor(self.hf(img, return_tensors="np")["pixel_values"][0])
        return clip_preprocess(img, self.pre.image_size, self.pre.mean, self.pre.std)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        ent = self.kb[row["answer"]]
        m_ids, m_mask = self.pre.text(row["mentions"], row["sentence"])
        e_ids, e_mask = self.pre.text(ent["entity_name"], ". ".join(ent["attr"]))
        return {
            "m_input_ids": m_ids, "m_attention_mask": m_mask,
            "m_pixel_values": self._image(self.root / "mention_image" / row["imgPath"]),
            "m_image_mask": torch.tensor(True), "m_index": torch.tensor(i),
            "e_input_ids": e_ids, "e_attention_mask": e_mask,
            "e_pixel_values": self._image(self.root / "kb_image" / ent["image_list"][0]),
            "e_image_mask": torch.tensor(True), "e_index": torch.tensor(self.qid2id[row["answer"]]),
        }


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


def time_batches(batches: Any, warmup: int, measure: int, batch_size: int) -> tuple[float, float]:
    """Samples per second over `measure` batches after `warmup` batches, and this process's CPU ms per
    sample over them (the whole cost when the loader runs in-process, `num_workers=0`)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(measure):
        batch = next(it)
        assert batch["m_pixel_values"].shape[0] == batch_size
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return measure * batch_size / wall, 1e3 * cpu / (measure * batch_size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mentions", type=int, default=3000)
    ap.add_argument("--entities", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per loader (best one is reported)")
    ap.add_argument("--cpu-batches", type=int, default=10, help="batches of the in-process CPU-time pass")
    ap.add_argument("--mix-workers", action="store_true", help="train_loader(mix_workers=True)")
    ap.add_argument("--hf", action="store_true", help="also time the per-file loader with CLIPImageProcessor")
    ap.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp folder)")
    ap.add_argument("--integrity", action="store_true",
                    help="time the training stream with the per-shard sha256 check (as trained) against the same "
                    "stream without it, instead of against the per-file loader")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_dataset(root / "src", args.mentions, args.entities)
        t1 = time.perf_counter()
        manifest = pack(root / "src", "cleaned", root / "shards", shard_size=250, num_workers=args.workers,
                        progress=False)
        t2 = time.perf_counter()
        src_mb = sum(p.stat().st_size for p in (root / "src").rglob("*.jpg")) / 2**20
        shard_mb = sum(s["bytes"] for v in manifest["shards"].values() for s in v) / 2**20
        print(f"data: {args.mentions} mentions, {args.entities} entities, {src_mb:.0f} MB of JPEGs "
              f"(generated in {t1 - t0:.0f} s); packed in {t2 - t1:.0f} s into {shard_mb:.0f} MB of shards")
        pre = Preprocessor(build_tokenizer(), image_size=args.image_size, max_len=40)
        hf = None
        if args.hf:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from transformers import CLIPImageProcessor

                s = args.image_size
                hf = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})

        def loaders(workers: int) -> dict[str, Any]:
            common: dict[str, Any] = dict(batch_size=args.batch_size, num_workers=workers)
            steps = args.warmup + args.batches
            out = {"webdataset": train_loader(root / "shards", pre, steps_per_epoch=steps, seed=0,
                                              shuffle_buffer=1000, mix_workers=args.mix_workers, **common)}
            if args.integrity:  # the same stream, same seed, without hashing
                out["no-hash"] = train_loader(root / "shards", pre, steps_per_epoch=steps, seed=0, shuffle_buffer=1000,
                                              mix_workers=args.mix_workers, integrity="off", **common)
                return out
            extra = dict(shuffle=True, drop_last=True, persistent_workers=False,
                         worker_init_fn=_init_worker if workers else None)
            out["per-file"] = DataLoader(PerFileDataset(root / "src", pre), **extra, **common)
            if hf is not None:
                out["per-file-hf"] = DataLoader(PerFileDataset(root / "src", pre, hf), **extra, **common)
            return out

        # interleaved repeats (A, B, A, B, ...), best of each: the machine may be shared
        rates: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, dl in loaders(args.workers).items():
                rate = time_batches(dl, args.warmup, args.batches, args.batch_size)[0]
                rates[name] = max(rates.get(name, 0.0), rate)
        cpu = {name: time_batches(dl, 1, args.cpu_batches, args.batch_size)[1]
               for name, dl in loaders(0).items()}

    print(f"batch {args.batch_size}, image {args.image_size}, max_len 40, torch threads 1 per process, "
          f"mix_workers={args.mix_workers}")
    print(f"throughput with {args.workers} DataLoader workers (best of {args.repeat} runs of {args.batches} "
          f"batches after {args.warmup} warm-up) | CPU per sample in one process ({args.cpu_batches} batches, "
          "num_workers=0):")
    for name in rates:
        print(f"{name:>12}: {rates[name]:8.1f} samples/s | {cpu[name]:6.2f} CPU ms/sample")
    if args.integrity:
        slow = 1 - rates["webdataset"] / rates["no-hash"]
        print(f"sha256 check: {100 * slow:+.1f}% slower in samples/s (target <= 3%), CPU per sample "
              f"{cpu['webdataset'] / cpu['no-hash']:.3f}x")
        return 0
    for name in [n for n in rates if n != "webdataset"]:
        print(f"webdataset vs {name}: {rates['webdataset'] / rates[name]:.2f}x samples/s, "
              f"{cpu[name] / cpu['webdataset']:.2f}x less CPU per sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
