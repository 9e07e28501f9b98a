"""The floating-point format a run computes in, chosen by what the device can do, and fp16's loss scaling.

``--dtype auto`` is bf16 autocast on a GPU with bf16 tensor cores (CUDA capability 8.0 and up: A100, RTX 30xx and
40xx, L4, H100), fp16 autocast below it (T4, V100), and fp32 on a CPU. Parameters and optimizer state stay fp32
under either autocast.

fp16 has more precision than bf16 (10 mantissa bits to 7) but 5 exponent bits instead of 8: a gradient below 2^-24
(6e-8) flushes to zero and one above 65504 overflows. So fp16 scales the loss before backward
(``torch.amp.GradScaler``): the gradients come out multiplied by the scale, are divided by it again before clipping
and the optimizer step, and a step whose gradients hold an inf or NaN is skipped while the scale halves; after
``growth_interval`` clean steps the scale doubles. bf16 and fp32 need none of this: their scaler is disabled, and
each of its calls passes straight through. The scaler's state (scale and clean-step count) goes into every
checkpoint, so a resumed run continues bitwise.
"""

from contextlib import nullcontext

import torch

DTYPES = ("auto", "bfloat16", "float16", "float32")
BF16_CAPABILITY = (8, 0)  # Ampere: the first tensor cores with bf16


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The compute dtype of ``--dtype choice`` on ``device``; ValueError naming the flag for one it cannot run."""
    if choice not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {choice!r}")
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if choice == "auto":
        if capability is None:
            return torch.float32
        return torch.bfloat16 if capability >= BF16_CAPABILITY else torch.float16
    if choice == "bfloat16" and capability is not None and capability < BF16_CAPABILITY:
        raise ValueError(
            f"--dtype bfloat16: {torch.cuda.get_device_name(device)} (capability {capability[0]}.{capability[1]}) "
            "has no bf16 tensor cores; use --dtype float16 (with loss scaling) or auto"
        )
    return getattr(torch, choice)


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` for the forward (nothing for fp32)."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16; for bf16 and fp32 a disabled scaler whose calls pass through."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
