"""Comparing two rankings of the same request without relying on luck (see otmel/link/ranking.py, "Where float
noise can still reorder near-ties"): the score sequences must agree within `tol` at every rank, and two answers
may name different entities at a rank only where the expected list holds a near-tie there (another entity within
`tol` of that score, or the last rank, whose tie partner may lie beyond k)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TOL = 1e-5


def _get(e: Any, key: str) -> Any:
    return e[key] if isinstance(e, dict) else getattr(e, key)


def assert_same_ranking(got: Sequence[Any], want: Sequence[Any], tol: float = TOL) -> None:
    """`got` and `want`: lists of `LinkedEntity` or of the service's entity JSON objects."""
    assert len(got) == len(want), (len(got), len(want))
    scores = [float(_get(w, "S_O")) for w in want]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(float(_get(g, "S_O")) - scores[i]) <= tol, (i, _get(g, "qid"), _get(w, "qid"))
        if _get(g, "qid") != _get(w, "qid"):
            tied = i == len(want) - 1 or any(abs(scores[j] - scores[i]) <= tol for j in range(len(want)) if j != i)
            assert tied, f"rank {i + 1}: {_get(g, 'qid')} != {_get(w, 'qid')} and no near-tie there ({scores})"
    assert len({_get(g, "qid") for g in got}) == len(got)  # no entity twice
