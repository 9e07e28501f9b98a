"""RMSNorm over the last dim, fused forward and backward, alone or with the residual add before it.

Forward, per row x of width N:   rstd = 1 / sqrt(mean(x^2) + eps),   y = (x * rstd) * w
Backward, with g = dy * w and x_hat = x * rstd:
    dx = rstd * (g - x_hat * mean(g * x_hat))
    dw = sum over rows of dy * x_hat

Eager PyTorch runs this as about six kernels (square, mean, rsqrt, two multiplies, cast) that each round-trip the
activations through memory; the forward here reads x once and writes y once, and saves only rstd (4 bytes a row) for
the backward, which reads x and dy once and writes dx once. dw is summed per program into a (programs, N) fp32
buffer and finished by one small torch reduction, so there is no host loop and no slow path at small widths.

Mixed precision. Under autocast the residual stream is fp32 while the matmuls after a pre-norm run in bf16, so
``out_dtype=torch.bfloat16`` reads fp32 x once (4 bytes an element) and writes bf16 y (2 bytes): 6 bytes an element
where an fp32 norm followed by autocast's cast moves 4 + 4 + 4 + 2 = 14. The backward then reads a bf16 dy (2 bytes,
not 4) and writes dx in x's dtype.

The backward is grid-stride over row blocks (a few programs per SM, each owning a row of dw partial sums) with the
loop pipelined by hand: the loads of the next row block are issued before the current one is reduced and stored,
so each program keeps two blocks in flight and hides the memory latency one block at a time would expose.

The residual add fused in (``add_rms_norm``). A pre-norm block adds each branch's output r to the residual stream x
and normalizes the sum: h = x + r (in x + r's dtype, as torch adds them), y = rmsnorm(h) * w, and h goes on down the
stream. The same kernels do it: the forward with HAS_RESIDUAL reads x and r and writes h and y; the backward, with
x := h, adds the gradient dh that h gets from its later uses (HAS_DH): dh_total = dh + d(rmsnorm)/dh . dy, which is
both dx and dr, written a second time in r's dtype (HAS_DR: bf16 for autocast's branch outputs), never handed out
as one tensor for both (autograd may accumulate into either gradient in place: a leaf's .grad, say).
Bytes an element under autocast (fp32 stream and dh, bf16 r, y and dy), eager's add and norm, then fused:
    forward:  add reads x, r, writes h (4 + 2 + 4); norm reads h, writes y (4 + 2)        16 -> 12 (x, r -> h, y)
    backward: norm reads dy, h, writes dx (2 + 4 + 4); autograd sums dx + dh (4 + 4 + 4)
              and casts the sum to r's bf16 (4 + 2)                                       28 -> 16 (dy, dh, h -> dx, dr)
So each add costs 28 bytes an element instead of 44, and 2 launches instead of 5 (plus dw's sum either way): at a
pre-norm block's two adds, 24.6 KB a token and layer less at d 768.

Each direction is a torch.library custom op (smollm_stack::rms_norm, smollm_stack::add_rms_norm and their
_backward ops) with fake implementations and autograd, so torch.compile traces through them without a graph break.
"""

import torch
import triton
import triton.language as tl

