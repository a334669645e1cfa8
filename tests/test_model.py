"""The model, equation by equation: CA (Eq. 6-12), pooling (13-14), fusion (15-18), matching (19-24),
scores (25), and every Table-2 variant."""

from __future__ import annotations

import pytest
import torch

from otmel.config import TABLE2_VARIANTS, VARIANTS, ModelConfig
from otmel.loss import OTMELLoss
from otmel.model import OTMEL, EntityFeatures
from otmel.model.assign import CorrelationAssignment, masked_softmax
from otmel.model.pool import Pool
from otmel.model.testing import entity_batch, random_batch, tiny_cfg


@pytest.fixture(autouse=True)
def _flush_denormals():  # type: ignore[no-untyped-def]
    """As the training loop does (denormal plans cost 5-50x on CPU); restored after, for hypothesis."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def _model(variant: str = "OT", seed: int = 0, **kw: object) -> OTMEL:
    torch.manual_seed(seed)
    return OTMEL(tiny_cfg(variant, **kw))


# ---------------------------------------------------------------------------------- config / variants


def test_every_table2_variant_has_a_preset() -> None:
    assert set(TABLE2_VARIANTS) <= set(VARIANTS)
    assert ModelConfig.from_variant("f1").fusion_ca == "att"
    assert ModelConfig.from_variant("A1").match_ca == "att" and ModelConfig.from_variant("A1").fusion_ca == "att"
    assert ModelConfig.from_variant("K2").kd == "kl_row"
    with pytest.raises(KeyError, match="unknown variant"):
        ModelConfig.from_variant("Z9")


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(KeyError, match="hiden_dim"):
        ModelConfig.from_dict({"hiden_dim": 8})
    with pytest.raises(ValueError, match="pooling"):
        ModelConfig(pooling="median")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- CA (Eq. 6-12)


@pytest.mark.parametrize("kind", ["ot", "att"])
def test_ca_padding_gets_zero_mass_and_rows_sum_to_one(kind: str) -> None:
    torch.manual_seed(0)
    ca = CorrelationAssignment(8, 4, kind)  # type: ignore[arg-type]
    x, y = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    mx = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).bool()
    my = torch.tensor([[1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]).bool()
    G, a = ca(x, y, mx, my)
    assert torch.isfinite(G).all() and torch.isfinite(a.A).all()
    valid = mx.unsqueeze(-1) & my.unsqueeze(-2)
    assert (a.A[~valid] == 0).all()  # padded rows / columns: exactly zero
    assert (a.raw.masked_fill(valid, 0) == 0).all() if kind == "ot" else True
    rows = a.A.sum(-1)
    assert torch.allclose(rows[mx], torch.ones(int(mx.sum())), atol=1e-5)
    assert (G[2] == 0).all()  # a fully masked query set transports nothing


def test_att_is_scaled_dot_product_softmax() -> None:
    torch.manual_seed(0)
    ca = CorrelationAssignment(8, 4, "att")
    x, y = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    ones_x, ones_y = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    G, a = ca(x, y, ones_x, ones_y)
    A = torch.softmax(ca.wq(x) @ ca.wk(y).transpose(1, 2) / 2.0, -1)
    assert torch.allclose(a.A, A, atol=1e-6)
    assert torch.allclose(G, A @ ca.wv(y), atol=1e-5)


def test_ot_plan_is_a_transport_plan_with_uniform_marginals() -> None:
    torch.manual_seed(0)
    ca = CorrelationAssignment(8, 4, "ot", n_iters=200)
    x, y = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    _, a = ca(x, y, torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool))
    assert torch.allclose(a.raw.sum(-1), torch.full((1, 4), 1 / 4), atol=1e-5)
    assert torch.allclose(a.raw.sum(-2), torch.full((1, 6), 1 / 6), atol=1e-5)


def test_gradients_flow_through_sinkhorn_unless_detached() -> None:
    x, y = torch.randn(1, 4, 8), torch.randn(1, 5, 8)
    m4, m5 = torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)
    for detach, expect in ((False, True), (True, False)):
        torch.manual_seed(0)
        ca = CorrelationAssignment(8, 4, "ot", detach_cost=detach)
        G, _ = ca(x, y, m4, m5)
        G.pow(2).sum().backward()
        assert (ca.wq.weight.grad is not None and ca.wq.weight.grad.abs().sum() > 0) == expect


# ---------------------------------------------------------------------------------- pooling (Eq. 13-14)


@pytest.mark.parametrize("kind", ["softpool", "mean", "max"])
def test_pool_from_assignment_equals_pooling_G(kind: str) -> None:
    torch.manual_seed(0)
    pool = Pool(6, kind)  # type: ignore[arg-type]
    A = torch.softmax(torch.randn(3, 2, 5, 4), -1)
    H = torch.randn(3, 1, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool().unsqueeze(0)  # (1, 2, 5)
    A = A * mask.unsqueeze(-1)
    fast = pool.from_assignment(A, H, mask)
    slow = pool(A @ H, mask.expand(3, 2, 5))
    assert fast.shape == (3, 2, 6)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert (fast[:, 1] == 0).all()  # fully masked -> exactly 0


def test_softpool_ignores_padding() -> None:
    torch.manual_seed(0)
    pool = Pool(4, "softpool")
    x = torch.randn(1, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0]]).bool()
    x2 = x.clone()
    x2[:, 2:] = 1e3  # garbage in padded positions
    assert torch.allclose(pool(x, mask), pool(x2, mask))


# ---------------------------------------------------------------------------------- scores and variants


def test_variant_terms() -> None:
    b = random_batch()
    expect = {"OT": "FTV", "F2": "TV", "M2": "F", "CLS": ""}
    for v, terms in expect.items():
        out = _model(v).eval()(b)
        for t in "FTV":
            assert (out[f"S_{t}"] is not None) == (t in terms), (v, t)
        assert out["S_O"].shape == (6, 6)
    # S_O is the mean of the available terms; S_V only where both sides have an image
    out = _model("OT").eval()(b)
    valid = out["V_valid"].float()
    assert torch.allclose(out["S_O"], (out["S_F"] + out["S_T"] + out["S_V"]) / (2 + valid), atol=1e-6)
    assert (out["S_V"][~out["V_valid"]] == 0).all()
    assert not out["V_valid"][4].any() and not out["V_valid"][:, 5].any()


def test_missing_image_is_masked_not_fed() -> None:
    model = _model("OT").eval()
    b = random_batch()
    b2 = {k: v.clone() for k, v in b.items()}
    b2["m_pixel_values"][4] = torch.randn(3, 16, 16) * 10  # mention 4 has no image: pixels must not matter
    with torch.no_grad():
        o1, o2 = model(b), model(b2)
    for k in ("S_O", "S_F", "S_T", "S_V"):
        assert torch.equal(o1[k], o2[k]), k


def test_text_only_model_has_no_vision_and_no_visual_terms() -> None:
    model = _model("OT", use_images=False)
    assert not any("vision" in n or "match_v" in n for n, _ in model.named_parameters())
    b = {k: v for k, v in random_batch().items() if "pixel" not in k and "image" not in k}
    out = model(b)
    assert out["S_V"] is None and out["V_valid"] is None
    loss = OTMELLoss()(**out)
    assert set(loss) == {"L_O", "L_F", "L_T", "loss"}


def test_matching_chunk_size_does_not_change_scores() -> None:
    b = random_batch()
    big, small = _model("OT").eval(), _model("OT", match_chunk=2).eval()
    small.load_state_dict(big.state_dict())
    with torch.no_grad():
        o1, o2 = big(b), small(b)
    assert torch.allclose(o1["S_T"], o2["S_T"], atol=1e-6) and torch.allclose(o1["S_V"], o2["S_V"], atol=1e-6)


@pytest.mark.parametrize("variant", ["OT", "KD", "O2"])
def test_cached_entity_scoring_equals_training_forward(variant: str) -> None:
    """Entities encoded once in KG-stream batches, then scored, give the forward's scores."""
    model = _model(variant).eval()
    b = random_batch()
    with torch.no_grad():
        ref = model(b)
        cache = EntityFeatures.cat([model.encode_entities(entity_batch(b, slice(i, i + 4))) for i in (0, 4)])
        s = model.score(model.encode_mentions(b), cache)
    assert torch.equal(cache.ids, b["e_index"])
    for k in ("S_O", "S_F", "S_T", "S_V"):
        assert torch.allclose(getattr(s, k), ref[k], atol=1e-5), k


