"""`otmel plan`: will a config fit on the user's GPUs, and how long will its run take (otmel/plan/)."""

from __future__ import annotations

import argparse
import re
import sys

from otmel.errors import ConfigError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib|t|tb|tib)?\s*$", re.IGNORECASE)
_UNIT = {"m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'80GB', '80GiB', '80' (GiB), '40960MiB' -> bytes. GB and GiB both mean 2^30, as nvidia-smi's '80GB' does."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 80GB, 24GiB or 40960MiB")
    unit = (m.group(2) or "g")[0].lower()
    return int(float(m.group(1)) * _UNIT[unit])


def _cmd_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="will a config fit on N GPUs, and how long will it take: measured here, projected there",
        description="Build the configured towers at full size with random weights (no download), measure a few "
        "real training steps on this machine (peak memory by kind, FLOPs), and project the config's run onto "
        "--gpus GPUs: per-GPU peak memory (fits or not), the largest batch that fits, time per epoch and per "
        "whole-KG validation (matmuls at --gpu-tflops x --mfu, everything else at --gpu-bandwidth), and the KG "
        "index's size.")
    p.add_argument("--config", default=None, help="YAML run config (default: configs/synth.yaml)")
    p.add_argument("--gpus", type=int, default=None, help="data-parallel GPUs (default: the config's "
                   "scaling.num_workers, its maximum when elastic)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB)")
    p.add_argument("--gpu-tflops", type=float, default=312.0,
                   help="dense bf16 TFLOP/s of one GPU (default 312: an A100; an H100 SXM is ~989)")
    p.add_argument("--mfu", type=float, default=0.35,
                   help="share of --gpu-tflops the matmuls achieve (default 0.35)")
    p.add_argument("--gpu-bandwidth", type=float, default=2039.0,
                   help="memory bandwidth of one GPU in GB/s (default 2039: an A100 80GB SXM; H100 SXM ~3350)")
    p.add_argument("--check-batch", type=int, default=None, metavar="B",
                   help="also measure a step at batch B and print it beside the projection")
    for name in ("train", "dev", "test"):
        p.add_argument(f"--{name}-mentions", type=int, default=None, dest=name,
                       help=f"{name} mentions (default: the packed manifest, or the paper's Table 5)")
    p.add_argument("--kg-entities", type=int, default=None, dest="kg", help="KG entities (default: as above)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the probe steps run (default auto: the GPU when there is one, else the CPU)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides such as train.batch_size=32")

    def run(args: argparse.Namespace) -> int:
        import torch

        from otmel.plan import DatasetSize, Hardware, measure, project, render
        from otmel.runconfig import load_config

        cfg = load_config(args.config, args.overrides)
        gpus = args.gpus or cfg.scaling.max_workers
        if gpus < 1 or args.gpu_tflops <= 0 or args.gpu_bandwidth <= 0 or not 0 < args.mfu <= 1:
            raise ConfigError("--gpus must be >= 1, --gpu-tflops and --gpu-bandwidth > 0, --mfu in (0, 1]")
        hw = Hardware(gpus=gpus, gpu_memory=parse_size(args.gpu_memory), tflops=args.gpu_tflops, mfu=args.mfu,
                      bandwidth=args.gpu_bandwidth)
        data = DatasetSize.of(cfg, {k: getattr(args, k) for k in ("train", "dev", "test", "kg")})
        torch.set_flush_denormal(True)
        say = None if args.json else lambda msg: print(f"otmel plan: {msg}", file=sys.stderr)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
        plan = project(cfg, hw, data, measure(cfg, check_batch=args.check_batch, progress=say, device=device))
        print(plan.to_json() if args.json else render(plan))
        return 0

    p.set_defaults(func=run)


COMMANDS = [_cmd_plan]
