"""Shared test set-up: without CUDA, Triton kernels run on Triton's interpreter, which must be on before import."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def compile_for_sm90():
    """Runs a script that lowers kernels for an H100 (sm_90) through Triton's real compiler and ptxas, no GPU needed.

    The interpreter accepts things the compiler rejects, so CI lowers each kernel as a GPU launch would. It runs in a
    subprocess because the interpreter, switched on for the other tests, patches triton.language. Returns stdout.
    """
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")

    def run(script: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today, set to silence the warning of newer tritons
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    return run


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> tuple[str, str]:
    """Train/val .npy splits (vocab 64) of a noisy periodic sequence: learnable, so a trainer's loss clearly falls."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    period = rng.integers(0, 64, size=97)
    for name, repeats in (("train", 40), ("val", 4)):
        seq = np.tile(period, repeats)
        noise = rng.random(len(seq)) < 0.1
        seq[noise] = rng.integers(0, 64, size=noise.sum())
        np.save(root / f"{name}.npy", seq.astype(np.uint16))
    return str(root / "train.npy"), str(root / "val.npy")
