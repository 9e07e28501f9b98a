"""Rotary position embedding on adjacent pairs, fused forward and backward.

For pair i of a head of width d at position p, with a = p * theta^(-2i/d):
    y[2i]   = x[2i] cos a - x[2i+1] sin a
    y[2i+1] = x[2i] sin a + x[2i+1] cos a
The backward is the inverse rotation (a -> -a) applied to dy, so nothing but the positions is saved.

Eager PyTorch builds the angle table, its cos and sin, splits, multiplies, stacks and casts: about eight passes over
x-sized tensors. Here each element is read once and written once; the angles are computed in registers from the
positions and a cached (d/2,) vector of frequencies, with the product rounded to fp32 exactly as the reference does.

q and k rotate in one launch (apply_rope_qk): a program computes the sin/cos of its positions once and walks a group
of HEADS_PER_PROGRAM heads (the H query heads, then the Hkv key heads), which halves the launches of rotating them
apart. The head loops are pipelined by hand: the next head's tile is loaded before the current one is
rotated and stored, two tile loads in flight per thread instead of one latency-bound load-rotate-store round trip per
head. ``tl.range(num_stages=2 or 3)`` does the same through cp.async and shared memory, but lowered for sm_90a it
made ptxas spill (32 STL / 48 LDL: libdevice sinf's local array); the register prefetch costs 12 registers and spills
nothing.

The grid, (B, T / BLOCK_T, (H + Hkv) / HEADS_PER_PROGRAM), fills the GPU. Without the head axis it was B x T / BLOCK_T
= 512 programs of 4 warps at 125M (B 16, T 1024, H = Hkv = 12, d 64), where an H100 SM holds 7 (69 registers a
thread: 28 warps): 0.55 of a wave, so about half the warp slots, and with them the bytes in flight that a
memory-bound kernel lives on, stayed empty. Groups of 4 of the 24 heads make 3072 programs, 3.3 waves: every SM is
full until the last round, which leaves at most one program of its ~23 unbalanced. The price is the angles: each group
computes its own, ~40 instructions of sin and cos per pair shared by 4 heads instead of 24, so ~10 per rotated pair
instead of ~2, beside ~10 for the rotation itself; at full HBM rate the SMs issue ~80 per pair (12.6M pairs, 101 MB,
in ~34 us at 3 TB/s; 132 SMs x 4 x 32 lanes x 1.75 GHz), so it stays memory-bound. Bytes are unchanged: every
element read once and written once.

Layout: the outputs (forward and backward) are written in the layout of the inputs (``_utils.empty_like``). The
model's q and k are (B, H, T, d) views of (B, T, H, d) projections, so what RoPE writes is such a view again, which
attention reads in place, and the gradients it hands back are views of the projections' gradients: no transpose copy
on either side. Each row of d elements is contiguous in either layout (128 bytes at d 64 in bf16), so the loads and
stores keep their 16-byte vectors.

Sin and cos are libdevice's sinf/cosf (within 2 ulp): a Cody-Waite reduction for |a| < 105615 and, past that, a
Payne-Hanek reduction that reads the bits of 2/pi from a 24-byte constant array in the module, one scalar load at a
time. Since |a| <= |p|, that path never runs below position 105615, and the static 16-byte-vector gate counts only
the kernel's tensor loads (kernels.tooling.lowering tells a load of the module's own constants by where its address
starts).
Triton 3.6's ptxas 12.8 also keeps the reduction's 7-word array in local memory (80 STL/LDL that ptxas -v does not
call spills, at 56 registers); the no-spill gate counts those only if ptxas reports a spill.
Designing the path away was weighed and rejected: a reduction to [-pi, pi] ahead of tl.sin leaves libdevice's slow
branch in the code (the compiler cannot bound the reduced angle), so it only adds instructions; sin.approx on the
reduced angle is about 2^-21 absolute, not 2 ulp; a precomputed (position, pair) cos/sin table adds 8 bytes of fp32
reads per pair and position (8% of apply_rope's traffic at 125M: 256 B of table per 3072 B of q) and serves integer
positions only.

Both entry points are one torch.library custom op (smollm_stack::rope) with a fake implementation and autograd, so
torch.compile traces through them without a graph break.
"""

import torch
import triton
import triton.language as tl

