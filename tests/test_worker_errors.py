"""A failure inside a Ray Train worker speaks like the tool: `otmel train` prints the one line the driver would print
for the worker's own error, with the worker's log, and exits 2 when the user can fix it; Ray's own failures are a
short cause line (exit 1). Fast tests with constructed Ray Train errors through the console script, and one real
Ray Train run on a corrupt training shard (slow)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from otmel.cli import main as cli_main
from otmel.data.manifest import shard_paths
from otmel.data.records import BadRecord, BadRecordsError
from otmel.data.shards import ShardError, ShardIntegrityError
from otmel.errors import ConfigError, InputFileError, UnknownKeyError, UserError, WorkerError, WorkerUserError
from otmel.train.driver import launch
from otmel.train.driver.failures import unwrap_loader_error, worker_error
from otmel.train.worker.checkpoint import CheckpointCorruptError, CheckpointWriteError
from otmel.train.worker.loop import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("otmel") or str(Path(sys.executable).parent / "otmel")
SHA = "shard /data/train-000003.tar: sha256 9dd01456e909..., the manifest says 54af0a5432e7... (corrupt or replaced; " \
      "run `otmel verify`)"


def _in_loader(exc: BaseException) -> BaseException:
    """`exc` as torch re-raises it from a DataLoader worker process (the wrapper every DataLoader worker uses)."""
    from torch._utils import ExceptionWrapper

    try:
        raise exc
    except BaseException:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except BaseException as reraised:
        return reraised
    raise AssertionError("reraise did not raise")


def _group(failures: dict[int, BaseException]) -> BaseException:
    """Ray Train's error for these worker failures, as `trainer.fit()` raises it: pickled over from the controller
    (but for Ray's actor errors built here, whose protobuf context pickles only inside a Ray process)."""
    from ray.train import WorkerGroupError

    err = WorkerGroupError("\n".join(f"[Rank {r} Error Snippet]: Traceback ..." for r in failures), failures)
    return pickle.loads(pickle.dumps(err)) if all(_picklable(e) for e in failures.values()) else err


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.dumps(exc)
    except Exception:
        return False
    return True


def _actor_died() -> BaseException:
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    ctx = ActorDiedErrorContext(
        error_message="The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker "
        "exit detail: Worker unexpectedly exits with a connection error code 2. End of file.",
        class_name="RayTrainWorker", actor_id=bytes(16), pid=4242, node_ip_address="127.0.0.1")
    return WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: ...", failure=ActorDiedError(ctx))


# ------------------------------------------------------------------------------------------ pickling


class _OddInit(UserError, ValueError):
    """A user error whose constructor does not take its message."""

    def __init__(self, path: str, line: int) -> None:
        super().__init__(f"{path}: line {line} is bad")
        self.path, self.line = path, line


@pytest.mark.parametrize("exc", [
    ShardIntegrityError(SHA), ShardError("shard x: truncated"), CheckpointWriteError("writing checkpoint c failed"),
    CheckpointCorruptError("checkpoint c: model.safetensors is missing"), ConfigError("'train.lr' must be > 0"),
    UnknownKeyError("unknown config key(s) ['train.epoch']"), InputFileError("f.json: not valid JSON at line 2"),
    _OddInit("data.jsonl", 7), NonFiniteLossError("11 consecutive steps with a non-finite loss"),
    BadRecordsError([BadRecord("mentions.json", "m7", "no sentence")]),
])
def test_otmel_errors_pickle_round_trip_with_their_message(exc: BaseException) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and back.args == exc.args
    assert vars(back) == vars(exc)


def test_worker_errors_pickle_and_drop_a_cause_that_does_not() -> None:
    err = WorkerUserError(f"{SHA} (worker log: L)", cause=ShardIntegrityError(SHA), cause_type="ShardIntegrityError",
                          rank=0, log="L")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, UserError) and back.kind == "user" and str(back) == str(err)
    assert (back.rank, back.log, back.cause_type, str(back.cause)) == (0, "L", "ShardIntegrityError", SHA)
    odd = WorkerError("the worker of rank 1 died", cause=_actor_died(), rank=1, kind="ray")
    back = pickle.loads(pickle.dumps(odd))
    assert back.kind == "ray" and str(back) == "the worker of rank 1 died" and back.rank == 1


# ------------------------------------------------------------------------------ unwrapping the DataLoader's wrapping