from smollm_stack.kernels import _utils


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (M, N) input, row stride stride_x, contiguous columns
    r_ptr,  # (M, N) branch added to x first, row stride stride_r (HAS_RESIDUAL; else None)
    w_ptr,  # (N,) weight, any float dtype
    h_ptr,  # (M, N) output x + r, contiguous (HAS_RESIDUAL; else None)
    y_ptr,  # (M, N) output, contiguous
    rstd_ptr,  # (M,) fp32 per-row 1/rms, saved for the backward
    stride_x,
    stride_r,
    M,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: small widths batch several rows to keep loads wide
    BLOCK_N: tl.constexpr,  # next power of two >= N: a whole row in registers
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)  # M * N may pass 2^31
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # normalize h as stored, rounded to its dtype, as eager's norm of x + r would
        r = tl.load(r_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows64[:, None] * N + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows64[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _load_rows(x_ptr, dy_ptr, dh_ptr, rstd_ptr, rows, cols, col_ok, M, stride_x, stride_dy, stride_dh,
               HAS_DH: tl.constexpr):  # fmt: skip
    """x, dy, dh (in their own dtypes; dh zeros without HAS_DH) and rstd of one block of rows; rows past M read as
    zeros."""
    row_ok = rows < M
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)  # M * N may pass 2^31
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    dh = tl.zeros_like(x)
    if HAS_DH:
        dh = tl.load(dh_ptr + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(x.dtype)
    return x, dy, dh, tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # (M, N) upstream gradient, row stride stride_dy
    dh_ptr,  # (M, N) gradient of x from its other uses, added to dx, row stride stride_dh (HAS_DH; else None)
    x_ptr,  # (M, N) forward input (add_rms_norm's h), row stride stride_x
    w_ptr,  # (N,) weight
    rstd_ptr,  # (M,) fp32 from the forward
    dx_ptr,  # (M, N) output, contiguous, in x's dtype
    dr_ptr,  # (M, N) output, contiguous: dx again, in add_rms_norm's r's dtype (HAS_DR; else None)
    dw_partial_ptr,  # (num_programs, N) fp32: this program's share of dw
    stride_dy,
    stride_dh,
    stride_x,
    M,
    N,
    HAS_DH: tl.constexpr,
    HAS_DR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Grid-stride over row blocks, so each program owns one row of dw_partial and accumulates it in registers. The
    # next block's loads are issued before this block is reduced and stored (a register prefetch), so two blocks are
    # in flight per program; tl.range(num_stages=2) would do the same through cp.async and 16 KB of shared memory.
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    x, dy, dh, rstd = _load_rows(x_ptr, dy_ptr, dh_ptr, rstd_ptr, rows, cols, col_ok, M, stride_x, stride_dy,
                                 stride_dh, HAS_DH)  # fmt: skip
    for start in range(pid * BLOCK_M, M, step):
        rows = start + tl.arange(0, BLOCK_M)
        x_next, dy_next, dh_next, rstd_next = _load_rows(x_ptr, dy_ptr, dh_ptr, rstd_ptr, rows + step, cols, col_ok,
                                                         M, stride_x, stride_dy, stride_dh, HAS_DH)  # fmt: skip
        x_hat = x.to(tl.float32) * rstd[:, None]
        dy32 = dy.to(tl.float32)
        g = dy32 * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / N
        dx = rstd[:, None] * (g - x_hat * c[:, None])
        if HAS_DH:
            dx += dh.to(tl.float32)
        mask = (rows < M)[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DR:
            tl.store(dr_ptr + offsets, dx.to(dr_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy32 * x_hat
        x, dy, dh, rstd = x_next, dy_next, dh_next, rstd_next
    tl.store(dw_partial_ptr + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


def _launch_sizes(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): a whole row per tile, and several rows when rows are narrow (~4K elements)."""
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n, _utils.num_warps_for(block_m * block_n)


def rms_norm_forward(
    x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch the forward on (M, N) views, of x2 + r2 if r2 is given; returns (x2 + r2 or None, y in out_dtype,
    rstd)."""
    M, N = x2.shape
    h = None if r2 is None else _utils.empty((M, N), torch.promote_types(x2.dtype, r2.dtype), x2.device)
    y = _utils.empty((M, N), out_dtype, x2.device)
    rstd = _utils.empty((M,), torch.float32, x2.device)
    block_m, block_n, warps = _launch_sizes(N)
    grid = (triton.cdiv(M, block_m),)
    _rms_norm_fwd_kernel[grid](
        x2, r2, weight, h, y, rstd, x2.stride(0), 0 if r2 is None else r2.stride(0), M, N, eps,
        HAS_RESIDUAL=r2 is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return h, y, rstd


def rms_norm_backward(
    dy2: torch.Tensor, dh2: torch.Tensor | None, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    r_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the backward on (M, N) views, with dh2 (if given) added to dx; returns (dx, a copy of dx in r_dtype if
    that is given else None, dweight) in x's, r_dtype and weight's dtypes."""
    M, N = x2.shape
    block_m, block_n, warps = _launch_sizes(N)
    # Two programs per SM, which fit because maxnreg caps a thread at 128 registers. fp32 x takes half the rows with
    # the same warps, so a thread holds as many bytes of x as with bf16 x (~95 registers): fp32 x in 8 x 512 blocks
    # spilled under Triton 3.6's ptxas 12.8 (18 spill instructions with bf16 dy, 43 with fp32 dy), not under 13.4.
    # add_rms_norm's fp32 dh keeps the rows: halving them again would narrow bf16 dy and dr to 8-byte vectors.
    if x2.element_size() == 4:
        block_m = max(1, block_m // 2)
    programs = _utils.persistent_programs(x2.device, triton.cdiv(M, block_m), per_sm=2)
    dx = _utils.empty((M, N), x2.dtype, x2.device)
    dr = None if r_dtype is None else _utils.empty((M, N), r_dtype, x2.device)
    dw_partial = _utils.empty((programs, N), torch.float32, x2.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, dh2, x2, weight, rstd, dx, dr, dw_partial, dy2.stride(0), 0 if dh2 is None else dh2.stride(0),
        x2.stride(0), M, N, HAS_DH=dh2 is not None, HAS_DR=dr is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, maxnreg=128,
    )
    return dx, dr, dw_partial.sum(0).to(weight.dtype)


# ---- rms_norm: y = rmsnorm(x) * w ----


@torch.library.custom_op("smollm_stack::rms_norm", mutates_args=())
def _rms_norm_op(
    x2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    _, y, rstd = rms_norm_forward(x2, None, weight, eps, out_dtype)
    return y, rstd


@_rms_norm_op.register_fake
def _(x2, weight, eps, out_dtype):
    return x2.new_empty(x2.shape, dtype=out_dtype), x2.new_empty(x2.shape[:1], dtype=torch.float32)


@torch.library.custom_op("smollm_stack::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, _, dw = rms_norm_backward(dy2, None, x2, weight, rstd)
    return dx, dw


@_rms_norm_backward_op.register_fake
def _(dy2, x2, weight, rstd):
    return torch.empty_like(x2, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x2, weight, _, _ = inputs
    ctx.save_for_backward(x2, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # rstd's gradient is never used: no zeros made for it


def _backward(ctx, dy, _):
    x2, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(_utils.rows_of(dy), x2, weight, rstd)
    return dx, dw, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ---- add_rms_norm: h = x + r, y = rmsnorm(h) * w ----


@torch.library.custom_op("smollm_stack::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x2: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x2, r2, weight, eps, out_dtype)


@_add_rms_norm_op.register_fake
def _(x2, r2, weight, eps, out_dtype):
    h = x2.new_empty(x2.shape, dtype=torch.promote_types(x2.dtype, r2.dtype))
    return h, x2.new_empty(x2.shape, dtype=out_dtype), x2.new_empty(x2.shape[:1], dtype=torch.float32)


@torch.library.custom_op("smollm_stack::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward_op(
    dy2: torch.Tensor, dh2: torch.Tensor | None, h2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    r_dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """[dh_total, dweight], with a copy of dh_total in r_dtype between them if r_dtype is given."""
    dx, dr, dw = rms_norm_backward(dy2, dh2, h2, weight, rstd, r_dtype)
    return [dx, dw] if dr is None else [dx, dr, dw]


@_add_rms_norm_backward_op.register_fake
def _(dy2, dh2, h2, weight, rstd, r_dtype):
    dx = torch.empty_like(h2, memory_format=torch.contiguous_format)
    dr = [] if r_dtype is None else [torch.empty_like(dx, dtype=r_dtype)]
    return [dx, *dr, torch.empty_like(weight)]


def _add_setup_context(ctx, inputs, output):
    x2, r2, weight, _, _ = inputs
    ctx.save_for_backward(output[0], weight, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # dh is None where h has no later use (a last norm): nothing added, no zeros
    ctx.dtypes = x2.dtype, r2.dtype, output[1].dtype


def _add_backward(ctx, dh, dy, _):
    h2, weight, rstd = ctx.saved_tensors
    x_dtype, r_dtype, y_dtype = ctx.dtypes
    if dy is None:  # only h was used: the norm adds nothing
        dy = h2.new_zeros(h2.shape, dtype=y_dtype)
    dh2 = None if dh is None else _utils.rows_of(dh)
    r_dtype = r_dtype if ctx.needs_input_grad[1] else None
    dx, *dr, dw = _add_rms_norm_backward_op(_utils.rows_of(dy), dh2, h2, weight, rstd, r_dtype)
    return dx.to(x_dtype), dr[0] if dr else None, dw, None, None


_add_rms_norm_op.register_autograd(_add_backward, setup_context=_add_setup_context)


def _check(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None) -> None:
    _utils.check_float("x", x)
    _utils.check_float("weight", weight)
    _utils.check_same_device(x=x, weight=weight)
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1] if x.dim() else '?'},), got {tuple(weight.shape)}")
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    if out_dtype is not None and out_dtype not in _utils.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight over any leading dims (weight may be fp32).

    The output is in out_dtype (default x's dtype): fp32 x with out_dtype=torch.bfloat16 is autocast's pre-norm,
    read once in fp32 and written once in bf16. The gradient comes back in x's dtype.
    """
    _check(x, weight, out_dtype)
    y, _ = _rms_norm_op(_utils.rows_of(x), weight.contiguous(), eps, out_dtype or x.dtype)
    return y.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h, weight, eps, out_dtype)) with h = x + r, in one pass each way.

    h is in x + r's dtype (the fp32 residual stream under autocast, r a bf16 branch output); the norm's output in
    out_dtype (default h's). The gradients of x and r (the same sum, each in its input's dtype) come back together.
    """
    _check(x, weight, out_dtype)
    _utils.check_float("r", r)
    _utils.check_same_device(x=x, r=r)
    if r.shape != x.shape:
        raise ValueError(f"r must have x's shape {tuple(x.shape)}, got {tuple(r.shape)}")
    h, y, _ = _add_rms_norm_op(_utils.rows_of(x), _utils.rows_of(r), weight.contiguous(), eps,
                               out_dtype or torch.promote_types(x.dtype, r.dtype))  # fmt: skip
    return h.view(x.shape), y.view(x.shape)
