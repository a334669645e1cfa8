"""The `otmel` console script."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from otmel.cli import main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("synth", "pack", "verify", "train", "baseline"):
        assert cmd in out


def test_console_script_is_installed() -> None:
    exe = shutil.which("otmel") or str(Path(sys.executable).parent / "otmel")
    out = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--resume" in out.stdout


def test_import_otmel_stays_light_and_knows_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    code = ("import sys, importlib.metadata, otmel; assert 'torch' not in sys.modules and 'ray' not in sys.modules; "
            "assert otmel.__version__ == importlib.metadata.version('otmel'), otmel.__version__")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"otmel {importlib.metadata.version('otmel')}"


def test_train_rejects_a_mistyped_key_before_starting_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "train.epoch=2"]) == 2
    assert "'train.epoch'" in capsys.readouterr().err
