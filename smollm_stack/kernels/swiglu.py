"""SwiGLU's gate: y = silu(g) * u = g * sigmoid(g) * u, fused forward and backward.

Backward, with s = sigmoid(g):
    du = dy * g * s
    dg = dy * u * s * (1 + g * (1 - s))

Eager PyTorch runs sigmoid, two multiplies (and autograd saves their intermediates), so the forward moves about
5 tensors' worth of bytes instead of 3 (read g and u, write y) and the backward about 10 instead of 5 (read dy,
g, u, write dg, du). Here s is recomputed in the backward rather than saved: one exp costs less than a round
trip through memory.

Both directions are torch.library custom ops (smollm_stack::swiglu, smollm_stack::swiglu_backward) with fake
implementations and autograd, so torch.compile traces through them without a graph break.
"""

import torch
import triton
import triton.language as tl

from smollm_stack.kernels import _utils


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr,  # gate, contiguous
    u_ptr,  # up, contiguous, same shape
    y_ptr,  # output
    n_elements,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    n_elements,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    du = dy * g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)


# 2048 elements x 2 B = 4 KiB per tensor per program: wide enough for 16 B loads on every thread of 4 warps.
BLOCK = 2048


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Launch the forward on contiguous 1-D views; returns y."""
    y = _utils.empty(g.shape, g.dtype, g.device)
    n = g.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, y, n, BLOCK=BLOCK, num_warps=_utils.num_warps_for(BLOCK))
    return y


def swiglu_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward on contiguous 1-D views; returns (dg, du)."""
    dg = _utils.empty(g.shape, g.dtype, g.device)
    du = _utils.empty(u.shape, u.dtype, u.device)
    n = g.numel()
    grid = (triton.cdiv(n, BLOCK),)
    _swiglu_bwd_kernel[grid](dy, g, u, dg, du, n, BLOCK=BLOCK, num_warps=_utils.num_warps_for(BLOCK))
    return dg, du


@torch.library.custom_op("smollm_stack::swiglu", mutates_args=())
def _swiglu_op(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(g, u)


@_swiglu_op.register_fake
def _(g, u):
    return torch.empty_like(g)


@torch.library.custom_op("smollm_stack::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_backward(dy, g, u)


@_swiglu_backward_op.register_fake
def _(dy, g, u):
    return torch.empty_like(g), torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    g, u = ctx.saved_tensors
    return _swiglu_backward_op(_utils.flat(dy), g, u)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up share shape and dtype, and the output has both."""
    _utils.check_float("gate", gate)
    _utils.check_float("up", up)
    _utils.check_same_device(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    if gate.numel() == 0:
        raise ValueError("gate must not be empty")
    return _swiglu_op(_utils.flat(gate), _utils.flat(up)).view(gate.shape)