def test_a_dataloader_worker_error_gets_back_its_own_class_and_message() -> None:
    wrapped = _in_loader(ShardIntegrityError(SHA))
    assert str(wrapped).startswith("Caught ShardIntegrityError in DataLoader worker process 0.")
    exc, name = unwrap_loader_error(wrapped)
    assert type(exc) is ShardIntegrityError and str(exc) == SHA and name == "ShardIntegrityError"
    # torch falls back to RuntimeError when the class cannot be built from one string: the class is found again
    bad = BadRecordsError([BadRecord("train.json", "m7", "missing or non-text field 'mention'")])
    exc, name = unwrap_loader_error(_in_loader(bad))
    assert type(exc) is BadRecordsError and str(exc) == str(bad) and name == "BadRecordsError"
    exc, name = unwrap_loader_error(_in_loader(json.JSONDecodeError("Expecting value", "{x", 1)))
    assert isinstance(exc, json.JSONDecodeError) and str(exc) == "Expecting value: line 1 column 2 (char 1)"
    exc, _ = unwrap_loader_error(_in_loader(KeyError("m_index")))
    assert type(exc) is KeyError and exc.args == ("m_index",)
    plain = ValueError("not wrapped")
    assert unwrap_loader_error(plain) == (plain, "ValueError")


# ----------------------------------------------------------------------------- through the console script


