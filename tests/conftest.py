"""Shared test set-up: Triton's interpreter without CUDA (on before any import of triton), the tolerance table and
the output poisoning of the kernel tests, the tiny run every trainer test starts from, and the shared fixtures."""

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
    collect_ignore_glob = ["test_attention*.py", "test_kernels*.py", "test_lowering*.py"]


# ---- tolerances: one row per dtype, used by every kernel test -----------------------------------------------------
# u, the unit roundoff: one rounding to the dtype errs by at most u relative (half an ulp at 1).
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# A kernel and its reference compute the same math in another order, so their results differ by a few roundings:
# rtol is a few u of each element, atol the same relative to the expected tensor's largest magnitude (an element near
# zero that came from cancelling larger terms, a matmul or a sum over rows, may be off by an ulp of those terms).
#   fp32: rtol 1.3e-6 (22 u) and atol 2e-6 (34 u): the order of fp32 accumulations over up to ~10^3 terms whose
#         partial sums stay near the result's size, a few ulps.
#   fp16, bf16: the fp32 result is rounded once to the dtype on each side: adjacent values at worst, 1 ulp = 2 u.
# An op whose analysis finds k roundings on its path where these rows count one passes roundings=k (and says why);
# never widened to make a test pass.
TOLERANCES = {
    torch.float32: (1.3e-6, 2e-6),  # (rtol, atol relative to max|expected|)
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def tolerance(dtype: torch.dtype, roundings: float = 1) -> tuple[float, float]:
    """(rtol, atol) of dtype's row for an op with `roundings` times the row's roundings on its path."""
    rtol, atol = TOLERANCES[dtype]
    return roundings * rtol, roundings * atol


def assert_close(actual, expected, dtype: torch.dtype, roundings: float = 1, scale: float | None = None, msg=None):
    """actual vs expected within dtype's row; atol is relative to scale, by default max|expected| (at least 1e-3)."""
    rtol, atol = tolerance(dtype, roundings)
    scale = max(expected.abs().max().item(), 1e-3) if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=msg)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so an element a kernel never writes fails the comparison.

    Kernel test modules switch it on for all their tests with ``pytestmark = pytest.mark.usefixtures(...)``."""
    from smollm_stack.kernels import _utils

    monkeypatch.setattr(_utils, "POISON", True)


# ---- the tiny run -------------------------------------------------------------------------------------------------
# The trainer tests' model and run, seconds on one CPU thread: a 2-layer d_model 32 model on the `tokens` fixture's
# vocab-64 data, 16-token windows. Each test module sets its own steps and intervals on top.
TINY = dict(
    vocab_size=64,
    context_length=16,
    batch_size=4,
    warmup_steps=2,
    decay_fraction=0.2,  # where the step counts of the tests' checkpoints and logged rows were worked out
    eval_batches=2,
    sample_tokens=0,
    progress=False,
    device="cpu",
    threads=1,  # tiny matmuls: a second thread only adds contention
    model_args=dict(d_model=32, num_layers=2, num_heads=2),
)


def as_flags(fields: dict) -> list[str]:
    """TrainConfig fields as `smollm train` flags: model_args as model flags, booleans as --x / --no-x."""
    fields = {**fields, **fields.get("model_args", {})}
    fields.pop("model_args", None)
    flags = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return flags


# Appended to a compile_for_gpu script: each worker takes the next case no other worker has claimed (a file made
# with O_EXCL in LOWER_CLAIMS), lowers it under its own lowering.compile_only(), and prints its launches as one JSON
# line. Taking cases as they come keeps both cores busy when cases differ in cost (a backward compiles twice the
# kernels). A case whose label starts with a target's name ("sm_80 ...") is lowered for that target.
_LOWER_RUNNER = """
import json as _json, os as _os
from smollm_stack.kernels.tooling import lowering as _lowering
_out = {}
for _i, _label in enumerate(sorted(CASES)):
    try:
        _os.close(_os.open(_os.path.join(_os.environ["LOWER_CLAIMS"], str(_i)), _os.O_CREAT | _os.O_EXCL))
    except FileExistsError:
        continue
    _target = _label.split()[0] if _label.split()[0] in _lowering.DEVICES else _os.environ["LOWER_TARGET"]
    with _lowering.compile_only(_lowering.DEVICES[_target]) as _launches:
        CASES[_label]()
    _out[_label] = [_lowering.record(_launch) for _launch in _launches]
print(_json.dumps(_out))
"""
LOWER_WORKERS = min(os.cpu_count() or 1, 4)  # compiles are single-threaded: one process a core


@pytest.fixture(scope="session")
def compile_for_gpu(tmp_path_factory):
    """Lowers kernels for an NVIDIA target (default sm_90a) through Triton's real JIT launch path and ptxas, no GPU.

    run(script, target) runs `script` (a file's text: it may define kernels), which must define CASES = {label:
    callable}, in LOWER_WORKERS parallel subprocesses with the interpreter off; each callable launches kernels normally
    (e.g. an op's forward and backward on CPU stand-in tensors) under kernels.tooling.lowering.compile_only() for
    `target`'s card (or the target its label starts with), so arguments are specialized exactly as on a GPU and nothing
    runs. Returns {label: [lowering.record(launch), ...]}. Subprocesses, because the interpreter, switched on for the
    other tests, patches triton.language at import.
    """
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")

    def run(script: str, target: str = "sm_90a") -> dict[str, list[dict]]:
        work = tmp_path_factory.mktemp("lower")
        (work / "claims").mkdir()
        (work / "cases.py").write_text(script + _LOWER_RUNNER)  # a file: @triton.jit reads its kernels' source
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today, set to silence the warning of newer tritons
        env.update(LOWER_CLAIMS=str(work / "claims"), LOWER_TARGET=target)
        procs = [subprocess.Popen([sys.executable, work / "cases.py"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(LOWER_WORKERS)]  # fmt: skip
        out = {}
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=1200)
            assert proc.returncode == 0, stderr[-4000:]
            out.update(json.loads(stdout.strip().splitlines()[-1]))
        assert len(out) == len(list((work / "claims").iterdir())), "a claimed case came back from no worker"
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
