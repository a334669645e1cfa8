"""The console table of a `Plan` (`otmel plan`; `--json` prints `Plan.to_json()` instead)."""

from __future__ import annotations

from otmel.plan._project import GiB, Plan


def _gib(n: float) -> str:
    return f"{n / GiB:10.2f}"


def _duration(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def render(plan: Plan) -> str:
    m, hw, lay, mem, fl, sec, data = plan.model, plan.hardware, plan.layout, plan.memory, plan.flops, plan.seconds, \
        plan.dataset
    gpus = lay["gpus"]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines = [
        f"otmel plan: {plan.config}: {m['pretrained']} at full size ({m['params'] / 1e6:.1f}M parameters, "
        f"{m['precision']}), {gpus} GPU(s) x {hw['gpu_memory'] / GiB:g} GiB, ZeRO stage {lay['zero_stage']}",
        f"per GPU: {lay['batch_per_gpu']} mentions, {lay['tower_rows']} samples through the towers, a pool of "
        f"{lay['pool']} entities ({lay['negatives']} negatives), matcher chunk {lay['match_chunk']}"
        f"{' (checkpointed)' if lay['match_checkpoint'] else ''}",
        "",
        "memory per GPU                                   GiB",
        f"  parameters                              {_gib(mem['params'])}",
        f"  gradients                               {_gib(mem['grads'])}",
        f"  optimizer states (fp32 master, Adam)    {_gib(mem['optimizer'])}",
    ]
    if mem["gathered_layer"]:
        lines.append(f"  ZeRO-3 gathered layer                   {_gib(mem['gathered_layer'])}")
    lines += [
        f"  activations: towers                     {_gib(mem['towers'])}",
        f"  activations: matcher (OT plans)         {_gib(mem['matcher'])}",
        f"  activations: other                      {_gib(mem['other'])}",
        f"  allowance                               {_gib(mem['allowance'])}",
        f"  peak                                    {_gib(mem['peak'])}   {verdict} in {hw['gpu_memory'] / GiB:g} GiB",
        f"  largest per-GPU batch that fits         {plan.max_batch:10d}",
        "",
        "compute (projected)",
        f"  FLOPs per training sample               {fl['per_sample'] / 1e9:10.1f} GFLOP (text tower "
        f"{fl['text_tower_per_sample'] / 1e9:.1f}, vision tower {fl['vision_tower_per_sample'] / 1e9:.1f})",
        f"  step / epoch                            {_duration(sec['step']):>10} / {_duration(sec['epoch'])}",
        f"  whole-KG validation                     {_duration(sec['dev_eval']):>10} ({data['dev']} mentions x "
        f"{data['kg']} entities)",
        f"  test evaluation                         {_duration(sec['test_eval']):>10} ({data['test']} mentions)",
        f"  whole run                               {_duration(sec['run']):>10}",
        "",
        f"entity index ({data['kg']} entities)       disk GiB    RAM GiB",
    ]
    for ix in plan.index:
        lines.append(f"  {ix['kind']:<38}{_gib(ix['store_bytes'] + ix['ann_bytes'])} {_gib(ix['ram_bytes'])}")
    if plan.check:
        c = plan.check
        lines += ["", f"check at batch {c['b']} (pool {c['P']}): activations measured "
                      f"{c['measured_bytes'] / 2**20:.1f} MiB, projected {c['projected_bytes'] / 2**20:.1f} MiB "
                      f"({c['error']:+.1%})"]
    lines += ["", f"dataset: {data['source']}", "assumptions: " + "; ".join(plan.assumptions),
              f"measured here ({plan.measured_on}): {len(plan.probes)} training steps; the one at batch "
              f"{plan.probes[1]['b']} took {sec['this_machine_step']:.2f} s (forward + backward)"]
    return "\n".join(lines)
