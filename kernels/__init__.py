"""Triton kernels with autograd, and the switch between them and their eager references.

Every op exists twice under the same name: here (Triton, forward and backward) and in ``kernels.reference``
(eager PyTorch). Model code asks ``ops(backend)`` once and calls ``ops.rms_norm(...)`` and friends, so it never
branches on the device itself.

On a CPU the Triton kernels run only under Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` before triton is first imported.
"""

import os
import types

import torch

from kernels import reference
from kernels.attention import flash_attention
from kernels.cross_entropy import cross_entropy
from kernels.linear_cross_entropy import fused_linear_cross_entropy
from kernels.rms_norm import rms_norm
from kernels.rope import apply_rope
from kernels.swiglu import swiglu

__all__ = [
    "apply_rope",
    "cross_entropy",
    "flash_attention",
    "fused_linear_cross_entropy",
    "ops",
    "reference",
    "resolve_backend",
    "rms_norm",
    "swiglu",
]

BACKENDS = ("auto", "triton", "eager")
_TRITON_OPS = types.SimpleNamespace(
    rms_norm=rms_norm,
    swiglu=swiglu,
    apply_rope=apply_rope,
    cross_entropy=cross_entropy,
    fused_linear_cross_entropy=fused_linear_cross_entropy,
    flash_attention=flash_attention,
)


def resolve_backend(choice: str, device: torch.device | str) -> str:
    """Map a config's kernels choice to "triton" or "eager": "auto" means Triton on CUDA and eager elsewhere."""
    if choice not in BACKENDS:
        raise ValueError(f"kernels must be one of {BACKENDS}, got {choice!r}")
    device = torch.device(device)
    if choice == "auto":
        return "triton" if device.type == "cuda" else "eager"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"kernels='triton' on a {device.type} device needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing triton, or use kernels='eager'"
        )
    return choice


def ops(backend: str):
    """The namespace of ops for a resolved backend ("triton" or "eager"), all with the same names and signatures."""
    if backend == "triton":
        return _TRITON_OPS
    if backend == "eager":
        return reference
    raise ValueError(f"backend must be 'triton' or 'eager', got {backend!r}")
