"""Training pieces that need no Ray: run config, engine state, evaluation, checkpoints."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from otmel.config import ModelConfig
from otmel.metrics import gold_ranks
from otmel.model import OTMEL
from otmel.model.testing import entity_batch, random_batch, tiny_cfg
from otmel.runconfig import RunConfig, TrainConfig, load_config
from otmel.train.driver.launch import format_table
from otmel.train.worker.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from otmel.train.worker.engine import TOWER_PREFIXES, Engine, load_ds_config
from otmel.train.worker.evaluate import encode_kg, encode_split, gold_ranks_distributed

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg.model_config(), ModelConfig)
    assert (ROOT / cfg.train.deepspeed_config).exists()


def test_unknown_keys_fail_at_start_up_naming_the_key() -> None:
    with pytest.raises(KeyError, match=r"train\.epoch"):
        load_config(ROOT / "configs/synth.yaml", ["train.epoch=3"])
    with pytest.raises(KeyError, match="hiden_dim"):
        load_config(ROOT / "configs/synth.yaml", ["model.hiden_dim=3"])
    with pytest.raises(KeyError, match="trian"):
        RunConfig.from_dict({"trian": {}})


def test_saved_configs_of_earlier_versions_load() -> None:
    """`train.fail_at_step` left the run config (the fault hook of the tests is an environment variable): the
    `null` that every earlier checkpoint records is read and dropped; a step is an unknown key."""
    saved = load_config(ROOT / "configs/synth.yaml").to_dict()
    saved["train"]["fail_at_step"] = None
    assert RunConfig.from_dict(saved).to_dict() == load_config(ROOT / "configs/synth.yaml").to_dict()
    with pytest.raises(KeyError, match=r"train\.fail_at_step"):
        load_config(ROOT / "configs/synth.yaml", ["train.fail_at_step=5"])


def test_the_fault_hook_reaches_the_workers_only_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from otmel.train.worker.loop import FAULT_ENV, fault_run_config, fault_step

    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_step() is None and fault_run_config() == {}  # nothing extra in a user's run
    monkeypatch.setenv(FAULT_ENV, "5")
    assert fault_step() == 5 and fault_run_config() == {"worker_runtime_env": {"env_vars": {FAULT_ENV: "5"}}}
    for bad in ("0", "-3", "five"):
        monkeypatch.setenv(FAULT_ENV, bad)
        with pytest.raises(ValueError, match=FAULT_ENV):
            fault_step()


def test_overrides_are_yaml_typed() -> None:
    cfg = load_config(ROOT / "configs/synth.yaml", ["train.lr=3e-4", "train.negatives=local", "model.variant=KD"])
    assert cfg.train.lr == 3e-4 and cfg.train.negatives == "local"
    assert cfg.model_config().kd == "kl"


def test_deepspeed_config_is_filled_for_cpu_and_gpu() -> None:
    cfg = load_config(ROOT / "configs/synth.yaml", ["train.batch_size=12", "train.grad_clip=0.5"])
    cpu = load_ds_config(cfg.train, total_steps=100, use_gpu=False)
    gpu = load_ds_config(cfg.train, total_steps=100, use_gpu=True)
    assert cpu["train_micro_batch_size_per_gpu"] == 12 and cpu["gradient_clipping"] == 0.5
    assert cpu["scheduler"]["params"]["total_num_steps"] == 100
    assert "bf16" not in cpu and gpu["bf16"]["enabled"] is True


def test_train_precision_resolves_per_device_and_strategy(tmp_path: Path) -> None:
    """auto: the JSON's bf16 on GPU, fp32 on CPU; bf16: the JSON's bf16 on GPU (forced on where the JSON lacks it),
    fp32 weights + bf16 autocast on CPU and with ddp; fp32: no autocast, bf16 / fp16 dropped everywhere."""
    from otmel.train.worker.engine import run_precision

    no_bf16 = tmp_path / "plain.json"
    plain = json.loads((ROOT / "configs/deepspeed/zero1.json").read_text())
    plain.pop("bf16")
    no_bf16.write_text(json.dumps({**plain, "fp16": {"enabled": True}}))
    cases = {  # (precision, strategy, JSON, use_gpu) -> (bf16 section enabled, fp16 section, autocast on device)
        ("auto", "deepspeed", "zero1", False): (False, False, None),
        ("auto", "deepspeed", "zero1", True): (True, False, None),
        ("auto", "deepspeed", "plain", True): (False, True, None),  # the JSON's own choice, fp16
        ("bf16", "deepspeed", "zero1", False): (False, False, "cpu"),
        ("bf16", "deepspeed", "plain", True): (True, False, None),  # forced on, fp16 dropped
        ("bf16", "ddp", "zero1", True): (False, False, "cuda"),
        ("fp32", "deepspeed", "zero1", True): (False, False, None),
        ("fp32", "deepspeed", "plain", True): (False, False, None),
    }
    for (precision, strategy, js, gpu), (bf16, fp16, device) in cases.items():
        path = ROOT / "configs/deepspeed/zero1.json" if js == "zero1" else no_bf16
        train = TrainConfig(precision=precision, strategy=strategy, deepspeed_config=str(path))  # type: ignore[arg-type]
        ds = load_ds_config(train, total_steps=10, use_gpu=gpu)
        got = (ds.get("bf16", {}).get("enabled", False), ds.get("fp16", {}).get("enabled", False))
        assert got == (bf16, fp16), (precision, strategy, js, gpu, ds)
        p = run_precision(train, gpu, ds)
        assert (p.device_type if p.autocast_dtype is not None else None) == device, (precision, strategy, js, gpu)
        assert p.autocast_dtype in (None, torch.bfloat16)


def test_a_restored_schedule_sets_the_optimizer_lr_it_left_off_at() -> None:
    """DeepSpeed's ZeRO 1/2 optimizer load leaves the param groups at the fresh schedule's pre-start LR (0): restoring
    the scheduler's state must set the LR of the position it restores, or the first step after a resume is lost."""
    train = TrainConfig(lr=1e-3, head_lr=1e-2, strategy="ddp", warmup_steps=2,
                        deepspeed_config=str(ROOT / "configs/deepspeed/zero1.json"))
    eng = Engine(OTMEL(tiny_cfg()), train, total_steps=10, world_size=1, use_gpu=False)
    for i in range(4):
        eng.step(sum((p.float() ** 2).sum() for p in eng.module.parameters()), float(i))
    want = [g["lr"] for g in eng.optimizer.param_groups]
    fresh = Engine(OTMEL(tiny_cfg()), train, total_steps=10, world_size=1, use_gpu=False)
    assert fresh.lr == 0.0  # before its first step the schedule is at -1: LR 0 (what ZeRO's load leaves)
    fresh.load_scheduler_state(eng.scheduler_state())
    assert [g["lr"] for g in fresh.optimizer.param_groups] == want and 0 < want[0] < want[1]


