"""Batched entropic optimal transport: Sinkhorn (log and kernel paths). The cosine cost, the plan → assignment
map and the pairwise product live in `otmel.ot_costs`.

Everything here is plain PyTorch (no POT at run time; POT is the test oracle only), batched over any
leading dimensions and differentiable through the unrolled iterations.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Literal, overload

import torch
from torch import Tensor

__all__ = ["KERNEL_MAX_RANGE", "Marginals", "SinkhornNotConvergedWarning", "reg_number", "sinkhorn"]

Method = Literal["auto", "log", "kernel"]

# Additive log-weight of a padded row/column in the log path. Finite (not -inf) so that a fully padded
# row/column never makes logsumexp see only -inf (NaN forward and backward); 1e30 dwarfs any
# |C| / reg, so exp() of every padded entry underflows to exactly 0.
_NEG = -1e30
# Check the marginal error every this many iterations when ``stop_thr`` is set (POT checks every 10).
_CHECK_EVERY = 10
# The kernel path is taken only when max(C) - min(C) <= reg * KERNEL_MAX_RANGE[dtype] in every plan,
# and its result is kept only when every scaling stays within exp(+-_KERNEL_MAX_LOG[dtype]).
KERNEL_MAX_RANGE = {torch.float32: 30.0, torch.float64: 300.0}
_KERNEL_MAX_LOG = {torch.float32: 60.0, torch.float64: 600.0}


def reg_number(reg: float | Tensor) -> float:
    """A regulariser as a Python number (a tensor one is detached first: reading it never touches autograd)."""
    return float(reg.detach()) if isinstance(reg, Tensor) else float(reg)


class SinkhornNotConvergedWarning(UserWarning):
    """``sinkhorn`` hit ``n_iters`` before the marginal error fell below ``stop_thr``."""


@overload
def sinkhorn(
    cost: Tensor,
    mask_x: Tensor | None = None,
    mask_y: Tensor | None = None,
    *,
    reg: float | Tensor = 0.05,
    n_iters: int = 3,
    stop_thr: float | None = None,
    warn: bool = True,
    method: Method = "auto",
    return_info: Literal[False] = False,
) -> Tensor: ...


@overload
def sinkhorn(
    cost: Tensor,
    mask_x: Tensor | None = None,
    mask_y: Tensor | None = None,
    *,
    reg: float | Tensor = 0.05,
    n_iters: int = 3,
    stop_thr: float | None = None,
    warn: bool = True,
    method: Method = "auto",
    return_info: Literal[True],
) -> tuple[Tensor, dict[str, Any]]: ...


@overload
def sinkhorn(
    cost: Tensor,
    mask_x: Tensor | None = None,
    mask_y: Tensor | None = None,
    *,
    reg: float | Tensor = 0.05,
    n_iters: int = 3,
    stop_thr: float | None = None,
    warn: bool = True,
    method: Method = "auto",
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]: ...


def sinkhorn(
    cost: Tensor,
    mask_x: Tensor | None = None,
    mask_y: Tensor | None = None,
    *,
    reg: float | Tensor = 0.05,
    n_iters: int = 3,
    stop_thr: float | None = None,
    warn: bool = True,
    method: Method = "auto",
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    r"""Entropic optimal transport plans of a batch of problems (Sinkhorn-Knopp, log domain).

    Solves, independently for every batch element,

    .. math::
        \Pi^* = \mathop{\arg\min}_{\Pi \in \mathbb{R}_+^{n \times m}} \langle \Pi, C \rangle_F
                - \mathrm{reg} \cdot H(\Pi)
        \quad \text{s.t.} \quad \Pi \mathbf{1}_m = \mu, \quad \Pi^\top \mathbf{1}_n = \nu, \quad \Pi \ge 0

    where

    - :math:`C \in \mathbb{R}^{n \times m}` is the cost matrix (``cost[..., :, :]``),
    - :math:`\langle \Pi, C \rangle_F = \sum_{ij} \Pi_{ij} C_{ij}` is the transport cost,
    - :math:`H(\Pi) = -\sum_{ij} \Pi_{ij} (\log \Pi_{ij} - 1)` is the entropy of the plan,
    - :math:`\mathrm{reg} > 0` is the entropic regularisation, with POT's convention: the Gibbs kernel
      is :math:`K = \exp(-C / \mathrm{reg})` (so a small ``reg`` is close to exact OT),
    - :math:`\mu_i = 1 / n_{valid}` on valid rows and 0 on padded rows, :math:`\nu_j = 1 / m_{valid}`
      on valid columns and 0 on padded columns (uniform marginals over the unmasked elements).

    The solution is :math:`\Pi^*_{ij} = \exp((f_i + g_j - C_{ij}) / \mathrm{reg})` with dual potentials
    :math:`f, g` (here absorbed as :math:`\hat f = f / \mathrm{reg}, \hat g = g / \mathrm{reg}`),
    found by alternating exact marginal projections [1], starting from :math:`\hat f = \hat g = 0`,
    column update first (the same order as ``ot.sinkhorn(method="sinkhorn_log")``):

    .. math::
        \hat g_j \leftarrow \log \nu_j - \operatorname{logsumexp}_i (\hat f_i - C_{ij} / \mathrm{reg}),
        \qquad
        \hat f_i \leftarrow \log \mu_i - \operatorname{logsumexp}_j (\hat g_j - C_{ij} / \mathrm{reg}).

    One iteration is one column and one row update, so after any number of iterations the rows of
    the returned plan sum exactly to :math:`\mu` and the columns approximately to :math:`\nu`.

    **Log path** (``method="log"``). With :math:`L = \hat f_i + \hat g_j - C_{ij}/\mathrm{reg}` (the log
    plan) the two updates are exactly ``L = log_softmax(L, dim=-2) + log ν`` and
    ``L = log_softmax(L, dim=-1) + log μ``, so each half-iteration is one fused, max-stabilised
    log-softmax kernel over the batch instead of ~6 kernels for an explicit logsumexp of the
    potentials ([2, Sec. 4.4], [3]). The constant parts of ``log μ``, ``log ν`` cancel in the next
    softmax and are added once at the end. Stable for every ``reg`` (tested on [1e-3, 10]).

    **Kernel path** (``method="kernel"``). The same iterates in the scaling domain,
    :math:`v = \nu / (\tilde K^\top u)`, :math:`u = \mu / (\tilde K v)` with batched mat-vecs and a
    single ``exp``: :math:`\tilde K = \exp(-(C - \min C) / \mathrm{reg})` (the minimum per plan,
    detached: a constant shift of C does not change the plan). This is Schmitzer's stabilised scaling
    [3] with a single absorption; it is exact as long as no scaling under/overflows, which holds
    when :math:`(\max C - \min C)/\mathrm{reg}` is small.

    ``method="auto"`` (default) uses the kernel path when :math:`(\max C - \min C)/\mathrm{reg}` is at
    most 30 (float32) / 300 (float64) in every plan (over all entries, padded ones included) and
    all scalings stay within :math:`e^{\pm 60}` / :math:`e^{\pm 600}`, and otherwise runs (or
    re-runs) the log path; this costs one or two host synchronisations. ``"kernel"`` forces the
    kernel path without any check or host sync (the caller guarantees the range; cosine costs lie
    in [0, 1], so ``reg >= 0.05`` is safe in float32).

    Measured (``bench/sinkhorn.py``, ``docs/benchmarks.md``; 2-core CPU, 2 threads, (256, 40, 50)
    float32, reg 0.05, 3 iterations), in multiples of ``torch.softmax(-C / reg, -1)``: explicit
    logsumexp updates of f, g ~11.5x; log path ~4x (masked ~5.5-6x); ``"auto"`` (kernel path here)
    ~2.5-2.7x (masked ~2.9-3.1x); forward + backward ~3.5-4x softmax's. POT's per-plan loop is
    ~130x slower at 3 iterations. ``torch.aminmax`` over dims was ~30x slower than ``amin`` + ``amax``.

    **Masks.** ``mask_x`` (..., n) / ``mask_y`` (..., m), True = valid, broadcast against the leading
    dimensions of ``cost``. They never index: the log path adds a large finite negative log-weight
    (-1e30) to padded rows/columns, the kernel path gives them zero marginal weight (and zero initial
    scaling). Padded rows and columns get exactly 0 mass; a problem with no valid row or no valid
    column gets an all-zero plan (never NaN), and gradients w.r.t. padded costs are 0.

    Args:
        cost: (..., n, m) floating cost matrices (float16/bfloat16 are computed in float32, also inside an
            autocast block, which is switched off for the solver: its products stay in the cost's precision).
        mask_x: optional (..., n) bool (or 0/1), True for valid rows.
        mask_y: optional (..., m) bool (or 0/1), True for valid columns.
        reg: entropic regularisation, > 0 (POT's ``reg``: ``K = exp(-C / reg)``); a number, or a 0-dim tensor
            (a learned regulariser: the plan is then differentiable in ``reg`` too).
        n_iters: number of iterations (one column and one row update each), >= 1; the maximum when
            ``stop_thr`` is given. The method's default is a fixed budget of 3.
        stop_thr: optional tolerance on the column-marginal error
            :math:`\max_{\text{batch}} \lVert \Pi^\top \mathbf{1} - \nu \rVert_2`, checked every 10
            iterations and at the last one (rows are exact after every iteration). ``None``: run
            exactly ``n_iters`` iterations, never warn.
        warn: emit :class:`SinkhornNotConvergedWarning` when ``stop_thr`` is given and not reached.
        method: ``"auto"``, ``"log"`` or ``"kernel"`` (see above).
        return_info: also return a dict with ``n_iters`` (iterations run), ``err`` (final
            column-marginal error as above), ``converged`` (``err <= stop_thr``; ``None`` without
            ``stop_thr``) and ``method`` (the path that produced the plan).

    Returns:
        The plans, shape ``broadcast(leading dims) + (n, m)``, dtype of ``cost``; each non-empty plan
        has total mass 1. With ``return_info``, ``(plan, info)``.

    References:
        [1] M. Cuturi. Sinkhorn distances: lightspeed computation of optimal transport. NeurIPS 2013.
        [2] G. Peyré and M. Cuturi. Computational optimal transport. Foundations and Trends in
            Machine Learning 11(5-6), 2019.
        [3] B. Schmitzer. Stabilized sparse scaling algorithms for entropy regularized transport
            problems. SIAM Journal on Scientific Computing 41(3), 2019.
    """
    if cost.dim() < 2 or not cost.is_floating_point():
        raise ValueError(f"cost must be a floating tensor of shape (..., n, m), got {cost.dtype} {tuple(cost.shape)}")
    if not (math.isfinite(reg_number(reg)) and reg_number(reg) > 0):
        raise ValueError(f"reg must be a finite positive number, got {reg}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    if method not in ("auto", "log", "kernel"):
        raise ValueError(f"method must be 'auto', 'log' or 'kernel', got {method!r}")

    out_dtype = cost.dtype
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    n, m = cost.shape[-2:]
    batch = cost.shape[:-2]
    for name, mask, size in (("mask_x", mask_x, n), ("mask_y", mask_y, m)):
        if mask is not None:
            if mask.dim() < 1 or mask.shape[-1] != size:
                raise ValueError(f"{name} must have shape (..., {size}), got {tuple(mask.shape)}")
            # torch leaves broadcast_shapes unannotated
            batch = torch.broadcast_shapes(batch, mask.shape[:-1])  # type: ignore[no-untyped-call]
    if batch != cost.shape[:-2]:
        cost = cost.expand(*batch, n, m)
    marg = Marginals(mask_x, mask_y, n, m, cost)
    with _autocast_off(cost):
        plan, info = _solve(cost, marg, reg, n_iters, stop_thr, method)

    if stop_thr is None:
        if return_info:
            info["err"] = _marginal_error(plan.sum(-2, keepdim=True), marg.b)
        info["converged"] = None
    else:
        info["converged"] = info["err"] <= stop_thr
        if warn and not info["converged"]:
            warnings.warn(
                f"Sinkhorn did not converge: marginal error {info['err']:.3e} > stop_thr {stop_thr:.3e} "
                f"after {info['n_iters']} iterations. Increase n_iters or reg.",
                SinkhornNotConvergedWarning,
                stacklevel=2,
            )
    plan = plan.to(out_dtype)
    return (plan, info) if return_info else plan


def _autocast_off(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off on `t`'s device where it is on (under bf16 autocast the mat-vecs of the kernel path
    would run in bfloat16 whatever the cost's dtype); else nothing."""
    device = t.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def _solve(cost: Tensor, marg: Marginals, reg: float | Tensor, n_iters: int, stop_thr: float | None,
           method: Method) -> tuple[Tensor, dict[str, Any]]:
    """The plans of a checked (..., n, m) float32 / float64 cost, by `method` (see `sinkhorn`)."""
    plan: Tensor | None  # None only from a kernel run that left the safe range (redone below)
    info: dict[str, Any]
    if cost.numel() == 0:
        plan, info = cost.new_zeros(cost.shape), {"n_iters": 0, "err": 0.0, "converged": None}
        info["method"] = "log"
    elif method == "log":
        plan, info = _sinkhorn_log(cost, marg, reg, n_iters, stop_thr)
    else:
        shift = cost.detach().amin(dim=(-2, -1), keepdim=True)  # per-plan min of the cost
        if method == "auto" and not _kernel_range_ok(shift, cost, reg):
            plan, info = _sinkhorn_log(cost, marg, reg, n_iters, stop_thr)
        else:
            plan, info = _sinkhorn_kernel(cost, shift, marg, reg, n_iters, stop_thr, check=method == "auto")
        if plan is None:  # a scaling left the safe range: redo in the log domain
            plan, info = _sinkhorn_log(cost, marg, reg, n_iters, stop_thr)
    return plan, info


class Marginals:
    """Uniform marginals over the valid elements, as Python floats when nothing is masked.

    ``a`` (..., n, 1) / ``b`` (..., 1, m): the marginals, 1 / n_valid on valid elements and 0 on
    padding and in empty problems. Computed lazily, per path: ``bias_x`` / ``bias_y``, additive
    log-weights (0 valid, ``_NEG`` padded) of the log path; ``u0``, initial row scaling of the kernel
    path (1 valid, 0 padded), and ``zero_a`` / ``zero_b``, 1.0 where the marginal is 0, added to
    kernel-path denominators so that 0 / 0 never happens (also not in the backward pass).
    """

    def __init__(self, mask_x: Tensor | None, mask_y: Tensor | None, n: int, m: int, like: Tensor) -> None:
        self.a: Tensor | float = 1.0 / n
        self.b: Tensor | float = 1.0 / m
        self._vx: Tensor | None = None
        self._vy: Tensor | None = None
        if mask_x is None and mask_y is None:
            return
        dev, dt = like.device, like.dtype
        if mask_x is not None:
            self._vx = mask_x.to(device=dev, dtype=torch.bool).to(dt)
        if mask_y is not None:
            self._vy = mask_y.to(device=dev, dtype=torch.bool).to(dt)
        vx = self._vx if self._vx is not None else like.new_ones(n)
        vy = self._vy if self._vy is not None else like.new_ones(m)
        nx, ny = vx.sum(-1, keepdim=True), vy.sum(-1, keepdim=True)
        # 1 / n_valid on valid rows; 0 on padded rows and in problems without a valid column
        self.a = (vx * ((ny > 0) / nx.clamp_min(1))).unsqueeze(-1)
        self.b = (vy * ((nx > 0) / ny.clamp_min(1))).unsqueeze(-2)

    @property
    def bias_x(self) -> Tensor | None:
        return None if self._vx is None else ((self._vx - 1.0) * -_NEG).unsqueeze(-1)

    @property
    def bias_y(self) -> Tensor | None:
        return None if self._vy is None else ((self._vy - 1.0) * -_NEG).unsqueeze(-2)

    @property
    def u0(self) -> Tensor | None:
        return None if self._vx is None else self._vx.unsqueeze(-1)

    @staticmethod
    def _zero(w: Tensor | float) -> Tensor | float:
        return (w == 0).to(w.dtype) if isinstance(w, Tensor) else 0.0

    @property
    def zero_a(self) -> Tensor | float:
        return self._zero(self.a)

    @property
    def zero_b(self) -> Tensor | float:
        return self._zero(self.b)


def _marginal_error(col_sums: Tensor, b: Tensor | float) -> float:
    """max over the batch of ||col_sums - b||_2, with ``col_sums`` and ``b`` shaped (..., 1, m)."""
    err = (col_sums.detach() - b).square().sum(-1).sqrt()
    return float(err.max()) if err.numel() else 0.0


def _sinkhorn_log(
    cost: Tensor, marg: Marginals, reg: float | Tensor, n_iters: int, stop_thr: float | None
) -> tuple[Tensor, dict[str, Any]]:
    """Alternating log-softmax normalisations of the log plan (see ``sinkhorn``)."""
    bias_x, bias_y = marg.bias_x, marg.bias_y
    log_p = cost * (-1.0 / reg)
    if bias_x is not None:
        log_p = log_p + bias_x
    if bias_y is not None:
        log_p = log_p + bias_y
    err = math.nan
    it = 0
    plan: Tensor | None = None
    for it in range(1, n_iters + 1):
        log_p = torch.log_softmax(log_p, dim=-2)
        if bias_y is not None:
            log_p = log_p + bias_y
        last = it == n_iters
        check = stop_thr is not None and (it % _CHECK_EVERY == 0 or last)
        if last and not check:  # fixed budget: fuse the final row normalisation and the exp
            plan = torch.softmax(log_p, dim=-1) * marg.a
            break
        log_p = torch.log_softmax(log_p, dim=-1)
        if check:
            plan = torch.exp(log_p) * marg.a
            err = _marginal_error(plan.sum(-2, keepdim=True), marg.b)
            if err <= stop_thr or last:  # type: ignore[operator]
                break
        if bias_x is not None:
            log_p = log_p + bias_x
    assert plan is not None
    return plan, {"n_iters": it, "err": err, "method": "log"}


def _kernel_range_ok(shift: Tensor, cost: Tensor, reg: float | Tensor) -> bool:
    """Whether (max C - min C) / reg is small enough in every plan for the kernel path.

    ``shift`` is the per-plan minimum. (Separate amin / amax: ``torch.aminmax`` over dims is ~30x
    slower on CPU here.)
    """
    hi = cost.detach().amax(dim=(-2, -1), keepdim=True)
    spread = hi - shift
    return bool((torch.isfinite(spread) & (spread <= KERNEL_MAX_RANGE[cost.dtype] * reg_number(reg))).all())


def _scaling_ok(s: Tensor, weight: Tensor | float, max_log: float) -> Tensor:
    """|log s| <= max_log wherever the marginal weight is positive (False on NaN / inf / 0)."""
    if isinstance(weight, Tensor):
        s = torch.where(weight > 0, s, 1.0)
    return (s.detach().log().abs() <= max_log).all()


def _sinkhorn_kernel(
    cost: Tensor,
    shift: Tensor,
    marg: Marginals,
    reg: float | Tensor,
    n_iters: int,
    stop_thr: float | None,
    check: bool,
) -> tuple[Tensor | None, dict[str, Any]]:
    """Scaling-domain iterations on the kernel shifted by the (detached) per-plan minimum ``shift``.

    Returns ``(None, {})`` if ``check`` and a scaling left the safe range.
    """
    # exp((shift - C) / reg) in one fused pass (sub with alpha; a tensor reg cannot be an alpha) and an in-place exp
    if isinstance(reg, Tensor):
        kern = ((shift - cost) / reg).exp()
    else:
        kern = torch.sub(shift * (1.0 / reg), cost, alpha=1.0 / reg).exp_()
    a, b, u0 = marg.a, marg.b, marg.u0
    zero_a, zero_b = marg.zero_a, marg.zero_b
    # column sums of diag(u) K for u = u0 (1 on valid rows): a mat-vec, or a plain sum if unmasked
    col = kern.sum(-2, keepdim=True) if u0 is None else u0.transpose(-1, -2) @ kern
    err = math.nan
    it = 0
    plan: Tensor | None = None
    u: Tensor | None = None
    v: Tensor | None = None
    for it in range(1, n_iters + 1):
        v = b / (col + zero_b)  # (..., 1, m)
        last = it == n_iters
        if last and stop_thr is None:  # fixed budget: fuse the final row update into the plan
            kv = kern * v
            u = a / (kv.sum(-1, keepdim=True) + zero_a)
            plan = kv * u
            break
        u = a / (kern @ v.transpose(-1, -2) + zero_a)  # (..., n, 1)
        col = u.transpose(-1, -2) @ kern
        if stop_thr is not None and (it % _CHECK_EVERY == 0 or last):
            err = _marginal_error(col * v, b)  # column sums of diag(u) K diag(v)
            if err <= stop_thr:
                break
    assert u is not None and v is not None
    if check:
        dtype = cost.dtype
        ok = _scaling_ok(u, a, _KERNEL_MAX_LOG[dtype]) & _scaling_ok(v, b, _KERNEL_MAX_LOG[dtype])
        if not bool(ok):
            return None, {}
    if plan is None:
        plan = u * kern * v
    return plan, {"n_iters": it, "err": err, "method": "kernel"}
