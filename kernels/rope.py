"""Rotary position embedding on adjacent pairs, fused forward and backward.

For pair i of a head of width d at position p, with a = p * theta^(-2i/d):
    y[2i]   = x[2i] cos a - x[2i+1] sin a
    y[2i+1] = x[2i] sin a + x[2i+1] cos a
The backward is the inverse rotation (a -> -a) applied to dy, so nothing but the positions is saved.

Eager PyTorch builds the angle table, its cos and sin, splits, multiplies, stacks and casts: about eight passes over
x-sized tensors. Here each element is read once and written once; the angles are computed in registers from the
positions and a cached (d/2,) vector of frequencies, with the product rounded to fp32 exactly as the reference does.
"""

import torch
import triton
import triton.language as tl

from kernels import _utils
from kernels.reference import rope_angles


@triton.jit
def _rope_kernel(
    x_ptr,  # (B, H, T, d) input, any strides with a contiguous last dim
    pos_ptr,  # (T,) or (B, T) positions, any int or float dtype
    inv_freq_ptr,  # (d/2,) fp32 theta^(-2i/d)
    y_ptr,  # (B, H, T, d) output, contiguous
    stride_xb,
    stride_xh,
    stride_xt,
    stride_pb,  # 0 when positions are shared by the batch
    stride_pt,
    H,
    T,
    HALF,  # d / 2
    INVERSE: tl.constexpr,  # rotate by -a (the backward)
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per (sequence, block of positions), looping over heads: the angles do not depend on the head,
    # and accurate sin/cos (libdevice, tens of instructions each) would otherwise cost more than the memory traffic.
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    t_ok = t < T

    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt, mask=t_ok, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if INVERSE:
        sin = -sin

    # Whole rows are loaded and stored contiguously (wide vector accesses), then split into (even, odd) in registers.
    j = tl.arange(0, 2 * BLOCK_HALF)
    mask = t_ok[:, None] & (j[None, :] < 2 * HALF)
    x_offs = t.to(tl.int64)[:, None] * stride_xt + j[None, :]
    y_offs = t.to(tl.int64)[:, None] * (2 * HALF) + j[None, :]
    for h in range(H):
        x = tl.load(x_ptr + b * stride_xb + h * stride_xh + x_offs, mask=mask, other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_HALF, 2)))
        y = tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), (BLOCK_T, 2 * BLOCK_HALF))
        tl.store(y_ptr + (b * H + h) * T * (2 * HALF) + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_freq(d: int, theta: float, device: torch.device) -> torch.Tensor:
    """theta^(-2i/d) as the reference computes it (angles at position 1), cached: it depends only on its key."""
    key = (d, float(theta), device)
    if key not in _INV_FREQ:
        _INV_FREQ[key] = rope_angles(torch.ones((), device=device), d, theta).contiguous()
    return _INV_FREQ[key]


def _as_bhtd(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, d) view of x (..., T, d) without copying unless the last dim is strided."""
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[:, None]
    elif x.dim() > 4:
        x = x.reshape(-1, *x.shape[-3:])
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def rope_launch(x4: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate a (B, H, T, d) tensor; returns a fresh contiguous tensor of the same shape."""
    B, H, T, d = x4.shape
    half = d // 2
    y = _utils.empty(x4.shape, x4.dtype, x4.device)
    stride_pb = positions.stride(0) if positions.dim() == 2 else 0
    block_half = triton.next_power_of_2(half)
    # ~1024 pairs a tile: enough programs (B x T / block_t) to fill the SMs even for one head group per sequence.
    block_t = max(1, min(triton.next_power_of_2(T), 1024 // block_half))
    grid = (B, triton.cdiv(T, block_t))
    _rope_kernel[grid](
        x4, positions, inv_freq, y, x4.stride(0), x4.stride(1), x4.stride(2), stride_pb, positions.stride(-1),
        H, T, half, INVERSE=inverse, BLOCK_T=block_t, BLOCK_HALF=block_half,
        num_warps=_utils.num_warps_for(2 * block_t * block_half),
    )
    return y


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
        inv_freq = _inv_freq(x.shape[-1], theta, x.device)
        ctx.save_for_backward(positions, inv_freq)
        return rope_launch(_as_bhtd(x), positions, inv_freq, inverse=False).view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        positions, inv_freq = ctx.saved_tensors
        return rope_launch(_as_bhtd(dy), positions, inv_freq, inverse=True).view(dy.shape), None, None


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate adjacent pairs of x (..., T, d) by positions * theta^(-2i/d); positions (T,) or (B, T).

    With (B, T) positions, x must be (B, T, d) or (B, H, T, d) (angles shared over heads). Output in x's dtype.
    """
    _utils.check_float("x", x)
    _utils.check_same_device(x=x, positions=positions)
    if x.dim() < 2 or x.shape[-1] % 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (..., T, d) tensor with even d, got shape {tuple(x.shape)}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"positions must be an integer or float tensor, got {positions.dtype}")
    T = x.shape[-2]
    if positions.dim() == 1:
        ok = positions.shape[0] == T
    else:
        ok = positions.dim() == 2 and x.dim() in (3, 4) and tuple(positions.shape) == (x.shape[0], T)
    if not ok:
        raise ValueError(
            f"positions must be (T,) or (B, T) for x of shape {tuple(x.shape)}, got {tuple(positions.shape)}"
        )
    return RoPEFunction.apply(x, positions, theta)
