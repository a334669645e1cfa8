"""Every class of user error, through the real console script: one line `otmel CMD: error: ...` on stderr, exit
status 2, no traceback, and nothing started (the errors are raised while the config is loaded, before Ray)."""

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
def test_config_errors_are_one_line_with_exit_2(args: list[str], needle: str) -> None:
    out = _run(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"otmel {args[0]}: error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "ray" not in out.stdout.lower()


def test_malformed_files_are_named_with_their_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\nx}')
    out = _run("pack", str(bad), "--format", "melbench", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and f"{bad}: not valid JSON at line 2, column 1" in out.stderr
    yml = tmp_path / "bad.yaml"
    yml.write_text("train:\n  epochs: [1,\n")
    out = _run("train", "--config", str(yml))
    assert out.returncode == 2 and f"config file {yml} line" in out.stderr and "not valid YAML" in out.stderr


def test_debug_shows_the_traceback() -> None:
    for env, flag in (({}, ["--debug"]), ({"OTMEL_DEBUG": "1"}, [])):
        out = _run(*flag, "train", "train.epoch=3", env=env)
        assert out.returncode != 0 and "Traceback" in out.stderr and "UnknownKeyError" in out.stderr