def test_kd_model_uses_attention_at_inference_and_ot_in_training() -> None:
    model = _model("KD")
    b = random_batch()
    assert model.train().ca_mode() == "both" and model.eval().ca_mode() == "student"
    with torch.no_grad():
        student = model.eval()(b)["S_T"]
        model.cfg.kd = "none"  # same weights, teacher (OT) path
        teacher = model.eval()(b)["S_T"]
    assert not torch.allclose(student, teacher)


# ---------------------------------------------------------------------------------- training signal


@pytest.mark.parametrize("variant", list(TABLE2_VARIANTS) + ["CLS"])
def test_each_variant_loss_falls_on_a_fixed_batch(variant: str) -> None:
    model = _model(variant)
    loss_fn = OTMELLoss(model.cfg.kd, model.cfg.kd_weight, model.cfg.kd_target)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    b = random_batch(8, seed=1)
    losses, terms = [], {}
    for _ in range(30):
        terms = loss_fn(**model(b))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], (variant, losses[0], losses[-1])
    if model.cfg.kd != "none":
        assert "L_KD" in terms


def test_all_parameters_receive_gradients() -> None:
    """No dead module: every parameter of the full model (and the KD student) is trained."""
    for v in ("OT", "KD"):
        model = _model(v)
        terms = OTMELLoss(model.cfg.kd)(**model(random_batch()))
        terms["loss"].backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        # HF's CLIP keeps a few parameters it never uses in our forward (its own pooled heads), and SoftPool's
        # score bias b (Eq. 13) shifts every score equally, so softmax makes its gradient exactly 0 (anything
        # else there is rounding noise): allow none else.
        dead = [n for n in dead if not n.endswith("pool.score.bias") and not n.endswith("pool_t.score.bias")]
        assert not [n for n in dead if "encoder." not in n or "_proj" in n], (v, dead)