def test_train_precision_is_validated_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"'train\.precision'.*'fp16' is not one of \['auto', 'fp32', 'bf16'\]"):
        load_config(ROOT / "configs/wikimel.yaml", ["train.precision=fp16"])
    with pytest.raises(ValueError, match=r"'train\.precision' must be 'auto', 'fp32' or 'bf16', got 'half'"):
        TrainConfig(precision="half")  # type: ignore[arg-type]
    assert load_config(ROOT / "configs/wikimel.yaml").train.precision == "auto"


class _FakeRayTrain:
    """The part of `ray.train` a `Worker` calls, for one in-process rank: no checkpoint to resume, reports kept."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def get_context(self) -> Any:
        return types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        self.reports.append(dict(metrics))


def _cpu_worker(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str
                ) -> tuple[Any, _FakeRayTrain]:
    """A real `Worker` (one in-process rank, ddp, a tiny model) on the toy shards, with `ray.train` faked (the caller
    restores torch's thread count, which the worker sets)."""
    import ray.train

    from otmel.train.worker.loop import Worker

    fake = _FakeRayTrain()
    for name in ("get_context", "report"):
        monkeypatch.setattr(ray.train, name, getattr(fake, name))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train.Checkpoint, "from_directory", staticmethod(lambda d: d))
    cfg = load_config(ROOT / "configs/synth.yaml", [
        f"data.shards={toy}", "data.num_workers=0", "model.tiny_width=32", "model.tiny_layers=1", "model.hidden_dim=16",
        "model.tiny_image_size=16", "model.max_len=16", "train.strategy=ddp",
        "train.batch_size=2", "train.steps_per_epoch=3", "train.epochs=1", "train.warmup_steps=1", "train.lr=1e-2",
        "train.eval_batch_size=4", "train.progress=false", "wandb.enabled=false", "run.console=verbose",
        "run.preemption_check_every=0", "scaling.num_workers=1", *overrides])
    return Worker(cfg, tmp_path / "run", channel=None), fake


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_short_cpu_run_trains_and_evaluates_under_the_precision_it_asks_for(
        precision: str, toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real worker loop (`Worker.run`, one in-process rank, ddp) on the toy shards: with train.precision=bf16 a
    Linear inside the text and vision towers returns bfloat16 in the training forward and in the whole-KG evaluation
    while every parameter stays float32; the optimizer steps move the weights and the loss is finite. fp32: float32
    throughout."""
    threads = torch.get_num_threads()
    try:
        worker, fake = _cpu_worker(toy, tmp_path, monkeypatch, f"train.precision={precision}")
        towers = worker.model.encoder
        seen: list[tuple[str, bool, torch.dtype, torch.dtype]] = []  # (tower, grad enabled, output, weight)
        for tower, linear in (("text", towers.text_model.encoder.layers[0].mlp.fc1),
                              ("vision", towers.vision_model.encoder.layers[0].mlp.fc1)):
            linear.register_forward_hook(lambda mod, _in, out, t=tower: seen.append(
                (t, torch.is_grad_enabled(), out.dtype, mod.weight.dtype)))
        before = {n: p.detach().clone() for n, p in worker.model.named_parameters()}
        worker.run()
    finally:
        torch.set_num_threads(threads)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {(t, g) for t, g, _, _ in seen} == {("text", True), ("text", False), ("vision", True), ("vision", False)}
    assert {out for *_, out, _ in seen} == {want}  # training forward and evaluation alike
    assert {w for *_, w in seen} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in worker.model.parameters())
    final = fake.reports[-1]
    assert final["global_step"] == 3 and final["eval/kg_entities"] == 6  # the toy KG, whole
    assert all(math.isfinite(final[f"{s}/MRR"]) for s in ("dev", "test"))
    epoch = fake.reports[-2]
    assert math.isfinite(epoch["train/loss"]) and epoch["train/nonfinite_steps"] == 0
    moved = [n for n, p in worker.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > 0.9 * len(before)  # the optimizer stepped (almost) every parameter


def test_every_batch_reaches_the_model_on_the_workers_device(toy: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The real worker loop on the toy shards with lexical + mined hard negatives: every batch that reaches the
    model's towers (`OTMEL._encode`: the training forward, whole-KG evaluation, mining) is one that
    `devices.to_device` returned, for the worker's device (on this CPU machine the CPU: no GPU here); each training
    step moves exactly one batch, after its hard negatives were appended to the CPU batch."""
    from otmel.train.worker import devices, evaluate, loop, mining

    threads = torch.get_num_threads()
    try:
        worker, fake = _cpu_worker(toy, tmp_path, monkeypatch, "train.hard_negatives=both", "train.hard_pool=2",
                                   "train.hard_per_mention=1")
        assert worker.device == torch.device("cpu") and worker.engine.device == worker.device
        assert worker.hard is not None and worker.evaluate.device == worker.hard.device == worker.device
        moved: list[dict[str, Any]] = []  # every batch to_device returned (kept alive, so identities stay unique)
        calls: list[tuple[str, torch.device, int]] = []  # (module, device, id of the batch it was given)

        def spy(where: str) -> Any:
            def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
                out = devices.to_device(batch, device)
                assert all(v.device == torch.device(device) for v in out.values() if torch.is_tensor(v))
                moved.append(out)
                calls.append((where, torch.device(device), id(batch)))
                return out
            return to_device

        for module in (loop, evaluate, mining):
            monkeypatch.setattr(module, "to_device", spy(module.__name__.rsplit(".", 1)[-1]))
        augmented: list[dict[str, Any]] = []
        real_augment = mining.HardNegativeSchedule.augment

        def augment(self: Any, batch: dict[str, torch.Tensor], epoch: int, step: int) -> dict[str, torch.Tensor]:
            assert all(v.device.type == "cpu" for v in batch.values()) and not any(batch is m for m in moved)
            augmented.append(real_augment(self, batch, epoch, step))
            return augmented[-1]

        monkeypatch.setattr(mining.HardNegativeSchedule, "augment", augment)
        reached: list[tuple[str, bool]] = []  # (side, the batch came from to_device)
        real_encode = OTMEL._encode

        def encode(self: OTMEL, batch: dict[str, torch.Tensor], p: str) -> Any:
            reached.append((p, any(batch is m for m in moved)))
            return real_encode(self, batch, p)

        monkeypatch.setattr(OTMEL, "_encode", encode)
        worker.run()
    finally:
        torch.set_num_threads(threads)
    assert fake.reports[-1]["global_step"] == 3 and fake.reports[-2]["hard/mine_seconds"] > 0
    assert reached and all(ok for _, ok in reached), reached
    assert {where for where, *_ in calls} == {"loop", "evaluate", "mining"}
    assert {device for _, device, _ in calls} == {worker.device}
    train_moves = [batch_id for where, _, batch_id in calls if where == "loop"]
    assert len(train_moves) == 3 and train_moves == [id(b) for b in augmented]  # one per step, after the negatives
    assert all(len(b["e_index"]) == 2 * len(b["m_index"]) for b in augmented)  # B golds + B hard negatives
    # each training step's batch reaches both towers' sides (m, e); an evaluation or mining batch one side
    assert len(reached) == 2 * len(train_moves) + len(calls) - len(train_moves)


def test_evaluation_ranks_equal_the_full_score_matrix() -> None:
    """Entity cache in two KG batches, mentions chunked: ranks equal gold_ranks of the full S_O matrix."""
    torch.manual_seed(0)
    model = OTMEL(tiny_cfg("OT")).eval()
    b = random_batch(8)
    b["e_index"] = torch.arange(8)
    b["e_index"][3] = 0  # two mentions share gold row 0: the KG holds it once
    kg = [entity_batch(b, torch.tensor([0, 1, 2])), entity_batch(b, torch.tensor([4, 5, 6, 7]))]
    with torch.no_grad():
        entities = encode_kg(model, kg)
        mentions, gold, order = encode_split(model, [b], world_size=1, image_size=16)
        ranks = gold_ranks_distributed(model, mentions, gold, entities, world_size=1, mention_chunk=3)
        S = model.score(mentions, entities).S_O
    cols = {int(r): j for j, r in enumerate(entities.ids)}
    want = gold_ranks(S, torch.tensor([cols[int(g)] for g in gold]))
    assert torch.equal(ranks, want)
    assert torch.equal(order, torch.arange(8))


def test_evaluation_refuses_a_kg_without_the_gold() -> None:
    model = OTMEL(tiny_cfg("OT")).eval()
    b = random_batch(4, missing=(1,))
    with torch.no_grad():
        entities = encode_kg(model, [entity_batch(b, slice(0, 2))])
        mentions, gold, _ = encode_split(model, [b], 1, 16)
        with pytest.raises(RuntimeError, match="gold entities missing"):
            gold_ranks_distributed(model, mentions, gold, entities, 1)


class FakeEngine:
    zero_stage = 0  # the whole optimizer state on every rank (as DDP)

    def __init__(self, model: torch.nn.Module) -> None:
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def optimizer_state(self) -> dict:
        return self.opt.state_dict()

    def load_optimizer_state(self, states: list[dict]) -> None:
        self.opt.load_state_dict(states[0])

    def scheduler_state(self) -> dict:
        return {"last_batch_iteration": 7}

    def load_scheduler_state(self, s: dict) -> None:
        assert s == {"last_batch_iteration": 7}


def test_checkpoint_roundtrip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = OTMEL(tiny_cfg("OT"))
    eng = FakeEngine(model)
    model(random_batch())["S_O"].sum().backward()
    eng.opt.step()
    rng = rng_state()
    expected_draw = torch.rand(3)
    set_rng_state(rng)
    st = {"epoch": 1, "step_in_epoch": 2, "global_step": 6, "best_mrr": 0.5, "best_epoch": 1, "history": []}
    best = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, rank=0, model=model, engine=eng, state=st, best=best, config={"x": 1})  # type: ignore[arg-type]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave no temp files
    torch.rand(5)  # move the RNG on
    torch.manual_seed(1)
    fresh = OTMEL(tiny_cfg("OT"))
    eng2 = FakeEngine(fresh)
    state, best2 = load_checkpoint(tmp_path, rank=0, model=fresh, engine=eng2)  # type: ignore[arg-type]
    assert state == st and best2 is not None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    got, want = eng2.opt.state_dict()["state"], eng.opt.state_dict()["state"]
    assert got.keys() == want.keys() and len(got) > 10
    assert all(torch.equal(got[i]["exp_avg"], want[i]["exp_avg"]) for i in want)
    assert torch.equal(torch.rand(3), expected_draw)


