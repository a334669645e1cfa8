"""The checks of `otmel plan` at full size (issue 25): is the projection right where it can be measured?

1. Memory: the step model fitted from the four probes (otmel/plan/_fit.py PROBES) vs steps measured at larger
   batches and pools (each with the config's matcher chunk and a pool of `--workers` workers). Target: within 15%.
2. FLOPs per sample of each tower (forward + backward, torch's FLOP counter) vs an analytic count of a pre-LN
   transformer (Q, K, V, O, MLP and the two attention products; 3x forward, 2x for the patch embedding, whose
   input needs no gradient). Target: within 10%.
3. Model states per GPU (otmel/plan/_states.py) vs DeepSpeed 0.19's own estimators (ZeRO 2 and 3). Target: equal.

Parameters fixed before running: the paper config's model (CLIP ViT-B/32 shapes, bf16), check batches 8 and 16
with 2 workers, 1 and 4 GPUs for the model states.

    .venv/bin/python bench/plan.py --config configs/wikimel.yaml
"""

from __future__ import annotations

import argparse
import time

import torch

from otmel.plan import PROBES, build_probe_model, fit, largest_layer_params, model_states, tower_flops, train_probe
from otmel.runconfig import load_config


def transformer_flops(width: int, ffn: int, layers: int, tokens: int) -> int:
    return layers * (2 * tokens * (4 * width * width + 2 * width * ffn) + 4 * tokens * tokens * width)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/wikimel.yaml")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    cfg = load_config(args.config, [])
    t0 = time.perf_counter()
    model = build_probe_model(cfg.model, bf16=True)
    step = fit([train_probe(model, b, P, c) for b, P, c in PROBES])
    print(f"model: {cfg.model.pretrained}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, bf16")
    print("\n1. activations: projected from the probes vs measured")
    print("| batch | pool | chunk | measured MiB | projected MiB | error |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in args.batches:
        P, c = b * args.workers, min(cfg.model.match_chunk, b * args.workers)
        got = train_probe(model, b, P, c).peak_bytes
        want = step.activations(b, P, c)
        print(f"| {b} | {P} | {c} | {got / 2**20:.1f} | {want / 2**20:.1f} | {(want - got) / got:+.1%} |")

    print("\n2. FLOPs per sample, forward + backward: counted vs analytic")
    tv = model.encoder.vision_model.config  # type: ignore[union-attr]
    tt = model.encoder.text_model.config  # type: ignore[union-attr]
    patches = (tv.image_size // tv.patch_size) ** 2
    analytic = {
        "text": 3 * transformer_flops(tt.hidden_size, tt.intermediate_size, tt.num_hidden_layers, cfg.model.max_len),
        "vision": 3 * transformer_flops(tv.hidden_size, tv.intermediate_size, tv.num_hidden_layers, patches + 1)
        + 2 * 2 * patches * 3 * tv.patch_size**2 * tv.hidden_size,
    }
    counted = tower_flops(model, 1)
    print("| tower | counted GFLOP | analytic GFLOP | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for k in ("text", "vision"):
        print(f"| {k} | {counted[k] / 1e9:.3f} | {analytic[k] / 1e9:.3f} | {counted[k] / analytic[k]:.4f} |")

    print("\n3. model states per GPU (bf16) vs DeepSpeed's estimators")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    psi = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layer = largest_layer_params(model)
    print("| stage | GPUs | otmel plan bytes | DeepSpeed bytes | equal |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for gpus in (1, 4):
        ds2 = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=gpus, cpu_offload=False)[1]
        ds3 = estimate_zero3_model_states_mem_needs(psi, layer, num_gpus_per_node=gpus, cpu_offload=False)[1]
        for stage, ds in ((2, ds2), (3, ds3)):
            ours = model_states(psi, stage, gpus, True, layer).total
            print(f"| {stage} | {gpus} | {ours} | {ds} | {ours == ds} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
