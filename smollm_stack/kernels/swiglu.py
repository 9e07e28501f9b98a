"""SwiGLU's gate: y = silu(g) * u = g * sigmoid(g) * u, fused forward and backward.

Backward, with s = sigmoid(g):
    du = dy * g * s
    dg = dy * u * s * (1 + g * (1 - s))

Eager PyTorch runs sigmoid, two multiplies (and autograd saves their intermediates), so the forward moves about
5 tensors' worth of bytes instead of 3 (read g and u, write y) and the backward about 10 instead of 5 (read dy,
g, u, write dg, du). Here s is recomputed in the backward rather than saved: one exp costs less than a round
trip through memory.

Layout: g and u may be the two halves of one (rows, 2 n) product (kernels/stacked_linear.py's W1 x and W3 x): the
kernels read rows a stride apart, so the halves are never copied out, and the backward writes dg and du side by side
into one (rows, 2 n) buffer, which that product's backward takes as its gradient without a copy (4 rows n bytes
saved each way against contiguous halves).

Both directions are torch.library custom ops (smollm_stack::swiglu, smollm_stack::swiglu_backward) with fake
implementations and autograd, so torch.compile traces through them without a graph break.
"""

import torch
import triton
import triton.language as tl

from smollm_stack.kernels import _utils


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr,  # gate (rows, n_cols), rows stride_g apart, unit-stride columns
    u_ptr,  # up, the same shape, rows stride_u apart
    y_ptr,  # output (rows, n_cols), contiguous
    n_cols,
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,  # (rows, n_cols), contiguous
    g_ptr,
    u_ptr,
    dg_ptr,  # dg and du: the two halves of one (rows, 2 n_cols) buffer
    du_ptr,
    n_cols,
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    du = dy * g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dg_ptr + row * 2 * n_cols + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * 2 * n_cols + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


# up to 2048 elements x 2 B = 4 KiB per tensor per program: wide enough for 16 B loads on every thread of 4 warps.
BLOCK = 2048


def _launch(g: torch.Tensor) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK, num_warps) for (rows, n_cols) g: a program per row and BLOCK columns."""
    block = min(BLOCK, triton.next_power_of_2(g.shape[1]))
    return (g.shape[0], triton.cdiv(g.shape[1], block)), block, _utils.num_warps_for(block)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Launch the forward on (rows, n_cols) g and u with unit-stride rows; returns a contiguous y."""
    y = _utils.empty(g.shape, g.dtype, g.device)
    grid, block, warps = _launch(g)
    _swiglu_fwd_kernel[grid](g, u, y, g.shape[1], g.stride(0), u.stride(0), BLOCK=block, num_warps=warps)
    return y


def swiglu_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Launch the backward on (rows, n_cols) tensors; returns [dg, du] side by side in one (rows, 2 n_cols) tensor."""
    rows, n = g.shape
    dgu = _utils.empty((rows, 2 * n), g.dtype, g.device)
    grid, block, warps = _launch(g)
    dg, du = dgu[:, :n], dgu[:, n:]
    _swiglu_bwd_kernel[grid](dy, g, u, dg, du, n, g.stride(0), u.stride(0), BLOCK=block, num_warps=warps)
    return dgu


@torch.library.custom_op("smollm_stack::swiglu", mutates_args=())
def _swiglu_op(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(g, u)


@_swiglu_op.register_fake
def _(g, u):
    return g.new_empty(g.shape)


@torch.library.custom_op("smollm_stack::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return swiglu_backward(dy, g, u)


@_swiglu_backward_op.register_fake
def _(dy, g, u):
    return g.new_empty(g.shape[0], 2 * g.shape[1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.shape = inputs[0].shape


def _backward(ctx, dy):
    g, u = ctx.saved_tensors
    dgu = _swiglu_backward_op(_utils.rows_of(dy).contiguous(), g, u).view(*ctx.shape[:-1], -1)
    return dgu.split(ctx.shape[-1], -1)  # side by side, as stacked_linear takes W1 x and W3 x's gradients back


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
    return _swiglu_op(_utils.rows_of(gate), _utils.rows_of(up)).view(gate.shape)
