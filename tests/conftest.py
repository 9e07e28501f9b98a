"""Shared test set-up: without CUDA, Triton kernels run on Triton's interpreter, which must be on before import."""

import json
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:  # off Linux triton has no wheels: its kernels' tests have nothing to run
    collect_ignore_glob = ["test_attention*.py", "test_kernels*.py", "test_sm90*.py"]


# Appended to a compile_for_sm90 script: lowers its CASES (a dict of label -> callable, every case or one worker's
# share) each under its own sm90.compile_only() and prints the launches as one JSON line.
_SM90_RUNNER = """
import json as _json, os as _os
from kernels import sm90 as _sm90
_worker, _workers = map(int, _os.environ["SM90_WORKER"].split("/"))
_out = {}
for _label in sorted(CASES)[_worker::_workers]:
    with _sm90.compile_only() as _launches:
        CASES[_label]()
    _out[_label] = [_sm90.record(_launch) for _launch in _launches]
print(_json.dumps(_out))
"""


@pytest.fixture(scope="session")
def compile_for_sm90():
    """Lowers kernels for an H100 (sm_90a) through Triton's real JIT launch path and ptxas, no GPU needed.

    run(script, workers=1) runs `script`, which must define CASES = {label: callable}, in `workers` parallel
    subprocesses with the interpreter off; each callable launches kernels normally (e.g. an op's forward and
    backward on CPU stand-in tensors) under kernels.sm90.compile_only(), so arguments are specialized exactly as on
    a GPU and nothing runs. Returns {label: [sm90.record(launch), ...]}. Subprocesses, because the interpreter,
    switched on for the other tests, patches triton.language at import.
    """
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")

    def run(script: str, workers: int = 1) -> dict[str, list[dict]]:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today, set to silence the warning of newer tritons
        source = script + _SM90_RUNNER
        procs = [subprocess.Popen([sys.executable, "-c", source], env={**env, "SM90_WORKER": f"{i}/{workers}"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(workers)]
        out = {}
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=1200)
            assert proc.returncode == 0, stderr[-4000:]
            out.update(json.loads(stdout.strip().splitlines()[-1]))
        return out

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
