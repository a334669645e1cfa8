"""Elastic training: the per-worker batch and the sample clock (pure functions), and ZeRO optimizer state written by
W ranks loading on W' ranks with the Adam moments of a fixed-size run (real DeepSpeed ZeRO-1 over gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from otmel.runconfig import ScalingConfig, load_config
from otmel.train.worker.elastic import SampleClock, worker_batch
from otmel.train.worker.engine import load_state_file
from tests import elastic_zero_script
from tests.gloo_helpers import spawn_and_join
from tests.ray_helpers import free_port


def test_num_workers_is_n_or_a_min_max_range() -> None:
    fixed = load_config(None, ["scaling.num_workers=3"]).scaling
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers, fixed.describe()) == (False, 3, 3, "3")
    el = load_config(None, ["scaling.num_workers=[1, 4]"]).scaling
    assert (el.elastic, el.min_workers, el.max_workers, el.describe()) == (True, 1, 4, "1-4 (elastic)")
    for bad in ("[3, 1]", "[0, 2]", "[1, 2, 3]", "0", "[1.5, 2]"):
        with pytest.raises(ValueError, match="scaling.num_workers"):
            load_config(None, [f"scaling.num_workers={bad}"])


def test_worker_batch_policies() -> None:
    per = ScalingConfig(num_workers=[1, 4])
    assert [worker_batch(per, 16, w) for w in (1, 2, 4)] == [16, 16, 16]  # the global pool shrinks with the world
    glob = ScalingConfig(num_workers=[1, 4], elastic_batch="global")
    assert [worker_batch(glob, 16, w) * w for w in (1, 2, 3, 4)] == [64, 64, 63, 64]  # within W-1 of batch * MAX
    capped = ScalingConfig(num_workers=[1, 4], elastic_batch="global", max_batch_per_worker=32)
    assert [worker_batch(capped, 16, w) for w in (1, 2, 4)] == [32, 32, 16]  # the memory cap wins
    fixed = ScalingConfig(num_workers=2, elastic_batch="global")
    assert worker_batch(fixed, 16, 2) == 16


def _simulate(clock: SampleClock, worlds: list[int], batch: int) -> tuple[int, list[int]]:
    """Run the clock over epochs with the world changing at each epoch's middle; returns (samples, steps/epoch)."""
    samples, steps = 0, []
    for epoch in range(clock.epochs):
        n, w = 0, worlds[epoch % len(worlds)]
        while not clock.epoch_done(epoch, samples):
            samples += batch * w
            n += 1
            if n == 2:
                w = worlds[(epoch + 1) % len(worlds)]
        steps.append(n)
    return samples, steps


def test_the_sample_clock_ends_a_resized_run_within_one_global_batch() -> None:
    clock = SampleClock(reference_batch=32, epoch_samples=32 * 5, epochs=4)  # batch 16 x MAX 2, 5 steps/epoch
    fixed, steps = _simulate(clock, [2], 16)
    assert fixed == clock.total_samples == 640 and steps == [5, 5, 5, 5]  # a fixed size: exactly step counts
    resized, _ = _simulate(clock, [2, 1], 16)
    assert clock.total_samples <= resized < clock.total_samples + 32
    assert clock.lr_iteration(64) == 1.0 and clock.lr_iteration(48) == 0.5  # reference steps, minus one
    due = [s for s in range(0, 160, 16) if clock.checkpoint_due(2, 0, s, s + 16)]  # every 2 reference steps
    assert due == [48, 112]  # at 64 and 128 samples; never at the epoch's end (160)
    assert clock.stream_steps(16) == 10 and clock.stream_steps(32) == 5


def _run(world: int, load_from: Path | None, out: Path, steps: int, first_step: int, more_steps: int = 0,
         more_out: Path | None = None) -> None:
    spawn_and_join(elastic_zero_script.phase, (world, free_port(), str(load_from or ""), str(out), steps, first_step,
                                               more_steps, str(more_out or "")), nprocs=world, timeout=240)


def _merged(folder: Path, key: str) -> torch.Tensor:
    """One Adam state of a saved run as the whole flat vector: its ranks' (unpadded) partitions in rank order."""
    files = sorted(folder.glob("optim-rank*.pt"), key=lambda p: int(p.stem[len("optim-rank"):]))
    states = [load_state_file(p) for p in files]
    return torch.cat([s["base_optimizer_state"][0][key] for s in states])


@pytest.mark.slow
def test_zero_optimizer_state_reshards_2_to_1_to_2_with_the_moments_of_a_fixed_run(tmp_path: Path) -> None:
    # 2 ranks, 3 steps, saved to a/; going on at 2 ranks, 2 more steps, saved to ref/: the fixed-size run
    _run(2, None, tmp_path / "a", steps=3, first_step=0, more_steps=2, more_out=tmp_path / "ref")
    _run(1, tmp_path / "a", tmp_path / "one", steps=1, first_step=3)  # 2 -> 1 ranks, a step
    _run(2, tmp_path / "one", tmp_path / "back", steps=1, first_step=4)  # 1 -> 2 ranks, a step
    params = sum(p.numel() for p in elastic_zero_script.model().parameters())
    for key in ("exp_avg", "exp_avg_sq"):
        a, ref = _merged(tmp_path / "a", key), _merged(tmp_path / "ref", key)
        one, back = _merged(tmp_path / "one", key), _merged(tmp_path / "back", key)
        assert a.numel() == one.numel() == back.numel() == params and a.abs().sum() > 0  # padding stripped
        assert not torch.allclose(ref, a, atol=1e-6)  # the steps moved them
        # trained across 2 -> 1 -> 2 ranks on the same global batches: the fixed-size run's moments
        assert torch.allclose(back, ref, atol=1e-6, rtol=1e-5), (key, (back - ref).abs().max())
    assert len(list((tmp_path / "one").glob("optim-rank*.pt"))) == 1
    assert len(list((tmp_path / "back").glob("optim-rank*.pt"))) == 2
    assert int(load_state_file(tmp_path / "back" / "optim-rank1.pt")["base_optimizer_state"][0]["step"]) == 5
    weights = [torch.load(tmp_path / f / "model.pt", weights_only=True) for f in ("ref", "back")]
    for k in weights[0]:  # and its weights (the fp32 master partitions resharded too)
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-6), k
