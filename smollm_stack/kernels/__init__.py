"""Triton kernels with autograd, their fast eager twins, and the switch between them.

Every op exists three times under the same name and signature: in the Triton modules of this package (forward and
backward kernels), in ``kernels.eager`` (PyTorch's best built-in ops: what the model runs without Triton) and in
``kernels.reference`` (the obviously-correct fp32/fp64 oracle of the tests, the preflight and the benchmarks'
correctness checks). Model code asks ``ops(backend)`` once and calls ``ops.rms_norm(...)`` and friends, so it never
branches on the device itself. The products outside that scheme, ``linear`` (x W^T) and ``stacked_linear``
(several of them on one x: one GEMM on a per-step copy of the weights), have no Triton kernel: they are the
vendor's BLAS on every device, with ``kernels.cpu_blas`` choosing between two on a CPU.

Triton is imported only if it is installed, so the eager path, and everything built on it, works where triton has
no wheels (macOS, Windows); asking for the Triton backend there raises a RuntimeError that says so. On a CPU the
Triton kernels run only under Triton's interpreter, which must be switched on with ``TRITON_INTERPRET=1`` before
triton is first imported.
"""

import os
import types

import torch

from smollm_stack.kernels import eager, reference
from smollm_stack.kernels._utils import INTERPRET
from smollm_stack.kernels.cpu_blas import linear
from smollm_stack.kernels.stacked_linear import stacked_linear

__all__ = [
    "add_rms_norm",
    "apply_rope",
    "apply_rope_qk",
    "cross_entropy",
    "eager",
    "flash_attention",
    "fused_linear_cross_entropy",
    "linear",
    "ops",
    "reference",
    "resolve_backend",
    "rms_norm",
    "rope_flash_attention",
    "stacked_linear",
    "swiglu",
    "triton_available",
]

BACKENDS = ("auto", "triton", "eager")


try:
    import triton  # noqa: F401
except ImportError:  # off Linux there are no triton wheels: the eager backend is all there is
    triton = None

_TRITON_OPS = _TRITON_OPS_BELOW_SM80 = None
if triton is not None:
    from smollm_stack.kernels.attention import flash_attention
    from smollm_stack.kernels.cross_entropy import cross_entropy
    from smollm_stack.kernels.linear_cross_entropy import fused_linear_cross_entropy
    from smollm_stack.kernels.rms_norm import add_rms_norm, rms_norm
    from smollm_stack.kernels.rope import apply_rope, apply_rope_qk
    from smollm_stack.kernels.rope_attention import rope_flash_attention
    from smollm_stack.kernels.swiglu import swiglu

    _TRITON_OPS = types.SimpleNamespace(
        rms_norm=rms_norm,
        add_rms_norm=add_rms_norm,
        swiglu=swiglu,
        apply_rope=apply_rope,
        apply_rope_qk=apply_rope_qk,
        cross_entropy=cross_entropy,
        fused_linear_cross_entropy=fused_linear_cross_entropy,
        flash_attention=flash_attention,
        rope_flash_attention=rope_flash_attention,
    )
    # Triton 3.9 gives sm_75 no tensor-core layout for tl.dot: attention's dots lower to FMA and spill hundreds of
    # registers (bench/RESULTS.md, "Static report per architecture"), so below capability 8.0 the Triton backend takes
    # attention from the eager ops (SDPA); the memory-bound kernels, which have no dots, pass there as everywhere.
    _TRITON_OPS_BELOW_SM80 = types.SimpleNamespace(**{**vars(_TRITON_OPS), "flash_attention": eager.flash_attention,
                                                          "rope_flash_attention": eager.rope_flash_attention})
TENSOR_CORE_DOTS = (8, 0)  # the capability from which Triton puts tl.dot on tensor cores


def triton_available() -> bool:
    return _TRITON_OPS is not None


def _require_triton():
    if _TRITON_OPS is None:
        raise RuntimeError(
            "backend='triton' needs the triton package, which is not installed (it has wheels for Linux only): "
            "`pip install triton` on Linux, or use backend='eager'"
        )


def resolve_backend(choice: str, device: torch.device | str) -> str:
    """Map a config's backend choice to "triton" or "eager": "auto" means Triton on CUDA (if installed), else eager."""
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    device = torch.device(device)
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "eager"
    if choice == "triton":
        _require_triton()
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' on a {device.type} device needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing triton, or use backend='eager'"
        )
    return choice


def ops(backend: str, device: torch.device | str | None = None):
    """The namespace of ops for a resolved backend ("triton" or "eager"), all with the same names and signatures;
    on a CUDA ``device`` below TENSOR_CORE_DOTS, Triton's with the eager attention."""
    if backend == "triton":
        _require_triton()
        if not torch.cuda.is_available() and not INTERPRET:  # else Triton's own "0 active drivers" at the first call
            raise RuntimeError(
                "kernels.ops('triton') without a CUDA GPU runs on Triton's interpreter: set TRITON_INTERPRET=1 in "
                "the environment before triton is imported (`TRITON_INTERPRET=1 python ...`), or use ops('eager')"
            )
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda and torch.cuda.get_device_capability(device) < TENSOR_CORE_DOTS:
            return _TRITON_OPS_BELOW_SM80
        return _TRITON_OPS
    if backend == "eager":
        return eager
    raise ValueError(f"backend must be 'triton' or 'eager', got {backend!r}")
