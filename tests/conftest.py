"""Test setup: everything runs offline and on CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Set before any test module imports transformers / wandb / deepspeed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A Ray cluster the user (or a `ray job submit`) pointed this shell at is not the tests' business: every test starts
# the Ray it needs (a local one of its own: otmel.ray_runtime.start_ray, tests/ray_helpers.local_ray).
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402
import torch  # noqa: E402

# 2 cores: one torch thread per process when scripts/test.sh runs two pytest processes side by side, 2 alone
torch.set_num_threads(int(os.environ.get("OTMEL_TEST_THREADS", "2")))

# The longest modules first (README, "seconds per test module"), the rest in file order: a fixed order.
LONGEST_FIRST = ("test_train_ray.py", "test_serve.py", "test_node_loss.py", "test_local_autoscaler.py",
                 "test_tune_ray.py", "test_worker_errors.py", "test_ray_already_there.py", "test_elastic.py",
                 "test_link_cli.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module and among the others is kept


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield
    # Linker / evaluate turn on flush-to-zero for the thread (faster Sinkhorn on CPU); the next test of this process
    # (e.g. hypothesis, which checks for subnormal floats) starts without it
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def pre():  # type: ignore[no-untyped-def]
    """A small preprocessor (16 px images, 10 tokens) over the locally built test tokenizer."""
    from data_fixtures import make_tokenizer

    from otmel.data.transforms import Preprocessor

    return Preprocessor(make_tokenizer(), image_size=16, max_len=10)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The small cleaned-layout dataset of data_fixtures, packed 2 samples a shard."""
    from data_fixtures import write_cleaned

    from otmel.data.pack import pack

    root = tmp_path_factory.mktemp("toy")
    write_cleaned(root / "src")
    pack(root / "src", "cleaned", root / "shards", shard_size=2, progress=False)
    return root / "shards"


# ---------------------------------------------------------------------------------------------- timing
# Every run ends with the time each test module took (setup + call + teardown of its tests, module fixtures
# included), longest first: the figures README's test section quotes.
_module_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = report.nodeid.split("::", 1)[0]
    _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _module_seconds:
        return
    terminalreporter.section("seconds per test module")
    total = sum(_module_seconds.values())
    for module, secs in sorted(_module_seconds.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{secs:8.1f} s  {100 * secs / total:5.1f}%  {module}")
    terminalreporter.write_line(f"{total:8.1f} s  in all")
