"""Tests of otmel.ot: batched log-domain Sinkhorn (POT as the oracle), plan_to_assignment, cosine_cost."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otmel.ot import SinkhornNotConvergedWarning, sinkhorn
from otmel.ot_costs import cosine_cost, pairwise_dot, plan_to_assignment
from otmel.ot_factored import cosine_ot_assignment, factored_ok

METHODS = ("log", "kernel", "auto")


def pot_plan(cost: torch.Tensor, reg: float, num_iter: int = 20000, stop: float = 1e-13) -> torch.Tensor:
    """POT's log-domain Sinkhorn on one (n, m) float64 problem with uniform marginals."""
    c = cost.detach().double().numpy()
    n, m = c.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = ot.sinkhorn(a, b, c, reg, method="sinkhorn_log", numItermax=num_iter, stopThr=stop)
    return torch.from_numpy(p)


# ---------------------------------------------------------------- agreement with POT


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reg", [0.05, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (40, 50), (17, 5)])
def test_matches_pot_at_convergence(method: str, reg: float, shape: tuple[int, int]) -> None:
    cost = torch.rand(3, *shape, dtype=torch.float64)
    plan, info = sinkhorn(cost, reg=reg, n_iters=5000, stop_thr=1e-12, method=method, return_info=True)
    assert info["converged"] and info["n_iters"] < 5000
    for k in range(3):
        torch.testing.assert_close(plan[k], pot_plan(cost[k], reg), atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_iters", [1, 3, 7])
def test_matches_pot_at_fixed_iteration_count(method: str, n_iters: int) -> None:
    """Same update order as POT's sinkhorn_log (column first, from zero potentials)."""
    cost = torch.rand(4, 6, 9, dtype=torch.float64)
    plan = sinkhorn(cost, reg=0.05, n_iters=n_iters, method=method)
    for k in range(4):
        ref = pot_plan(cost[k], 0.05, num_iter=n_iters, stop=0.0)
        torch.testing.assert_close(plan[k], ref, atol=1e-14, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_masked_valid_block_matches_pot_on_sliced_problem(method: str) -> None:
    cost = torch.rand(3, 8, 11, dtype=torch.float64) * 3.0 - 1.0  # not in [0, 1]: any real cost
    nx, ny = [8, 5, 2], [11, 4, 9]
    mask_x = torch.arange(8) < torch.tensor(nx)[:, None]
    mask_y = torch.arange(11) < torch.tensor(ny)[:, None]
    plan = sinkhorn(cost, mask_x, mask_y, reg=0.5, n_iters=5000, stop_thr=1e-12, method=method)
    for k in range(3):
        ref = pot_plan(cost[k, : nx[k], : ny[k]], 0.5)
        torch.testing.assert_close(plan[k, : nx[k], : ny[k]], ref, atol=1e-9, rtol=1e-6)
        assert torch.count_nonzero(plan[k, nx[k] :]) == 0
        assert torch.count_nonzero(plan[k, :, ny[k] :]) == 0


def test_scattered_masks_match_pot_on_gathered_problem() -> None:
    cost = torch.rand(2, 9, 10, dtype=torch.float64)
    mask_x = torch.rand(2, 9) < 0.6
    mask_y = torch.rand(2, 10) < 0.6
    mask_x[:, 0] = mask_y[:, 0] = True
    for method in ("log", "kernel"):
        plan = sinkhorn(cost, mask_x, mask_y, reg=0.3, n_iters=4000, stop_thr=1e-12, method=method)
        for k in range(2):
            sub = cost[k][mask_x[k]][:, mask_y[k]]
            got = plan[k][mask_x[k]][:, mask_y[k]]
            torch.testing.assert_close(got, pot_plan(sub, 0.3), atol=1e-9, rtol=1e-6)
            assert plan[k][~mask_x[k]].abs().sum() == 0
            assert plan[k][:, ~mask_y[k]].abs().sum() == 0


# ---------------------------------------------------------------- marginals, masks, shapes


@pytest.mark.parametrize("method", METHODS)
def test_marginals_at_convergence(method: str) -> None:
    cost = torch.rand(5, 12, 7, dtype=torch.float64)
    mask_x = torch.arange(12) < torch.tensor([12, 9, 1, 4, 12])[:, None]
    mask_y = torch.arange(7) < torch.tensor([7, 7, 3, 1, 2])[:, None]
    plan = sinkhorn(cost, mask_x, mask_y, reg=0.2, n_iters=3000, stop_thr=1e-13, method=method)
    n_valid = mask_x.sum(-1, keepdim=True).double()
    m_valid = mask_y.sum(-1, keepdim=True).double()
    torch.testing.assert_close(plan.sum(-1), mask_x / n_valid, atol=1e-12, rtol=0)
    torch.testing.assert_close(plan.sum(-2), mask_y / m_valid, atol=1e-12, rtol=0)
    torch.testing.assert_close(plan.sum((-2, -1)), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("method", METHODS)
def test_rows_exact_after_every_iteration(method: str) -> None:
    cost = torch.rand(4, 10, 13)
    plan = sinkhorn(cost, reg=0.05, n_iters=1, method=method)
    torch.testing.assert_close(plan.sum(-1), torch.full((4, 10), 0.1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padding_gets_exactly_zero_mass_and_empty_problems_zero_plans(method: str, dtype: torch.dtype) -> None:
    cost = torch.rand(5, 6, 8, dtype=dtype)
    mask_x = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]],
        dtype=torch.bool,
    )
    mask_y = torch.ones(5, 8, dtype=torch.bool)
    mask_y[0, 5:] = False
    mask_y[2] = False  # no valid column
    mask_y[3, ::2] = False
    plan = sinkhorn(cost, mask_x, mask_y, reg=0.05, n_iters=3, method=method)
    assert torch.isfinite(plan).all()
    pad = ~(mask_x[:, :, None] & mask_y[:, None, :])
    assert (plan[pad] == 0).all()  # exactly 0, not tiny
    assert (plan[1] == 0).all() and (plan[2] == 0).all()
    totals = plan.sum((-2, -1))
    torch.testing.assert_close(totals[[0, 3, 4]], torch.ones(3, dtype=dtype), atol=1e-5, rtol=0)
    assert (plan[~pad] > 0).all()


def test_fully_masked_batch_and_tiny_reg_are_finite() -> None:
    cost = torch.rand(2, 3, 4)
    zeros_x = torch.zeros(2, 3, dtype=torch.bool)
    for reg in (1e-3, 0.05, 10.0):
        for method in METHODS:
            plan = sinkhorn(cost, zeros_x, None, reg=reg, method=method)
            assert (plan == 0).all()
    plan = sinkhorn(cost * 100, reg=1e-3, n_iters=20)
    assert torch.isfinite(plan).all() and (plan >= 0).all()


def test_broadcast_leading_dims_match_per_problem_calls() -> None:
    cost = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    mask_x = torch.rand(3, 5) < 0.7  # depends on the 2nd leading dim only
    mask_y = torch.rand(2, 1, 6) < 0.7  # depends on the 1st only
    plan = sinkhorn(cost, mask_x, mask_y, reg=0.1, n_iters=4)
    assert plan.shape == (2, 3, 5, 6)
    for i in range(2):
        for j in range(3):
            ref = sinkhorn(cost[i, j], mask_x[j], mask_y[i, 0], reg=0.1, n_iters=4)
            torch.testing.assert_close(plan[i, j], ref, atol=1e-14, rtol=0)
    # masks with more leading dims than the cost broadcast the cost
    plan2 = sinkhorn(cost[0, 0], torch.ones(4, 5, dtype=torch.bool), reg=0.1)
    assert plan2.shape == (4, 5, 6)
    torch.testing.assert_close(plan2[3], sinkhorn(cost[0, 0], reg=0.1))


def test_log_and_kernel_paths_agree_and_auto_picks_a_safe_path() -> None:
    cost = torch.rand(8, 40, 50)
    mask_x = torch.rand(8, 40) < 0.8
    mask_y = torch.rand(8, 50) < 0.8
    for reg in (0.05, 0.2, 1.0, 10.0):
        p_log = sinkhorn(cost, mask_x, mask_y, reg=reg, method="log")
        p_ker, info = sinkhorn(cost, mask_x, mask_y, reg=reg, method="auto", return_info=True)
        assert info["method"] == "kernel"
        torch.testing.assert_close(p_ker, p_log, atol=1e-6, rtol=1e-4)
    # (max C - min C) / reg = 1000: the kernel would underflow, auto must take the log path
    plan, info = sinkhorn(cost, mask_x, mask_y, reg=1e-3, n_iters=10, return_info=True)
    assert info["method"] == "log"
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum((-2, -1)), torch.ones(8), atol=1e-5, rtol=0)


def test_low_precision_inputs_are_computed_in_float32() -> None:
    cost = torch.rand(2, 5, 6)
    plan = sinkhorn(cost.to(torch.bfloat16), reg=0.05)
    assert plan.dtype == torch.bfloat16
    ref = sinkhorn(cost.to(torch.bfloat16).float(), reg=0.05)
    assert torch.equal(plan, ref.to(torch.bfloat16))  # computed in float32, rounded once at the end


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_leaves_the_solver_in_float32(method: str) -> None:
    """Under `torch.autocast("cpu", bfloat16)` (train.precision=bf16 on CPU) the kernel path's mat-vecs would run
    in bfloat16 (~2e-3 relative error in the plans, rows no longer exact): the solver switches autocast off, so a
    float32 cost gives the float32 plans bit for bit, and a bf16 cost of the cosine pipeline stays finite."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 12, 16, generator=g), torch.randn(4, 9, 16, generator=g)
    mx, my = torch.rand(4, 12, generator=g) > 0.3, torch.rand(4, 9, generator=g) > 0.3
    cost = cosine_cost(x, y)
    ref = sinkhorn(cost, mx, my, reg=0.05, method=method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sinkhorn(cost, mx, my, reg=0.05, method=method)
        low_cost = cosine_cost(x, y)  # bf16 under autocast
        low = sinkhorn(low_cost, mx, my, reg=0.05, method=method)
    assert torch.equal(got, ref)
    assert low_cost.dtype == low.dtype == torch.bfloat16 and bool(torch.isfinite(low).all())
    torch.testing.assert_close(low.float(), ref, atol=2e-3, rtol=0)


def test_invalid_arguments_raise() -> None:
    cost = torch.rand(3, 4)
    with pytest.raises(ValueError):
        sinkhorn(cost, reg=0.0)
    with pytest.raises(ValueError):
        sinkhorn(cost, n_iters=0)
    with pytest.raises(ValueError):
        sinkhorn(cost, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        sinkhorn(cost, method="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sinkhorn(torch.ones(3, 4, dtype=torch.long))


# ---------------------------------------------------------------- properties


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    b = draw(st.integers(1, 2))
    n = draw(st.integers(1, 512))
    m = draw(st.integers(1, 512 if n <= 128 else 128))  # keep n * m moderate for speed
    seed = draw(st.integers(0, 2**31 - 1))
    reg = math.exp(draw(st.floats(math.log(1e-3), math.log(10.0))))
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(b, n, m, generator=g)
    kind = draw(st.sampled_from(["none", "random", "prefix", "empty"]))
    if kind == "none":
        mask_x, mask_y = torch.ones(b, n, dtype=torch.bool), torch.ones(b, m, dtype=torch.bool)
    elif kind == "random":
        mask_x, mask_y = torch.rand(b, n, generator=g) < 0.7, torch.rand(b, m, generator=g) < 0.7
    elif kind == "prefix":
        mask_x = torch.arange(n) < torch.randint(0, n + 1, (b, 1), generator=g)
        mask_y = torch.arange(m) < torch.randint(0, m + 1, (b, 1), generator=g)
    else:
        mask_x, mask_y = torch.zeros(b, n, dtype=torch.bool), torch.rand(b, m, generator=g) < 0.5
    return cost, mask_x, mask_y, reg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["auto", "log"]))
def test_property_plans_are_valid(problem: tuple, method: str) -> None:
    cost, mask_x, mask_y, reg = problem
    plan = sinkhorn(cost, mask_x, mask_y, reg=reg, n_iters=20, method=method)
    assert torch.isfinite(plan).all()
    assert (plan >= 0).all()
    pad = ~(mask_x[:, :, None] & mask_y[:, None, :])
    assert (plan[pad] == 0).all()
    nonempty = mask_x.any(-1) & mask_y.any(-1)
    total = plan.sum((-2, -1))
    # the last half-iteration is a row projection: total mass 1 (float32 accumulation, n*m <= 65536)
    assert torch.allclose(total[nonempty], torch.ones_like(total[nonempty]), atol=1e-4, rtol=0)
    assert (total[~nonempty] == 0).all()
    n_valid = mask_x.sum(-1, keepdim=True).clamp_min(1)
    rows = torch.where(nonempty[:, None] & mask_x, 1.0 / n_valid, 0.0)
    assert torch.allclose(plan.sum(-1), rows, atol=1e-5, rtol=1e-3)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 64),
    st.integers(1, 64),
    st.floats(0.5, 10.0),
    st.integers(0, 2**31 - 1),
)
def test_property_column_marginals_converge_for_moderate_reg(n: int, m: int, reg: float, seed: int) -> None:
    """For reg >= 0.5 and costs in [0, 1] the contraction factor is <= tanh(1)^2 ~ 0.58: 60 iterations."""
    cost = torch.rand(2, n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    plan = sinkhorn(cost, reg=reg, n_iters=60)
    torch.testing.assert_close(plan.sum(-2), torch.full((2, m), 1.0 / m, dtype=torch.float64), atol=1e-9, rtol=0)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("method", ["log", "kernel"])
def test_gradcheck_unmasked(method: str) -> None:
    cost = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, reg=0.3, n_iters=4, method=method), (cost,))


@pytest.mark.parametrize("method", ["log", "kernel"])
def test_gradcheck_masked(method: str) -> None:
    cost = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask_x = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    mask_y = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, mask_x, mask_y, reg=0.3, n_iters=3, method=method), (cost,))


def test_gradcheck_with_stop_thr_and_assignment() -> None:
    cost = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    mask_x = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)

    def fn(c: torch.Tensor) -> torch.Tensor:
        plan = sinkhorn(c, mask_x, reg=0.5, n_iters=12, stop_thr=1e-30, warn=False, method="log")
        return plan_to_assignment(plan, mask_x)

    assert torch.autograd.gradcheck(fn, (cost,))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_are_finite_and_zero_on_padding(method: str) -> None:
    cost = torch.rand(3, 6, 7, requires_grad=True)
    mask_x = torch.ones(3, 6, dtype=torch.bool)
    mask_x[0, 4:] = False
    mask_x[1] = False
    mask_y = torch.ones(3, 7, dtype=torch.bool)
    mask_y[2, 3:] = False
    plan = sinkhorn(cost, mask_x, mask_y, reg=0.05, n_iters=3, method=method)
    (plan * torch.rand_like(plan)).sum().backward()
    grad = cost.grad
    assert grad is not None and torch.isfinite(grad).all()
    pad = ~(mask_x[:, :, None] & mask_y[:, None, :])
    assert (grad[pad] == 0).all()
    assert grad[~pad].abs().sum() > 0


# ---------------------------------------------------------------- stopping


@pytest.mark.parametrize("method", ["log", "kernel"])
def test_stop_thr_converges_early(method: str) -> None:
    cost = torch.rand(4, 20, 30, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan, info = sinkhorn(cost, reg=0.5, n_iters=1000, stop_thr=1e-10, method=method, return_info=True)
    assert info["converged"] is True
    assert 0 < info["n_iters"] < 1000 and info["n_iters"] % 10 == 0
    assert info["err"] <= 1e-10
    col_err = (plan.sum(-2) - 1 / 30).norm(dim=-1).max().item()
    assert col_err <= 1e-10
    assert info["method"] == method


@pytest.mark.parametrize("method", ["log", "kernel"])
def test_stop_thr_warns_when_not_converged(method: str) -> None:
    cost = torch.rand(2, 20, 30)
    with pytest.warns(SinkhornNotConvergedWarning):
        _, info = sinkhorn(cost, reg=0.01, n_iters=3, stop_thr=1e-9, method=method, return_info=True)
    assert info["converged"] is False and info["n_iters"] == 3 and info["err"] > 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(cost, reg=0.01, n_iters=3, stop_thr=1e-9, warn=False, method=method)
        _, info = sinkhorn(cost, reg=0.01, n_iters=3, method=method, return_info=True)  # fixed budget
    assert info["n_iters"] == 3 and info["converged"] is None and info["err"] > 0
    assert issubclass(SinkhornNotConvergedWarning, UserWarning)


# ---------------------------------------------------------------- plan_to_assignment, cosine_cost


def test_plan_to_assignment_rows_sum_to_one_and_masked_rows_zero() -> None:
    cost = torch.rand(3, 5, 4)
    mask_x = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    mask_y = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assign = plan_to_assignment(sinkhorn(cost, mask_x, mask_y, reg=0.05), mask_x)
    rows = assign.sum(-1)
    torch.testing.assert_close(rows[mask_x], torch.ones(int(mask_x.sum())), atol=1e-5, rtol=0)
    assert (rows[~mask_x] == 0).all() and torch.isfinite(assign).all()
    assert (assign[1][:, ~mask_y[1]] == 0).all()
    full = plan_to_assignment(sinkhorn(cost, reg=0.05))
    torch.testing.assert_close(full.sum(-1), torch.ones(3, 5), atol=1e-5, rtol=0)


def test_cosine_cost_range_and_known_values() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    y = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    c = cosine_cost(x, y)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[0.0, 1.0, (1 - s) / 2], [0.5, 0.5, (1 - s) / 2], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(c, expected, atol=1e-6, rtol=0)
    big = cosine_cost(torch.randn(4, 7, 16), torch.randn(4, 9, 16))
    assert big.shape == (4, 7, 9) and (big >= 0).all() and (big <= 1).all()
    same = torch.randn(5, 8)
    assert torch.allclose(torch.diagonal(cosine_cost(same, same)), torch.zeros(5), atol=1e-6)


def test_cosine_cost_gradient_finite_at_zero_vectors() -> None:
    x = torch.zeros(3, 4, requires_grad=True)
    y = torch.randn(2, 4, requires_grad=True)
    cosine_cost(x, y).sum().backward()
    assert x.grad is not None and y.grad is not None
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


# -- the factored inference path (otmel.ot_factored) ------------------------------------------------------------


@pytest.mark.parametrize("reg", [0.04, 0.1, 1.0])
@pytest.mark.parametrize("n_iters", [1, 3, 12])
def test_factored_cosine_assignment_equals_the_dense_path(reg: float, n_iters: int) -> None:
    """Broadcast pairs (1, Be, n, d) x (Bm, 1, m, d), scattered masks, one mention with no valid key."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 4, 5, 8, generator=g), torch.randn(3, 1, 6, 8, generator=g)
    mx, my = torch.rand(1, 4, 5, generator=g) > 0.3, torch.rand(3, 1, 6, generator=g) > 0.3
    my[0] = False  # a mention without an image: every pair of it is an empty problem
    dense = plan_to_assignment(sinkhorn(cosine_cost(x, y), mx, my, reg=reg, n_iters=n_iters, method="log"), mx)
    fac = cosine_ot_assignment(x, y, mx, my, reg=reg, n_iters=n_iters)
    A = fac.dense()
    assert A.shape == dense.shape == (3, 4, 5, 6)
    assert torch.allclose(A, dense, atol=2e-6, rtol=1e-5)
    assert torch.equal(A[0], torch.zeros_like(A[0]))  # empty problems: exactly 0, never NaN
    pad = ~(mx.unsqueeze(-1) & my.unsqueeze(-2))
    assert torch.equal(A[pad], torch.zeros_like(A[pad]))
    # products with the factored form equal products with the matrix
    h, w = torch.randn(3, 1, 6, 7, generator=g), torch.rand(3, 4, 2, 5, generator=g)
    assert torch.allclose(fac.matmul(h), A @ h, atol=1e-5)
    assert torch.allclose(fac.rmatmul(w), w @ A, atol=1e-5)


def test_factored_path_unmasked_and_its_range_check() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 5, 4, generator=g), torch.randn(2, 7, 4, generator=g)
    dense = plan_to_assignment(sinkhorn(cosine_cost(x, y), reg=0.05, n_iters=3))
    assert torch.allclose(cosine_ot_assignment(x, y, None, None, reg=0.05, n_iters=3).dense(), dense, atol=2e-6)
    assert factored_ok(1 / 30) and not factored_ok(0.03) and factored_ok(0.005, torch.float64)
    with pytest.raises(ValueError, match="safe range"):
        cosine_ot_assignment(x, y, None, None, reg=0.01, n_iters=3)
    with pytest.raises(ValueError, match="n_iters"):
        cosine_ot_assignment(x, y, None, None, reg=0.1, n_iters=0)


def test_pairwise_dot_broadcasts_like_matmul_and_is_contiguous() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 3, 5, 4, generator=g), torch.randn(2, 1, 6, 4, generator=g)
    out = pairwise_dot(x, y)
    assert out.shape == (2, 3, 5, 6) and out.is_contiguous()
    assert torch.allclose(out, x @ y.transpose(-1, -2), atol=1e-6)
