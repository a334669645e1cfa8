"""`otmel plan`: the memory watch counts what a step allocates, the model-state accounting is DeepSpeed's, the FLOP
counts of the full-size towers match an analytic count, the projection from small probes matches a measured larger
step, the index size matches a real index, and the command reports fits / does not fit in a table and as JSON."""

# ruff: noqa: F811  (pytest fixtures imported from test_link)
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from otmel.cli import main
from otmel.cli.plan import parse_size
from otmel.config import ModelConfig
from otmel.link.ann import AnnParams, build_segment_ann
from otmel.link.index import EntityIndex
from otmel.plan import (
    DatasetSize,
    Hardware,
    Measurements,
    StorageWatch,
    build_probe_model,
    entity_shapes,
    index_size,
    largest_layer_params,
    measure,
    model_states,
    project,
    render,
    synthetic_batch,
    tower_flops,
)
from otmel.plan._index_size import ann_bytes, store_bytes
from otmel.runconfig import load_config
from tests.test_link import ckpt, index_dir, kg  # noqa: F401 (fixtures)

GiB = 2**30


# ------------------------------------------------------------------------------------------------ memory watch


def test_storage_watch_counts_new_storages_and_labels_gradients() -> None:
    lin = nn.Linear(256, 512)  # weight 512 KiB
    x = torch.randn(32, 256)
    watch = StorageWatch(lin, keep=[x])
    with watch:
        kept = torch.empty(1000, dtype=torch.float32)  # 4000 bytes, alive to the end
        y = lin(x).relu()  # addmm out (32, 512) and relu out: 64 KiB each
        watch.backward(y.sum())
        del y
    peak, split = watch.timeline.peak(("activations",))
    # the parameters and the input were there before: never counted; the addmm and relu outputs and `kept` were
    assert peak >= 4000 + 2 * 32 * 512 * 4
    assert peak < 4000 + 4 * 32 * 512 * 4  # not the weight (512 KiB) nor its gradient
    grads = sum(d for k, d in watch.timeline.events if d > 0 and watch.timeline.kind[k] == "gradients")
    assert grads == lin.weight.numel() * 4 + lin.bias.numel() * 4  # labelled by size in backward
    del kept


# ------------------------------------------------------------------------------------------------ model states


@pytest.mark.parametrize("world", [1, 2, 4, 7, 64])
def test_model_states_equal_deepspeed_estimators(world: int) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for psi, layer in ((153_386_501, 25_296_896), (1_000_003, 4097)):
        _, gpu2 = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=world, cpu_offload=False)
        _, gpu3, _ = estimate_zero3_model_states_mem_needs(psi, layer, num_gpus_per_node=world, cpu_offload=False)
        assert model_states(psi, 2, world, bf16=True).total == gpu2
        assert model_states(psi, 3, world, bf16=True, largest_layer=layer).total == gpu3
        # stage 1: 16-bit parameters and gradients whole, the fp32 side (master, grads, m, v) partitioned
        assert model_states(psi, 1, world, bf16=True).total == (4 * psi * world + 16 * psi) // world
        assert model_states(psi, 1, world, bf16=False).total == (8 * psi * world + 8 * psi) // world
        assert model_states(psi, 0, world, bf16=True).total == 20 * psi  # nothing partitioned