def test_final_table_lists_dev_and_test() -> None:
    m = {f"{s}/{k}": 0.5 for s in ("dev", "test") for k in ("H@1", "H@3", "H@5", "MRR")}
    m.update({"dev/MR": 3.0, "test/MR": 4.0})
    table = format_table(m)
    assert "dev" in table and "test" in table and "50.00" in table and "4.0" in table


def test_wandb_is_offline_without_a_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from otmel.runconfig import WandbConfig
    from otmel.train.worker.tracking import resolve_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_mode(WandbConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(WandbConfig()) == "online"
    assert resolve_mode(WandbConfig(mode="disabled")) == "disabled"


def test_wandb_offline_run_logs_and_a_broken_wandb_never_fails(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from otmel.runconfig import WandbConfig
    from otmel.train.worker.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    t = Tracker(WandbConfig(), enabled=True, name="t1", config={"a": 1}, directory=str(tmp_path))
    assert t.run is not None
    t.log({"train/loss": 1.0}, step=1)
    t.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))  # the run is on disk, ready for `wandb sync`

    import wandb

    def boom(*a: object, **k: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(UserWarning, match="W&B could not start"):
        t2 = Tracker(WandbConfig(), enabled=True, name="t2", config={}, directory=str(tmp_path))
    t2.log({"x": 1.0}, step=1)  # a no-op, not an error
    t2.finish()
    assert Tracker(WandbConfig(), enabled=False, name="t3", config={}, directory=str(tmp_path)).run is None


def test_remote_storage_keeps_results_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from otmel.train.driver.launch import local_run_dir

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/synth.yaml", ["run.storage=s3://bucket/otmel"])
    assert local_run_dir(cfg, "r1") == tmp_path / "runs" / "r1"  # not a folder literally named "s3:"
    cfg = load_config(ROOT / "configs/synth.yaml", [f"run.storage={tmp_path}/st"])
    assert local_run_dir(cfg, "r1") == tmp_path / "st" / "r1"


def test_head_lr_gives_the_heads_their_own_group_and_the_schedule_keeps_the_ratio() -> None:
    torch.manual_seed(0)
    model = OTMEL(tiny_cfg())
    train = TrainConfig(lr=1e-4, head_lr=2e-3, strategy="ddp", warmup_steps=2,
                        deepspeed_config=str(ROOT / "configs/deepspeed/zero1.json"))
    eng = Engine(model, train, total_steps=10, world_size=1, use_gpu=False)
    towers, heads = eng.optimizer.param_groups
    named = dict(model.named_parameters())
    tower_ids = {id(p) for n, p in named.items() if n.startswith(TOWER_PREFIXES)}
    assert tower_ids and {id(p) for p in towers["params"]} == tower_ids
    assert len(towers["params"]) + len(heads["params"]) == len(named)
    assert id(named["logit_scale"]) in {id(p) for p in heads["params"]}
    before = {n: p.detach().clone() for n, p in named.items()}
    for _ in range(4):
        eng.step(sum((p.float() ** 2).sum() for p in model.parameters()))
    assert heads["lr"] / towers["lr"] == pytest.approx(20.0) and towers["lr"] != pytest.approx(1e-4)
    # AdamW's first steps move every parameter by ~lr: the heads ~20x further than the towers
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in named.items()}
    tower_moves = torch.tensor([v for n, v in moved.items() if n.startswith(TOWER_PREFIXES)])
    head_moves = torch.tensor([v for n, v in moved.items() if not n.startswith(TOWER_PREFIXES)])
    assert 5 * tower_moves.median() < head_moves.median()
    single = Engine(OTMEL(tiny_cfg()), TrainConfig(lr=1e-4, strategy="ddp", deepspeed_config=train.deepspeed_config),
                    total_steps=10, world_size=1, use_gpu=False)
    assert len(single.optimizer.param_groups) == 1
    with pytest.raises(ValueError, match="head_lr"):
        TrainConfig(head_lr=0.0)
