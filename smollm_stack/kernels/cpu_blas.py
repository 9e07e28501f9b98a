"""x @ W^T on a CPU through the faster of two BLAS libraries: torch's (Intel's MKL) or numpy's OpenBLAS on AMD CPUs.

torch's x86 wheels multiply fp32 matrices with MKL, which is slower on AMD CPUs than OpenBLAS (numpy's BLAS). On this
project's 2-core AMD EPYC (Zen 3 at 2.45 GHz, AVX2: 2 cores x 32 FLOP/cycle = 157 GFLOP/s), in turns on two
threads (``python -m smollm_stack.bench.cpu_blas``), MKL ran the 17M preset's products (every side 512 or more) at
65-119 GFLOP/s and OpenBLAS at 82-128, 1.07-1.56x product by product; with a side of 128, the tiny preset's width,
OpenBLAS made 0.67-1.03x MKL's rate. So only products whose sides are all at least MIN_SIDE take OpenBLAS, and only
on AMD CPUs (bench/RESULTS.md, "Matrix products on the CPU").

Threads. OpenBLAS keeps a pool of its own whose threads spin after each call, and they slowed torch's ops between
the products (a 17M step's time outside the matmuls, 520 -> 800 ms); so OpenBLAS is held to one thread and the rows
of each product are split over ``torch.get_num_threads()`` threads of ours (numpy releases the GIL). The split
depends only on the shapes and the thread count, so a run rounds the same way each time and a CPU resume stays
bitwise. ``$SMOLLM_CPU_BLAS`` (auto, torch, openblas) or ``route(...)`` overrides the choice; "openblas" also takes
small products, which is what the tests use.
"""

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from smollm_stack.kernels._utils import Choice

ROUTES = ("auto", "torch", "openblas")
MIN_SIDE = 256  # between the tiny preset's width (128: MKL's) and the 17M's (512: OpenBLAS's)
MIN_ROWS_PER_THREAD = 64  # below this a thread's share of rows is not worth the hand-off

# $SMOLLM_CPU_BLAS, or ``with route(name):``: "auto" (OpenBLAS for large products on AMD), "torch", "openblas".
_ROUTE = Choice("SMOLLM_CPU_BLAS", "route", ROUTES, "auto")
route = _ROUTE.override
_pools: dict = {}


@functools.cache
def _amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:  # not Linux: no vendor to read, keep torch's BLAS
        return False


@functools.cache
def _openblas() -> bool:
    """Whether numpy multiplies through OpenBLAS; if so, hold it to one thread (we split the rows ourselves)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    np.ones(1) @ np.ones(1)  # numpy loads its BLAS on first use
    blas = ThreadpoolController().select(internal_api="openblas")
    if not blas.lib_controllers:
        return False
    blas.limit(limits=1)
    return True


def _use_openblas(t: torch.Tensor, m: int, k: int, n: int) -> bool:
    """Whether an (m, k) @ (k, n) product on ``t``'s device and dtype goes to OpenBLAS under the current route."""
    route_now = _ROUTE.value()
    if route_now == "torch" or t.device.type != "cpu" or t.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False  # autocast picks its own dtype, and compiled graphs keep torch's ops
    if route_now == "auto" and not (min(m, k, n) >= MIN_SIDE and _amd_cpu()):
        return False
    if not _openblas():
        if route_now == "openblas":
            raise RuntimeError("route 'openblas' needs numpy built with OpenBLAS and the threadpoolctl package")
        return False
    return True


def _blas_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view BLAS can read directly (row- or column-major), copying only other strides."""
    t = t.detach()
    return (t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()).numpy()


def _pool(workers: int) -> ThreadPoolExecutor:
    key = (os.getpid(), workers)  # a forked child has none of its parent's threads
    if key not in _pools:
        _pools.clear()
        _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="cpu-blas")
    return _pools[key]


def _openblas_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in OpenBLAS, one block of a's rows per thread; this thread takes the first block."""
    m = a.shape[0]
    out = torch.empty(m, b.shape[1], dtype=a.dtype)
    A, B, C = _blas_array(a), _blas_array(b), out.numpy()
    n = max(1, min(torch.get_num_threads(), m // MIN_ROWS_PER_THREAD))
    blocks = [slice(i * m // n, (i + 1) * m // n) for i in range(n)]
    with torch.profiler.record_function("cpu_blas::mm"):  # numpy's time, visible to torch's profiler
        others = [_pool(n - 1).submit(np.matmul, A[s], B, out=C[s]) for s in blocks[1:]] if n > 1 else []
        np.matmul(A[blocks[0]], B, out=C[blocks[0]])
        for f in others:
            f.result()
    return out


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of 2-D tensors (no autograd), through OpenBLAS where the route says so."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"mm needs (m, k) @ (k, n); got {tuple(a.shape)} @ {tuple(b.shape)}")
    if not (b.dtype == a.dtype and _use_openblas(a, *a.shape, b.shape[1])):
        return torch.mm(a, b)
    return _openblas_mm(a, b)


class _Linear(torch.autograd.Function):
    """y = x W^T in OpenBLAS (``linear`` chose it); backward dx = dy W and dW = dy^T x, each through ``mm``."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _openblas_mm(x.reshape(-1, x.shape[-1]), weight.t()).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1])
        dx = mm(dy, weight).reshape(x.shape) if ctx.needs_input_grad[0] else None
        dw = mm(dy.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without a bias: x (..., in), weight (out, in); through OpenBLAS where that is faster."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"linear needs x (..., in) and weight (out, in); got {tuple(x.shape)}, {tuple(weight.shape)}")
    if weight.dtype == x.dtype and _use_openblas(x, x.numel() // max(1, x.shape[-1]), *weight.shape[::-1]):
        return _Linear.apply(x, weight)
    return F.linear(x, weight)
