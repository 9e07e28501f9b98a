"""The harness itself, run with the suites (the README's test command, which times nothing, stays as it was): every
suite collects, and a ratio check fails when one of ours is made slower on purpose (--slow-provider)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pytest(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_the_suites_collect():
    out = _pytest("benchmarks", "--collect-only", "-q", "--ignore", "benchmarks/test_harness.py")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("test_tokenizer.py::test_encode", "test_eager.py::test_step", "test_gpu.py::test_kernel"):
        assert name in out.stdout


def test_a_ratio_check_fails_when_ours_is_slowed(tmp_path):
    out = _pytest("benchmarks/test_tokenizer.py", "-k", "encode", "--slow-provider", "encode_ours=0.4",
                  "--benchmark-storage", f"file://{tmp_path}", "-q")  # fmt: skip
    assert out.returncode == 1, out.stdout[-3000:]
    assert "tokenizer-encode: encode_ours ran" in out.stdout and "below its floor of 1.5x" in out.stdout
    assert "1 failed" in out.stdout and not list(tmp_path.iterdir())  # nothing saved without --benchmark-autosave
