"""The pytest-benchmark suites' shared parts: each race's medians, the ratio checks, the records folder, and a way to
see a check fail.

    python -m pytest benchmarks --benchmark-autosave            # CPU suites, a few minutes on 2 cores
    python -m pytest benchmarks/test_gpu.py --benchmark-autosave  # the GPU suite (skipped without CUDA)

A race is a benchmark group in which ours and its baseline run the same input in the same session; what decides is
their ratio (``check_ratio``), never an absolute time, which moves 10-20% between runs on a shared 2-core machine.
Saved runs go to ``smollm_stack/bench/records/`` (one JSON per machine, date and commit, pytest-benchmark's format);
``pytest-benchmark compare A B --group-by group`` turns two of them into a table, and ``--benchmark-compare`` reports
drift against one without failing on noise. ``--slow-provider encode_ours=0.5`` adds half a second to every call of
one provider: the ratio check that guards it must then fail (the README shows it).
"""

import time
from pathlib import Path

import pytest

RECORDS = Path(__file__).resolve().parents[1] / "smollm_stack" / "bench" / "records"
DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's own default: ours, unless one is given
MEDIANS: dict[tuple[str, str], float] = {}  # (group, provider) -> median seconds per call, this session


def pytest_addoption(parser):
    parser.addoption("--slow-provider", action="append", default=[], metavar="PROVIDER=SECONDS",
                     help="sleep SECONDS more in every call of PROVIDER (to see a ratio check fail)")  # fmt: skip


def pytest_configure(config):
    if config.option.benchmark_storage == DEFAULT_STORAGE:  # (runs before the plugin's own configure)
        config.option.benchmark_storage = f"file://{RECORDS}"


def _slowed(fn, provider: str, config):
    delays = dict(item.split("=", 1) for item in config.getoption("slow_provider"))
    if provider not in delays:
        return fn

    def slow(*args):
        time.sleep(float(delays[provider]))
        return fn(*args)

    return slow


@pytest.fixture
def race(benchmark, request):
    """race(group, provider, fn, rounds=..., **extra_info): time ``fn()`` as one entrant of ``group``."""

    def run(group: str, provider: str, fn, rounds: int = 5, warmup: int = 1, median: float | None = None, **extra):
        benchmark.group = group
        benchmark.extra_info.update(provider=provider, **extra)
        result = benchmark.pedantic(_slowed(fn, provider, request.config), rounds=rounds, warmup_rounds=warmup)
        if median is None and benchmark.stats is not None:  # (None under --benchmark-disable)
            median = benchmark.stats.stats.median
        if median is not None:
            MEDIANS[group, provider] = median
        return result

    run.benchmark = benchmark  # for extra_info a suite adds after the round
    return run


def check_ratio(group: str, ours: str, baseline: str, floor: float):
    """Fail unless ``ours`` ran at least ``floor`` times as fast as ``baseline`` in this session's ``group``."""
    if (group, ours) not in MEDIANS or (group, baseline) not in MEDIANS:
        pytest.skip(f"{group}: {ours} and {baseline} did not both run in this session")
    ratio = MEDIANS[group, baseline] / MEDIANS[group, ours]
    print(f"{group}: {ours} {ratio:.2f}x {baseline} (floor {floor}x)")
    assert ratio >= floor, f"{group}: {ours} ran {ratio:.2f}x {baseline}, below its floor of {floor}x"