def test_matcher_checkpointing_gives_the_same_gradients() -> None:
    b = random_batch()
    grads = []
    for ckpt in (True, False):
        model = _model("OT", match_checkpoint=ckpt, match_chunk=2)
        OTMELLoss()(**model(b))["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def _reference_masked_softmax(logits: torch.Tensor, mask_x: torch.Tensor, mask_y: torch.Tensor) -> torch.Tensor:
    """The straightforward formula (broadcast (..., n, m) masks), kept as the oracle of the fused one."""
    A = torch.softmax(logits.masked_fill(~mask_y.unsqueeze(-2), torch.finfo(logits.dtype).min), dim=-1)
    return A * (mask_x.unsqueeze(-1) & mask_y.unsqueeze(-2))


@pytest.mark.parametrize("grad", [False, True])
def test_masked_softmax_equals_the_reference_bitwise(grad: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 9, generator=g, requires_grad=grad)
    mx, my = torch.rand(3, 5, 7, generator=g) > 0.3, torch.rand(3, 1, 9, generator=g) > 0.3
    my[0, 0] = False  # a fully masked key set (a missing image)
    with torch.set_grad_enabled(grad):
        A = masked_softmax(x, mx, my)
    assert torch.equal(A, _reference_masked_softmax(x, mx, my))
    assert torch.equal(A[0], torch.zeros_like(A[0]))
    if grad:  # the in-place row mask is only taken without autograd
        A.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("pooling", ["softpool", "mean", "max"])
def test_factored_ot_inference_gives_the_dense_scores(pooling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without autograd the matcher pools from the factored OT assignment; the scores equal the dense path's."""
    import otmel.model.assign as assign

    calls = []
    original = assign.cosine_ot_assignment
    monkeypatch.setattr(assign, "cosine_ot_assignment", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = _model("OT", pooling=pooling).eval()
    b = random_batch()
    with torch.no_grad():
        fast = model(b)
        assert len(calls) == 2  # text and image matchers, one chunk each
        for matcher in (model.match_t, model.match_v):
            matcher.factored_inference = False
        dense = model(b)
    assert len(calls) == 2
    model.train()(b)  # with autograd: the dense, differentiable path
    assert len(calls) == 2
    for k in ("S_O", "S_T", "S_V"):
        assert torch.allclose(fast[k], dense[k], atol=1e-6), k
    assert torch.equal(fast["S_T"].argmax(1), dense["S_T"].argmax(1))


def test_trailing_padding_columns_change_nothing() -> None:
    """The text tower and the matcher drop columns that are padding in every row (valid_prefix): the same batch
    with 8 more padding columns gives the same scores, and features keep the batch's full width."""
    model = _model("OT").eval()
    b = random_batch()
    wide = dict(b)
    for p in "me":
        for k in (f"{p}_input_ids", f"{p}_attention_mask"):
            wide[k] = torch.cat([b[k], torch.zeros(len(b[k]), 8, dtype=b[k].dtype)], 1)
    with torch.no_grad():
        ref, out = model(b), model(wide)
        assert model.encode_entities(wide).q_t.shape[1] == b["e_input_ids"].shape[1] + 8
    for k in ("S_O", "S_F", "S_T", "S_V"):
        assert torch.allclose(ref[k], out[k], atol=1e-5), k


@pytest.mark.parametrize("variant", ["OT", "KD"])
def test_a_bf16_module_trains_as_deepspeed_bf16_runs_it(variant: str) -> None:
    """DeepSpeed's bf16 mode (the GPU configs) casts the module to bf16 and feeds it the loader's float32 pixels:
    forward, loss and backward run, with missing images, and every trainable parameter gets a finite bf16
    gradient (found by `otmel plan`: the zero states of a missing image were float32, index_copy refused bf16)."""
    model = _model(variant).to(torch.bfloat16)
    b = random_batch(6, missing=(1, 4))
    assert b["m_pixel_values"].dtype == torch.float32
    terms = OTMELLoss(model.cfg.kd, model.cfg.kd_weight)(**model(b))
    assert torch.isfinite(terms["loss"])  # (the KD term is computed in float32)
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        model.eval()
        e = model.encode_entities({k: v for k, v in b.items() if k.startswith("e_")})
        assert e.v is not None and e.v.dtype == torch.bfloat16 and not e.v[2].any()  # entity 2 has no image