@pytest.fixture()
def fake_fit(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`otmel train` on the toy shards where `trainer.fit()` raises the given Ray Train error (no Ray started): the
    driver's own handling (`launch.run_trainer`) and the console script's report run as in a real run."""
    box: dict[str, BaseException] = {}

    class Trainer:
        def fit(self) -> None:
            raise box["error"]

    def fit(cfg: Any, run_name: str, *, show_epochs: bool = False) -> dict[str, Any]:
        return launch.run_trainer(Trainer(), cfg, run_name)

    monkeypatch.setattr(launch, "fit", fit)
    monkeypatch.delenv("OTMEL_DEBUG", raising=False)
    args = ["train", f"data.shards={toy}", f"run.storage={tmp_path}", "run.name=r"]

    def run(error: BaseException, *extra: str) -> int:
        box["error"] = error
        return cli_main([*args, *extra])

    run.log = tmp_path / "r" / "logs"  # type: ignore[attr-defined]
    return run


def _stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_worker_user_errors_are_the_drivers_line_with_the_log_and_exit_2(
        fake_fit: Any, capsys: pytest.CaptureFixture[str]) -> None:
    log0, log1 = fake_fit.log / "worker-rank0.log", fake_fit.log / "worker-rank1.log"
    nonfinite = ("11 consecutive steps with a non-finite loss (train.max_nonfinite_steps=10), the last at global step "
                 "42: {'loss': nan}")
    disk = ("writing checkpoint /runs/r/checkpoint_000001 failed on rank 1: No space left on device (OSError, errno "
            "28); the previous checkpoint is intact (files are written to temporary names and renamed)")
    cases = [
        ({0: _in_loader(ShardIntegrityError(SHA))}, f"{SHA} (worker log: {log0})"),  # integrity, data.integrity=fail
        ({0: _in_loader(json.JSONDecodeError("Expecting value", "{x", 1))},  # a bad record
         f"Expecting value: line 1 column 2 (char 1) (worker log: {log0})"),
        ({0: NonFiniteLossError(nonfinite)}, f"{nonfinite} (worker log: {log0})"),  # the non-finite-loss stop
        # a checkpoint write failure on rank 1; rank 0 meanwhile lost its peer in a collective
        ({0: RuntimeError("[gloo] Connection closed by peer"), 1: CheckpointWriteError(disk)},
         f"{disk} (worker log: {log1})"),
    ]
    for failures, line in cases:
        assert fake_fit(_group(failures)) == 2
        assert _stderr_line(capsys) == f"otmel train: error: {line}"


def test_a_bug_in_a_worker_is_an_internal_error_and_rays_failures_a_short_cause(
        fake_fit: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import InsufficientClusterResourcesError

    log0, log1 = fake_fit.log / "worker-rank0.log", fake_fit.log / "worker-rank1.log"
    assert fake_fit(_group({0: AttributeError("'NoneType' object has no attribute 'step'")})) == 1
    assert _stderr_line(capsys) == ("otmel train: internal error: AttributeError: 'NoneType' object has no attribute "
                                    f"'step' (worker log: {log0})")
    # rank 1's process died; rank 0 saw its collective fail: the death explains the run
    assert fake_fit(_group({0: RuntimeError("[gloo] Connection closed by peer"), 1: _actor_died()})) == 1
    line = _stderr_line(capsys)
    assert line.startswith("otmel train: Ray error: the Ray Train worker of rank 1 died: ActorDiedError: The actor "
                           "died unexpectedly before finishing this task. Worker unexpectedly exits with a connection "
                           "error code 2.") and line.endswith(f"(worker log: {log1})")
    from ray.exceptions import GetTimeoutError  # a TimeoutError (OSError), but Ray's own

    assert fake_fit(_group({0: GetTimeoutError("Get timed out: some object(s) not ready.")})) == 1
    assert _stderr_line(capsys) == ("otmel train: Ray error: the Ray Train worker of rank 0 failed: GetTimeoutError: "
                                    f"Get timed out: some object(s) not ready. (worker log: {log0})")
    need = ("Insufficient cluster resources to launch training workers. The worker group requires {'CPU': 8} but the "
            "cluster only has a maximum of {'CPU': 2} resources.")
    assert fake_fit(ControllerError(InsufficientClusterResourcesError(need))) == 1
    assert _stderr_line(capsys) == ("otmel train: Ray error: Ray Train stopped the run: InsufficientClusterResources"
                                    f"Error: {need} (driver log: {fake_fit.log}/driver.log)")
    # --verbose: the worker's output was on the console, there is no log to point at
    assert fake_fit(_group({0: CheckpointCorruptError("checkpoint c: state.json is missing")}), "--verbose") == 2
    assert _stderr_line(capsys) == "otmel train: error: checkpoint c: state.json is missing"


def test_debug_re_raises_chained_to_rays_error_and_other_errors_pass(fake_fit: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train import WorkerGroupError

    monkeypatch.setenv("OTMEL_DEBUG", "1")
    with pytest.raises(WorkerUserError, match="manifest says") as info:
        fake_fit(_group({0: ShardIntegrityError(SHA)}))
    assert isinstance(info.value.__cause__, WorkerGroupError) and isinstance(info.value.cause, ShardIntegrityError)
    assert worker_error(ValueError("not Ray's")) is None


# ------------------------------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_a_corrupt_training_shard_through_the_console_script(toy: Path, tmp_path: Path) -> None:
    """`otmel train` on a real 1-worker Ray Train run whose training shards fail their sha256 in the worker's
    DataLoader process (data.integrity=fail; the pre-flight size check passes): the shard's one line, exit 2."""
    shards = tmp_path / "shards"
    shutil.copytree(toy, shards)
    bad = shard_paths(shards, "train")
    for p in bad:  # same size, other bytes: only the worker's sha256 check can tell
        data = bytearray(p.read_bytes())
        data[700:1100] = bytes(b ^ 0xFF for b in data[700:1100])
        p.write_bytes(bytes(data))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled",
           "OTMEL_DEBUG": ""}
    env.pop("RAY_ADDRESS", None)
    args = [f"data.shards={shards}", "data.num_workers=1", "data.integrity=fail", "model.tiny_width=32",
            "model.hidden_dim=16", "model.tiny_image_size=32", "train.batch_size=2", "train.steps_per_epoch=2",
            "train.epochs=1", "train.strategy=ddp", "scaling.num_workers=1", "run.max_failures=0",
            "wandb.enabled=false", f"run.storage={tmp_path / 'runs'}", "run.name=rot"]
    out = subprocess.run([EXE, "train", *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    log = tmp_path / "runs" / "rot" / "logs" / "worker-rank0.log"
    said = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("otmel train:")]
    assert said[0].startswith("otmel train: started a local Ray of its own"), said  # which Ray, then the error
    lines = said[1:]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    names = "|".join(re.escape(str(p)) for p in bad)
    assert re.fullmatch(rf"otmel train: error: shard ({names}): sha256 [0-9a-f]{{12}}\.\.\., the manifest says "
                        rf"[0-9a-f]{{12}}\.\.\. \(corrupt or replaced; run `otmel verify`\) \(worker log: "
                        rf"{re.escape(str(log))}\)", lines[0]), lines[0]
    assert "Traceback" not in out.stderr and "WorkerGroupError" not in out.stderr
    assert "ShardIntegrityError" in log.read_text()  # the worker's traceback is in its log
