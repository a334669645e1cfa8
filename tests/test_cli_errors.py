"""Every class of user error: one line `otmel CMD: error: ...` on stderr, exit status 2, no traceback, and nothing
started (the errors are raised while the config is loaded, before Ray). Each class through `otmel.cli.main` (the
console script's entry point) in this process, and the console script itself as a subprocess once per behaviour."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("otmel") or str(Path(sys.executable).parent / "otmel")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OTMEL_DEBUG": "", **(env or {})})


@pytest.mark.parametrize(("args", "needle"), [
    (["train", "train.epoch=3"], "unknown config key(s) ['train.epoch'] (did you mean 'train.epochs'?)"),
    (["train", "model.hiden_dim=3"], "(did you mean 'model.hidden_dim'?)"),
    (["train", "model.variant=OTT"], "unknown variant 'OTT' (did you mean 'OT'?)"),
    (["train", "train.batch_size=0"], "'train.batch_size' must be >= 1, got 0"),
    (["train", "scaling.num_workers=0"], "'scaling.num_workers' must be >= 1"),
    (["train", "train.lr=fast"], "config key 'train.lr': 'fast' is not a number"),
    (["train", "train.strategy=horovod"], "'horovod' is not one of ['deepspeed', 'ddp']"),
    (["train", "model.variant=A1", "model.kd=kl"], "distillation (kd) needs an OT teacher"),
    (["train", "--config", "configs/nope.yaml"], "config file configs/nope.yaml does not exist"),
    (["train", "train.deepspeed_config=configs/deepspeed/nope.json"], "configs/deepspeed/nope.json does not exist"),
    (["study", "--name", "x", "--variants", "OT", "model.reg=-1"], "'model.reg' must be a positive number"),
])
def test_config_errors_are_one_line_with_exit_2(args: list[str], needle: str, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from otmel.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("OTMEL_DEBUG", raising=False)
    assert main(args) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"otmel {args[0]}: error: ") and needle in lines[0], out.err
    assert "Traceback" not in out.err and "ray" not in out.out.lower() and not ray.is_initialized()


def test_the_console_script_reports_a_config_error_in_one_line() -> None:
    out = _run("train", "train.epoch=3")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otmel train: error: unknown config key(s) ['train.epoch']"), lines
    assert "(did you mean 'train.epochs'?)" in lines[0]
    assert "Traceback" not in out.stderr and "ray" not in out.stdout.lower()


def test_malformed_files_are_named_with_their_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from otmel.cli import main

    monkeypatch.delenv("OTMEL_DEBUG", raising=False)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\nx}')
    assert main(["pack", str(bad), "--format", "melbench", "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: not valid JSON at line 2, column 1" in capsys.readouterr().err
    yml = tmp_path / "bad.yaml"
    yml.write_text("train:\n  epochs: [1,\n")
    assert main(["train", "--config", str(yml)]) == 2
    err = capsys.readouterr().err
    assert f"config file {yml} line" in err and "not valid YAML" in err


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from otmel.cli import main
    from otmel.errors import UnknownKeyError

    out = _run("--debug", "train", "train.epoch=3")  # the console script prints the traceback
    assert out.returncode != 0 and "Traceback" in out.stderr and "UnknownKeyError" in out.stderr
    monkeypatch.setenv("OTMEL_DEBUG", "1")  # the variable does what the flag does: the error is raised, not reported
    with pytest.raises(UnknownKeyError):
        main(["train", "train.epoch=3"])
