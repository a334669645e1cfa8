"""The global negative pool (`otmel.train.worker.distributed`): gathers, and data parallelism == one big batch.

The distributed tests run ONE real 2-process gloo group (module fixture `dp_run`, spawned processes) that
computes everything the tests below check, so the process start-up (~5 s) is paid once.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from otmel.loss import OTMELLoss, exclusion_mask
from otmel.model import OTMEL, EntityFeatures
from otmel.model.features import MentionFeatures
from otmel.model.testing import random_batch, tiny_cfg
from otmel.train.worker.distributed import (
    all_gather_tensor_uneven,
    all_gather_uneven,
    entity_pool_for,
    gather_features,
    make_entity_pool,
)
from tests.gloo_helpers import spawn_and_join

B, W = 4, 2  # per-worker batch, workers
DUP = (1, 7)  # mention 1 (rank 0) and mention 7 (rank 1) share a gold entity
UNEVEN = (3, 5)  # rows per rank in the uneven-gather test
RTOL = 1e-9


# ---------------------------------------------------------------------------------- fake collective


def _entities(n: int, seed: int, d: int = 3) -> EntityFeatures:
    g = torch.Generator().manual_seed(seed)
    return EntityFeatures(t=torch.randn(n, d, generator=g), ids=torch.randint(0, 100, (n,), generator=g),
                          has_image=torch.rand(n, generator=g) > 0.5, mask_t=torch.rand(n, 2, generator=g) > 0.3,
                          q_t=torch.randn(n, 2, d, generator=g))


@pytest.mark.parametrize("with_grad", [True, False])
def test_gather_features_with_a_fake_collective(with_grad: bool) -> None:
    rank, world = 1, 3
    ranks = [_entities(2, seed=r) for r in range(world)]
    local = ranks[rank].map(lambda t: t.clone().requires_grad_() if t.is_floating_point() else t)
    field_of = {t.data_ptr(): k for k, t in local.tensors().items()}
    calls: list[tuple[str, bool]] = []

    def fake(t: torch.Tensor, grad: bool) -> list[torch.Tensor]:  # precomputed tensors of the other ranks
        name = field_of[t.data_ptr()]
        calls.append((name, grad))
        return [t if r == rank else getattr(ranks[r], name) for r in range(world)]

    pool, offset = gather_features(local, rank, world, gather_with_grad=with_grad, all_gather=fake)
    assert offset == rank * 2 and len(pool) == 6
    for name, t in pool.tensors().items():  # rank order, every field
        torch.testing.assert_close(t.detach(), torch.cat([getattr(r, name) for r in ranks]))
    assert pool.v is None and pool.g is None  # absent fields stay absent
    assert dict(calls) == {"t": with_grad, "q_t": with_grad, "ids": False, "has_image": False, "mask_t": False}
    w = torch.randn(6, 3)
    (pool.t * w).sum().backward()
    torch.testing.assert_close(local.t.grad, w[2:4])  # the local slice keeps its gradient


def test_world_size_one_and_pool_selection() -> None:
    e = _entities(2, seed=0)

    def boom(t: torch.Tensor, grad: bool) -> list[torch.Tensor]:
        raise AssertionError("no collective for world_size 1")

    pool, offset = gather_features(e, 0, 1, all_gather=boom)
    assert pool is e and offset == 0
    assert all_gather_uneven(e, 1) is e and all_gather_tensor_uneven(e.t) is e.t
    assert entity_pool_for("local", 0, 2) is None
    assert entity_pool_for("global", 1, 2, gather_with_grad=False).keywords == {  # type: ignore[union-attr]
        "rank": 1, "world_size": 2, "gather_with_grad": False}
    with pytest.raises(ValueError):
        entity_pool_for("all", 0, 2)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- real gloo group


def _batch() -> dict[str, torch.Tensor]:
    """2B samples in float64; a missing image on each rank; the duplicate gold entity DUP across ranks."""
    b = random_batch(W * B, seed=3, missing=(2, 5))
    i, j = DUP
    for k in [k for k in b if k.startswith("e_")]:
        b[k][j] = b[k][i]  # the same entity (inputs and KG row) is the gold of mention i and mention j
    return {k: v.double() if v.is_floating_point() else v for k, v in b.items()}


def _model() -> OTMEL:
    torch.manual_seed(0)
    return OTMEL(tiny_cfg("OT")).double().train()  # no dropout; train() = the training path


def _flat_grads(model: OTMEL) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


def _uneven_bundles(rank: int) -> tuple[EntityFeatures, MentionFeatures]:
    n, g = UNEVEN[rank], torch.Generator().manual_seed(10 + rank)
    e = _entities(n, seed=20 + rank)
    m = MentionFeatures(t=torch.randn(n, 4, generator=g), has_image=torch.rand(n, generator=g) > 0.5,
                        mask_v=torch.rand(n, 3, generator=g) > 0.5, k_v=torch.randn(n, 3, 2, generator=g))
    return e, m


def _worker(rank: int, tmp: str) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=W)
    try:
        model = _model()
        model.load_state_dict(torch.load(f"{tmp}/init.pt", weights_only=True))
        local = {k: v[rank * B:(rank + 1) * B] for k, v in _batch().items()}
        res: dict[str, object] = {}
        for name, with_grad in [("with_grad", True), ("without_grad", False)]:
            model.zero_grad(set_to_none=True)
            out = model(local, entity_pool=make_entity_pool(rank, W, gather_with_grad=with_grad))
            loss = OTMELLoss()(**out)["loss"]
            loss.backward()
            vec = torch.cat([loss.detach().reshape(1), _flat_grads(model)])
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)  # DDP semantics: the mean over workers
            res[name] = vec / W
        e, m = _uneven_bundles(rank)
        res["uneven_e"] = all_gather_uneven(e, W).tensors()
        res["uneven_m"] = all_gather_uneven(m, W).tensors()
        res["uneven_t"] = all_gather_tensor_uneven(e.has_image)  # world size from the process group
        torch.save(res, f"{tmp}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference(model: OTMEL) -> tuple[torch.Tensor, torch.Tensor]:
    """One worker, the whole global batch of 2B samples: [loss, flattened grads], and the exclusion mask."""
    model.zero_grad(set_to_none=True)
    out = model(_batch())
    loss = OTMELLoss()(**out)["loss"]
    loss.backward()
    return torch.cat([loss.detach().reshape(1), _flat_grads(model)]), exclusion_mask(
        out["m_gold"], out["e_ids"], out["targets"])


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the 2-process group once; returns its per-rank results and the 1-worker reference."""
    tmp = tmp_path_factory.mktemp("gloo")
    model = _model()
    torch.save(model.state_dict(), tmp / "init.pt")  # both ranks start from exactly these weights
    spawn_and_join(_worker, (str(tmp),), W, timeout=120)
    ref, excl = _reference(model)
    sizes = [p.numel() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    results = [torch.load(tmp / f"out{r}.pt", weights_only=True) for r in range(W)]
    return {"ref": ref, "excl": excl, "sizes": sizes, "names": names, "results": results}


def test_two_workers_with_global_pool_equal_one_worker_with_the_global_batch(dp_run: dict) -> None:
    """2 workers x B with the global pool give the same loss and gradients as 1 worker x 2B.

    Tolerance, float64: loss within 1e-9 relative; every gradient entry within 1e-9 x the largest
    gradient entry of the model (norm-relative: some gradients are structurally zero, e.g. attention key
    biases, and are ~1e-17 rounding noise, so an element-wise relative test would compare noise). The two
    runs are the same mathematics summed in different orders (per-rank log-sum-exps, the all-reduce mean,
    the reduce-scatter of the gather's backward): they agree to ~1e-15 (a few ulps); 1e-9 leaves room for
    reassociation, while a missing or doubled gradient term (next test: ~50% of the gradient) fails by
    eight orders of magnitude."""
    ref, results = dp_run["ref"], dp_run["results"]
    assert dp_run["excl"][DUP[0], DUP[1]] and dp_run["excl"][DUP[1], DUP[0]]  # the duplicate spans both ranks
    dp = results[0]["with_grad"]
    torch.testing.assert_close(results[1]["with_grad"], dp, rtol=0, atol=0)  # all-reduced: same everywhere
    torch.testing.assert_close(dp[0], ref[0], rtol=RTOL, atol=0)
    atol = RTOL * float(ref[1:].abs().max())
    for name, g, r in zip(dp_run["names"], dp[1:].split(dp_run["sizes"]), ref[1:].split(dp_run["sizes"]),
                          strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    print(f"max |dp - ref| / max |ref| = {((dp[1:] - ref[1:]).abs().max() / ref[1:].abs().max()).item():.1e}")


def test_without_gather_grad_the_loss_is_equal_but_the_gradients_differ(dp_run: dict) -> None:
    """`gather_with_grad=False` drops the other ranks' dL_r/de_s: same loss, different gradients (what the
    equivalence test catches if the gather's backward is missing)."""
    ref, dp = dp_run["ref"], dp_run["results"][0]["without_grad"]
    torch.testing.assert_close(dp[0], ref[0], rtol=RTOL, atol=0)
    rel = ((dp[1:] - ref[1:]).norm() / ref[1:].norm()).item()
    print(f"without gather grad: |dp - ref| / |ref| = {rel:.2e}")
    assert rel > 1e-2


def test_all_gather_uneven(dp_run: dict) -> None:
    results = dp_run["results"]
    parts = [_uneven_bundles(r) for r in range(W)]
    want_e, want_m = EntityFeatures.cat([p[0] for p in parts]), MentionFeatures.cat([p[1] for p in parts])
    for res in results:  # every rank gets the whole, in rank order, dtypes kept
        for got, want in [(res["uneven_e"], want_e.tensors()), (res["uneven_m"], want_m.tensors())]:
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype, k
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
        assert len(res["uneven_e"]["t"]) == sum(UNEVEN)
        torch.testing.assert_close(res["uneven_t"], want_e.has_image, rtol=0, atol=0)