def test_largest_layer_is_the_biggest_single_module() -> None:
    model = nn.Sequential(nn.Embedding(1000, 16), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
    assert largest_layer_params(model) == 16_000


# --------------------------------------------------------------------------------------- FLOPs at full size


def _transformer_flops(width: int, ffn: int, layers: int, tokens: int) -> int:
    """Forward matmul FLOPs of a pre-LN transformer: Q, K, V, O and the MLP (2 x MACs), plus QK^T and AV."""
    per_layer = 2 * tokens * (4 * width * width + 2 * width * ffn) + 2 * 2 * tokens * tokens * width
    return layers * per_layer


def test_full_size_tower_flops_match_an_analytic_count() -> None:
    """ViT-B/32 CLIP at full size: forward + backward FLOPs per sample of each tower within 10% of 3x the analytic
    forward (2x for the patch embedding, whose input, the pixels, needs no gradient)."""
    cfg = ModelConfig(pretrained="openai/clip-vit-base-patch32")
    model = build_probe_model(cfg, bf16=True)
    got = tower_flops(model, 1)
    text = 3 * _transformer_flops(512, 2048, 12, cfg.max_len)
    patches = (224 // 32) ** 2
    vision = 3 * _transformer_flops(768, 3072, 12, patches + 1) + 2 * 2 * patches * (3 * 32 * 32) * 768
    assert got["text"] == pytest.approx(text, rel=0.10)
    assert got["vision"] == pytest.approx(vision, rel=0.10)
    assert sum(p.numel() for p in model.encoder.text_model.parameters()) > 60e6  # really full size, not tiny


# ----------------------------------------------------------------------------------- projection vs measured


@pytest.fixture(scope="module")
def measured() -> Measurements:
    """One measurement of the embedded config's model (the tiny CLIP, the real OT matcher), with a check step at
    batch 8 (a pool of 16, the configured chunk)."""
    return measure(load_config("configs/synth.yaml", []), check_batch=8)


def test_projection_from_the_probes_matches_a_measured_larger_step(measured: Measurements) -> None:
    """Memory fitted from the four small probes vs measured at a larger batch and pool: within 15%; FLOPs 1%."""
    check = measured.check
    assert check is not None and (check["b"], check["P"]) == (8, 16)
    assert abs(check["error"]) < 0.15, check
    assert check["projected_flops"] == pytest.approx(check["measured_flops"], rel=0.01)
    step = measured.step
    assert step.per_row > 0 and step.per_chunk_pair > 0  # towers and the matcher's working set both measured
    assert measured.probes[1].seconds > 0  # one probe timed


def _synth(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config("configs/synth.yaml", list(overrides))


DATA = DatasetSize(train=1000, dev=100, test=200, kg=5000, kg_images=4000, source="test")


def test_projection_fits_and_adds_up(measured: Measurements) -> None:
    plan = project(_synth(), Hardware(gpus=2, gpu_memory=80 * GiB, tflops=312, mfu=0.35), DATA, measured)
    assert plan.fits and plan.max_batch >= plan.layout["batch_per_gpu"]
    mem = plan.memory
    assert mem["peak"] == mem["model_states"] + mem["towers"] + mem["matcher"] + mem["other"] + mem["allowance"]
    assert plan.layout["pool"] == 2 * plan.layout["batch_per_gpu"]  # global negatives over 2 GPUs
    steps = math.ceil(1000 / (plan.layout["batch_per_gpu"] * 2))
    assert plan.seconds["epoch"] == pytest.approx(steps * plan.seconds["step"])
    assert {ix["kind"] for ix in plan.index} == {"exact", "hnsw", "ivfpq"}
    four = project(_synth(), Hardware(gpus=4, gpu_memory=80 * GiB, tflops=312, mfu=0.35), DATA, measured)
    assert four.memory["optimizer"] == pytest.approx(plan.memory["optimizer"] / 2, rel=1e-6)  # ZeRO-1 partitions
    assert four.memory["matcher"] > plan.memory["matcher"]  # a pool twice as wide
    assert four.seconds["epoch"] < plan.seconds["epoch"]
    assert json.loads(plan.to_json())["memory"] == plan.memory


def test_projection_says_when_it_does_not_fit(measured: Measurements) -> None:
    plan = project(_synth("train.batch_size=512"), Hardware(gpus=1, gpu_memory=int(1.1 * GiB), tflops=312, mfu=0.35),
                   DATA, measured)
    assert not plan.fits and 0 < plan.max_batch < 512
    out = render(plan)
    assert "DOES NOT FIT in 1.1 GiB" in out
    assert int(next(line for line in out.splitlines() if "largest per-GPU batch" in line).split()[-1]) == plan.max_batch
    bigger = project(_synth(f"train.batch_size={plan.max_batch}"),
                     Hardware(gpus=1, gpu_memory=int(1.1 * GiB), tflops=312, mfu=0.35), DATA, measured)
    assert bigger.fits  # the largest batch that fits does fit, and one more does not
    over = project(_synth(f"train.batch_size={plan.max_batch + 1}"),
                   Hardware(gpus=1, gpu_memory=int(1.1 * GiB), tflops=312, mfu=0.35), DATA, measured)
    assert not over.fits


# ---------------------------------------------------------------------------------------------- index size


def test_store_size_matches_a_real_index(ckpt: Path, index_dir: Path) -> None:
    from otmel.checkpoints import load_checkpoint_model

    model = load_checkpoint_model(ckpt).model
    one = {k: v[:1] for k, v in synthetic_batch(model, 1).items() if k.startswith("e_")}
    shapes = entity_shapes(model, one)
    seg = index_dir / "seg-0000"
    n = len(EntityIndex.load(index_dir))
    lengths = np.load(seg / "lengths.npy")
    with_images = int(np.load(seg / "has_image.npy").sum())
    strings = (seg / "strings.bin").stat().st_size / n
    want = store_bytes(shapes, n, with_images, float(lengths[:, 0].mean()), string_bytes=strings)
    files = ("vectors.npy", "records.bin", "input_ids.npy", "spans.npy", "lengths.npy", "has_image.npy",
             "strings.bin", "string_spans.npy")
    got = sum((seg / f).stat().st_size for f in files)
    assert want == pytest.approx(got, rel=0.03)
    assert int(lengths[:, 1].max()) == shapes.patches  # an entity with an image keeps every patch


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_ann_size_matches_faiss_files(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, D = 3000, 64
    x = rng.standard_normal((n, D)).astype(np.float32)
    has_image = rng.random(n) < 0.7  # partitions of ~900 (flat under IVF-PQ) and ~2100 vectors
    p = AnnParams(kind, hnsw_m=16)
    build_segment_ann(tmp_path, x, has_image, p)
    got = sum(f.stat().st_size for f in tmp_path.iterdir())
    parts = (int((~has_image).sum()), int(has_image.sum()))
    assert ann_bytes(kind, D, parts, p) == pytest.approx(got, rel=0.05)


def test_index_size_kinds_order() -> None:
    from otmel.plan import EntityShapes

    s = EntityShapes(vector_dim=1024, input_len=40, fixed_width=2048, text_width=192, visual_width=192, patches=50)
    sizes = {k: index_size(k, s, 100_000, 60_000, 40.0) for k in ("exact", "hnsw", "ivfpq")}
    assert sizes["exact"].ann_bytes == 0 and sizes["exact"].ram_bytes == 100_000 * 1024 * 4  # vectors scanned
    assert sizes["hnsw"].ram_bytes > sizes["exact"].ram_bytes > sizes["ivfpq"].ram_bytes  # PQ codes are small
    assert sizes["hnsw"].store_bytes == sizes["ivfpq"].store_bytes == sizes["exact"].store_bytes


# ----------------------------------------------------------------------------------------------- the command


def test_plan_command_json(measured: Measurements, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """The command end to end, the measurement (above) reused: flags reach the hardware and the dataset size."""
    import otmel.plan

    seen = {}

    def reuse(cfg, check_batch=None, progress=None, device="?"):  # type: ignore[no-untyped-def]
        seen["batch"], seen["device"] = cfg.train.batch_size, device
        return measured

    monkeypatch.setattr(otmel.plan, "measure", reuse)
    args = ["plan", "--config", "configs/synth.yaml", "--gpus", "3", "--gpu-memory", "24GB", "--gpu-tflops", "100",
            "--json", "--train-mentions", "999", "--dev-mentions", "10", "--test-mentions", "20", "--kg-entities",
            "777", "train.batch_size=8"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert seen["batch"] == 8 and plan["layout"]["batch_per_gpu"] == 8 and plan["layout"]["pool"] == 24
    assert seen["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert plan["hardware"]["gpu_memory"] == 24 * GiB and plan["hardware"]["tflops"] == 100
    assert plan["dataset"]["kg"] == 777 and plan["dataset"]["train"] == 999
    assert "command line" in plan["dataset"]["source"]


def test_paper_config_sizes_come_from_table_5() -> None:
    cfg = load_config("configs/wikimel.yaml", ["data.shards=/nonexistent/shards"])
    size = DatasetSize.of(cfg)
    assert (size.train, size.dev, size.test, size.kg) == (18092, 2585, 5169, 109976)


def test_plan_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", "configs/synth.yaml", "data.shards=/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("otmel plan: error:") and "--kg-entities" in err and "\n" not in err
    counts = ["--train-mentions", "1", "--dev-mentions", "1", "--test-mentions", "1", "--kg-entities", "1"]
    assert main(["plan", "--config", "configs/synth.yaml", "--gpu-memory", "lots", *counts]) == 2
    assert "80GB" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["plan", "--config", "configs/synth.yaml", "--device", "cuda", *counts]) == 2
        assert "no CUDA device here" in capsys.readouterr().err


def test_parse_size() -> None:
    assert parse_size("80GB") == parse_size("80GiB") == parse_size("80") == 80 * GiB
    assert parse_size("40960MiB") == 40 * GiB and parse_size("0.5t") == 512 * GiB