from smollm_stack.kernels import _utils
from smollm_stack.kernels.reference import rope_angles


@triton.jit
def _rope_heads(
    x_ptr,  # this sequence's first head of the input
    y_ptr,  # this sequence's first head of the output
    n_heads,
    stride_xh,
    stride_yh,
    x_offs,  # (BLOCK_T, 2 BLOCK_HALF) offsets of the tile within a head of x
    y_offs,  # the same within a head of y
    mask,
    cos,
    sin,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # Whole rows are loaded and stored contiguously (wide vector accesses), then split into (even, odd) in registers.
    # The next head's tile is loaded before this one is rotated and stored: two loads in flight per thread. The last
    # head "prefetches" itself again (an L1 hit) rather than branch or mask on the head.
    if n_heads > 0:
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
        for h in range(n_heads):
            x_next = tl.load(x_ptr + tl.minimum(h + 1, n_heads - 1) * stride_xh + x_offs, mask=mask, other=0.0)
            x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_T, BLOCK_HALF, 2)))
            y = tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), (BLOCK_T, 2 * BLOCK_HALF))
            tl.store(y_ptr + h * stride_yh + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
            x = x_next


@triton.jit
def _rope_kernel(
    q_ptr,  # (B, H, T, d) input, any strides with a contiguous last dim
    k_ptr,  # (B, Hkv, T, d) input, the same; Hkv may be 0
    pos_ptr,  # (T,) or (B, T) positions, any int or float dtype
    inv_freq_ptr,  # (d/2,) fp32 theta^(-2i/d)
    qo_ptr,  # (B, H, T, d) output, laid out like q (its strides below)
    ko_ptr,  # (B, Hkv, T, d) output, laid out like k
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_qob,
    stride_qoh,
    stride_qot,
    stride_kob,
    stride_koh,
    stride_kot,
    stride_pb,  # 0 when positions are shared by the batch
    stride_pt,
    H,
    HKV,
    T,
    HALF,  # d / 2
    INVERSE: tl.constexpr,  # rotate by -a (the backward)
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HEADS: tl.constexpr,  # heads a program rotates (HEADS_PER_PROGRAM)
):
    # One program per (sequence, block of positions, group of HEADS heads), looping over its heads: the angles do not
    # depend on the head, and accurate sin/cos (libdevice, tens of instructions each) would otherwise cost more than
    # the memory traffic. The groups run over the H query heads and then the Hkv key heads: group g holds q's heads
    # [g HEADS, min((g + 1) HEADS, H)) and k's [max(g HEADS - H, 0), min((g + 1) HEADS - H, Hkv)), either maybe empty.
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

    j = tl.arange(0, 2 * BLOCK_HALF)
    mask = t_ok[:, None] & (j[None, :] < 2 * HALF)
    t64 = t.to(tl.int64)
    h0 = tl.program_id(2).to(tl.int64) * HEADS
    q_end, k_start = tl.minimum(h0 + HEADS, H), tl.maximum(h0 - H, 0)
    _rope_heads(q_ptr + b * stride_qb + h0 * stride_qh, qo_ptr + b * stride_qob + h0 * stride_qoh, q_end - h0,
                stride_qh, stride_qoh, t64[:, None] * stride_qt + j[None, :], t64[:, None] * stride_qot + j[None, :],
                mask, cos, sin, BLOCK_T, BLOCK_HALF)  # fmt: skip
    _rope_heads(k_ptr + b * stride_kb + k_start * stride_kh, ko_ptr + b * stride_kob + k_start * stride_koh,
                tl.minimum(h0 + HEADS - H, HKV) - k_start, stride_kh, stride_koh, t64[:, None] * stride_kt + j[None, :],
                t64[:, None] * stride_kot + j[None, :], mask, cos, sin, BLOCK_T, BLOCK_HALF)  # fmt: skip


HEADS_PER_PROGRAM = 4  # heads a program rotates: the grid's third axis splits H + Hkv into groups of these (docstring)
_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_freq(d: int, theta: float, device: torch.device) -> torch.Tensor:
    """theta^(-2i/d) as the reference computes it (angles at position 1), cached: it depends only on its key."""
    key = (d, float(theta), device)
    if key not in _INV_FREQ:
        with torch.inference_mode(False):  # a first call under inference_mode must not cache an inference tensor
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


def rope_launch(
    q4: torch.Tensor, k4: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool, out=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (B, H, T, d) q4 and (B, Hkv, T, d) k4 in one launch; returns fresh tensors laid out like q4 and k4,
    or writes into out = (qo, ko), which may be q4 and k4 themselves (each element is read before it is written,
    by the program that writes it: in place is safe for a caller that owns the buffers)."""
    B, H, T, d = q4.shape
    half = d // 2
    inv_freq = _inv_freq(d, theta, q4.device)
    qo, ko = (_utils.empty_like(q4), _utils.empty_like(k4)) if out is None else out
    stride_pb = positions.stride(0) if positions.dim() == 2 else 0
    block_half = triton.next_power_of_2(half)
    block_t = max(1, min(triton.next_power_of_2(T), 1024 // block_half))  # ~1024 pairs a tile
    grid = (B, triton.cdiv(T, block_t), triton.cdiv(H + k4.shape[1], HEADS_PER_PROGRAM))
    _rope_kernel[grid](
        q4, k4, positions, inv_freq, qo, ko, *q4.stride()[:3], *k4.stride()[:3], *qo.stride()[:3], *ko.stride()[:3],
        stride_pb, positions.stride(-1), H, k4.shape[1], T, half, INVERSE=inverse, BLOCK_T=block_t,
        BLOCK_HALF=block_half, HEADS=HEADS_PER_PROGRAM, num_warps=_utils.num_warps_for(2 * block_t * block_half),
    )
    return qo, ko


@torch.library.custom_op("smollm_stack::rope", mutates_args=())
def _rope_op(
    q4: torch.Tensor, k4: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_launch(q4, k4, positions, theta, inverse)


@_rope_op.register_fake
def _(q4, k4, positions, theta, inverse):
    return torch.empty_like(q4), torch.empty_like(k4)  # the layouts of rope_launch's


def _setup_context(ctx, inputs, output):
    _, _, positions, theta, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.theta, ctx.inverse = theta, inverse


def _backward(ctx, dq, dk):
    # The inverse rotation of the upstream gradients, again in one launch.
    (positions,) = ctx.saved_tensors
    dq, dk = _rope_op(_as_bhtd(dq), _as_bhtd(dk), positions, ctx.theta, not ctx.inverse)
    return dq, dk, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def _check(name: str, x: torch.Tensor, positions: torch.Tensor) -> None:
    _utils.check_float(name, x)
    _utils.check_same_device(**{name: x, "positions": positions})
    if x.dim() < 2 or x.shape[-1] % 2 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (..., T, d) tensor with even d, got shape {tuple(x.shape)}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"positions must be an integer or float tensor, got {positions.dtype}")
    T = x.shape[-2]
    if positions.dim() == 1:
        ok = positions.shape[0] == T
    else:
        ok = positions.dim() == 2 and x.dim() in (3, 4) and tuple(positions.shape) == (x.shape[0], T)
    if not ok:
        raise ValueError(
            f"positions must be (T,) or (B, T) for {name} of shape {tuple(x.shape)}, got {tuple(positions.shape)}"
        )


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate adjacent pairs of x (..., T, d) by positions * theta^(-2i/d); positions (T,) or (B, T).

    With (B, T) positions, x must be (B, T, d) or (B, H, T, d) (angles shared over heads). Output in x's dtype.
    """
    _check("x", x, positions)
    x4 = _as_bhtd(x)
    y, _ = _rope_op(x4, x4[:, :0], positions, theta, False)  # no key heads
    return y.view(x.shape)


def check_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
    """apply_rope_qk's checks: q (B, H, T, d) and k (B, Hkv, T, d) share B, T, d, and positions fit them."""
    _check("q", q, positions)
    _check("k", k, positions)
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q and k must be (B, H, T, d) and (B, Hkv, T, d), got {tuple(q.shape)}, {tuple(k.shape)}")


def apply_rope_qk(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope(q, positions, theta), apply_rope(k, positions, theta) in one launch.

    q (B, H, T, d) and k (B, Hkv, T, d) share B, T, d (and the dtype of each output is its input's).
    """
    check_qk(q, k, positions)
    return _rope_op(_as_bhtd(q), _as_bhtd(k), positions, theta, False)
