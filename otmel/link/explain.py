"""Explaining a link: the correlation assignments as attention maps and OT plans (the paper's Fig. 4).

Two assignments are shown, each as an attention matrix beside an OT plan computed from the same projected
queries and keys:
- fusion image->text of the mention (queries = its text tokens, keys = its image patches), Eq. 6-12;
- unimodal text matching against the linked (or a chosen) entity (queries = the entity's tokens, keys = the
  mention's tokens), Eq. 19-21.

"attention" is softmax(Q K^T / sqrt(h)); for a distilled (KD) model it is the student attention the model runs
at inference. "OT plan" is n * Pi* (entropic Sinkhorn with the model's reg and iterations; each row sums to
1 like attention). The panel title says which of the two the model itself uses. Patches are numbered row by
row on the image panel (0 = ViT's class token).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otmel.data.transforms import CLIP_MEAN, CLIP_STD
from otmel.link.linker import ImageInput, LinkedEntity, Linker
from otmel.model.assign import CorrelationAssignment, masked_softmax
from otmel.ot import sinkhorn
from otmel.ot_costs import cosine_cost, plan_to_assignment

ATT, PLAN = "attention softmax(QKᵀ/√h)", "OT plan n·Π*"


@dataclass
class AssignmentPair:
    """One correlation assignment on valid rows x valid columns, as attention and as an OT plan."""

    title: str
    rows: list[str]  # query labels
    cols: list[str]  # key labels
    attention: np.ndarray  # (n, m), rows sum to 1
    plan: np.ndarray  # (n, m) n * Pi*, rows sum to 1
    used: str  # "attention" or "OT plan": what the model runs at inference


@dataclass
class Explanation:
    mention: str
    text: str
    entity: LinkedEntity
    fusion: AssignmentPair | None  # None without an image (or for a model without fusion)
    matching: AssignmentPair | None  # None for a model without unimodal matching
    image: np.ndarray | None  # (S, S, 3) in [0, 1], the preprocessed mention image
    grid: int  # patches per image side


def _clean(tokens: list[str]) -> list[str]:
    return [t.replace("Ġ", "").replace("</w>", "").replace("Ċ", "\\n") or "␣" for t in tokens]


@torch.no_grad()
def _pair(ca: CorrelationAssignment, qx: dict[str, torch.Tensor], ky: dict[str, torch.Tensor], mask_x: torch.Tensor,
          mask_y: torch.Tensor, title: str, rows: list[str], cols: list[str], student: bool) -> AssignmentPair:
    """Attention and OT plan of one (1, n, m) assignment, cut to the valid rows / columns."""
    if ca.student:
        att = ca.assign(qx, ky, mask_x, mask_y, "student").A
    else:
        att = masked_softmax(torch.matmul(qx["q"], ky["k"].transpose(-1, -2)) * ca.scale, mask_x, mask_y)
    if ca.kind == "ot":
        plan = ca.assign(qx, ky, mask_x, mask_y, "teacher").A
    else:  # an attention model: the plan its own projections would give
        raw = sinkhorn(cosine_cost(qx["q"], ky["k"]), mask_x, mask_y, reg=ca.reg, n_iters=ca.n_iters)
        plan = plan_to_assignment(raw, mask_x)
    used = "attention" if (student or ca.kind == "att") else "OT plan"
    ix, iy = mask_x[0].nonzero().squeeze(1), mask_y[0].nonzero().squeeze(1)
    cut = lambda a: a[0][ix][:, iy].float().numpy()  # noqa: E731
    return AssignmentPair(title, rows, cols, cut(att), cut(plan), used)


@torch.no_grad()
def compute_explanation(linker: Linker, text: str, mention: str, image: ImageInput = None,
                        entity: str | None = None) -> Explanation:
    """The assignments of one mention (and its linked entity, or the entity with QID `entity`)."""
    model, cfg, index = linker.model, linker.loaded.config, linker.index
    batch = {k: v.to(linker.device) for k, v in linker.mention_batch(text, mention, image).items()}
    m = model.encode_mentions(batch)
    if entity is None:
        hit = linker.rank(m, k=1)[0][0]
    else:
        row = index.row_of(entity)
        hits = linker.rank(m, k=len(index), mode="exhaustive")[0]
        hit = next(h for h in hits if h.row == row)
    student = cfg.kd != "none"
    tok = linker.pre.tokenizer
    mask_t = batch["m_attention_mask"].bool()
    m_tokens = _clean(tok.convert_ids_to_tokens(batch["m_input_ids"][0][mask_t[0]].tolist()))
    fusion = img = None
    grid = 0
    has_image = cfg.use_images and bool(batch["m_image_mask"][0])
    if cfg.use_images:
        grid = int(round((model.encoder.num_patches - 1) ** 0.5))
    if has_image and cfg.use_fusion:
        T, _ = model.encoder.encode_text(batch["m_input_ids"], mask_t.long())
        V, _ = model.encoder.encode_image(batch["m_pixel_values"], batch["m_image_mask"].bool())
        mask_v = torch.ones(V.shape[:2], dtype=torch.bool, device=V.device)
        ca = model.fusion.v2t
        cols = ["cls"] + [str(i) for i in range(1, V.shape[1])]
        fusion = _pair(ca, ca.queries(T), ca.keys(V), mask_t, mask_v, "fusion image→text of the mention",
                       m_tokens, cols, student)
    if has_image:
        px = batch["m_pixel_values"][0].float().cpu() * torch.tensor(CLIP_STD)[:, None, None]
        img = (px + torch.tensor(CLIP_MEAN)[:, None, None]).clamp(0, 1).permute(1, 2, 0).numpy()
    matching = None
    if cfg.use_matching:
        f = index.gather([hit.row]).to(linker.device)
        r = slice(0, 1)
        # use_matching: the index holds the entities' text queries and masks, the mention was encoded with keys
        assert f.q_t is not None and f.mask_t is not None
        assert m.k_t is not None and m.h_t is not None and m.mask_t is not None
        qe = {"q": f.q_t[r]} | ({"q_s": f.q_t_s[r]} if f.q_t_s is not None else {})
        km = {"k": m.k_t, "h": m.h_t} | ({"k_s": m.k_t_s} if m.k_t_s is not None else {})
        mask_e = f.mask_t[r]
        e_tokens = _clean(tok.convert_ids_to_tokens(index.input_ids(hit.row)[mask_e[0].cpu()].tolist()))
        matching = _pair(model.match_t.ca, qe, km, mask_e, m.mask_t,
                         f"text matching: entity {hit.qid} ({hit.name}) tokens → mention tokens", e_tokens,
                         m_tokens, student)
    return Explanation(mention, text, hit, fusion, matching, img, grid)


def _heatmap(ax: Any, fig: Any, data: np.ndarray, rows: list[str], cols: list[str], title: str) -> None:
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(cols)), cols, fontsize=6 if len(cols) > 30 else 7, rotation=90)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)


def plot_explanation(ex: Explanation, out: str | Path) -> Path:
    """Write the figure (PNG): per assignment, attention | OT plan; the mention image with numbered patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in (ex.fusion, ex.matching) if p is not None]
    if not pairs:
        raise ValueError("nothing to explain: the model has neither fusion on an image nor unimodal matching")
    n = len(pairs)
    fig, axes = plt.subplots(n, 3, figsize=(19, 7.5 * n), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [1.0, 1.7, 1.7]})
    for i, p in enumerate(pairs):
        for j, (name, data) in enumerate(((ATT, p.attention), (PLAN, p.plan))):
            used = " — used by the model" if (name == ATT) == (p.used == "attention") else ""
            _heatmap(axes[i, j + 1], fig, data, p.rows, p.cols, f"({'ab'[j]}) {name}{used}\n{p.title}")
        ax = axes[i, 0]
        if p is ex.fusion and ex.image is not None:
            s = ex.image.shape[0]
            ax.imshow(ex.image)
            step = s / max(ex.grid, 1)
            for k in range(ex.grid * ex.grid):
                y, x = divmod(k, ex.grid)
                ax.text((x + 0.5) * step, (y + 0.5) * step, str(k + 1), ha="center", va="center", fontsize=7,
                        color="white", bbox={"facecolor": "black", "alpha": 0.35, "pad": 0.5, "lw": 0})
            for k in range(1, ex.grid):
                ax.axhline(k * step - 0.5, color="white", lw=0.5)
                ax.axvline(k * step - 0.5, color="white", lw=0.5)
            ax.set_title("mention image, patches numbered", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.axis("off")
            e = ex.entity
            lines = [textwrap.fill(f"mention: {ex.mention}", 48), textwrap.fill(f"text: {ex.text[:400]}", 48), "",
                     textwrap.fill(f"entity: {e.qid}  {e.name}  (rank {e.rank})", 48), f"S_O = {e.S_O:.4f}"]
            lines += [f"{t} = {getattr(e, t):.4f}" for t in ("S_F", "S_T", "S_V") if getattr(e, t) is not None]
            ax.text(0.0, 0.98, "\n".join(lines), va="top", fontsize=10, transform=ax.transAxes)
    fig.suptitle("Correlation assignments: attention vs optimal transport (cf. OT-MEL Fig. 4)", fontsize=12)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def explain(linker: Linker, text: str, mention: str, image: ImageInput = None, *, entity: str | None = None,
            out: str | Path = "explain.png") -> tuple[Path, Explanation]:
    """Compute and plot the explanation of one link; returns (PNG path, Explanation)."""
    ex = compute_explanation(linker, text, mention, image, entity)
    return plot_explanation(ex, out), ex
