"""Nesterov momentum into a stack of matrices, and the stack divided by each matrix's Frobenius norm.

For matrices j = 0 .. batch-1 with fp32 gradient G_j and fp32 momentum M_j (separate tensors, each contiguous, all
of one size n), and a contiguous stack buffer x (batch, ...) of n elements a matrix:

    M_j <- mu M_j + (1 - mu) G_j                   (in place)
    x[j] <- U_j = (1 - mu) G_j + mu M_j            (the new M_j; rounded to x's dtype, element order as G_j's)
    ssq[j] <- sum of U_j^2 over the stored U_j     (fp64: each program's tile into a partial sum, then one sum)

then ``divide_by_norm_`` sets x[j] <- x[j] / sqrt(ssq[j]) (a zero matrix stays zero). Both lerps are torch.lerp's
formula, so the fp32 results are the foreach ops' up to the FMA contractions of the compiler.

One launch for a whole stack: the matrices are separate tensors, so their addresses reach the kernel as a table
(a (2, batch) int64 tensor: row 0 the gradients, row 1 the momenta), each program loading its matrix's two addresses
and casting them to pointers (as Triton's grouped-GEMM tutorial does). The table is built on the host every call
(gradients are new tensors each step) and copied to the device without waiting (a few hundred bytes, staged by the
driver at once: no host sync). When every address is a multiple of 16 bytes (torch's allocators align to 64 or 512)
the kernel says so of each pointer (``ALIGNED``; said of the integer, it would not survive the cast), so the loads
stay 16-byte vectors (tests/test_lowering_gates.py); n itself is a launch argument, whose divisibility Triton
specializes as for any int, and x[j] starts j n elements into x.

Bytes an element, for a bf16 x: read G and M (8), write M (4) and x (2), 14; then the division reads and writes x,
4: 18 in two launches (and a sum of the tiles' partial sums, 8 bytes a tile), where the foreach ops move 42 (the
momentum's lerp 12, the look-ahead written over G 12, the cast into x 6, a division by the largest entry then by the
norm, 12) in 27 launches at the 125M preset's two stacks, where these take 6.

Why one division is enough where the foreach path divides twice: U is stored unscaled in x's dtype, which for bf16
has fp32's exponent range, so nothing overflows or flushes there that the foreach path's cast would not. The sum of
squares runs in fp64: a square of an fp32 (or bf16) value is exact in fp64 and at most 2^256, at least 2^-298,
far inside fp64's range (2^+-1022), and a sum of fewer than 2^700 of them cannot overflow; so the norm is right at
any gradient scale without first dividing by the largest entry. The factor 1 / sqrt(ssq) may reach 2^149 (past
fp32's 2^128), so the division multiplies in fp64 and rounds the product to x's dtype (through fp32, 2^-24 more):
each normalized element is off by one rounding (2^-9 relative in bf16), where the foreach path's two divisions
rounded twice.

Each program writes its tile's sum of squares to its own slot of a (batch, tiles) fp64 buffer, and one torch sum
over the tiles makes ssq: the same additions in the same order every run, so the step is bitwise reproducible (an
fp64 atomic add per tile into ssq would save that launch but add in whatever order the programs finish, and a
resumed run is held to the uninterrupted one's losses bit for bit).
"""

import torch
import triton
import triton.language as tl

from smollm_stack.kernels import _utils


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula: exact at weight 0 and 1."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


@triton.jit
def _address(table_ptr, index, ALIGNED: tl.constexpr):
    """The fp32 pointer at table_ptr[index]; said 16-byte aligned when ALIGNED."""
    pointer = tl.load(table_ptr + index).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _nesterov_kernel(
    table_ptr,  # (2, batch) int64: the addresses of G_j (row 0) and M_j (row 1), fp32, n elements each
    x_ptr,  # (batch, n) contiguous stack, written
    partial_ptr,  # (batch, tiles) fp64, written: each tile's sum of squares of x[j]
    batch,
    n,
    mu,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address in the table is a multiple of 16 bytes
):
    j = tl.program_id(1)
    g_ptr, m_ptr = _address(table_ptr, j, ALIGNED), _address(table_ptr, batch + j, ALIGNED)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = _lerp(tl.load(m_ptr + offs, mask=mask, other=0.0), g, 1 - mu)
    u = _lerp(g, m, mu).to(x_ptr.dtype.element_ty)  # masked lanes: 0, adding nothing below
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(x_ptr + j.to(tl.int64) * n + offs, u, mask=mask)
    square = u.to(tl.float64) * u.to(tl.float64)
    tl.store(partial_ptr + j.to(tl.int64) * tl.num_programs(0) + tl.program_id(0), tl.sum(square, axis=0))


@triton.jit
def _divide_by_norm_kernel(
    x_ptr,  # (batch, n) contiguous stack, divided in place
    ssq_ptr,  # (batch,) fp64 sums of squares
    n,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(1)
    ssq = tl.load(ssq_ptr + j)
    # fp64, up to 2^149 (module docstring); a nonzero ssq is >= 2^-298, and a zero matrix stays 0 times a finite factor
    factor = 1.0 / tl.sqrt(tl.maximum(ssq, 1e-300))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ptrs = x_ptr + j.to(tl.int64) * n + offs
    x = tl.load(ptrs, mask=mask, other=0.0)
    y = (x.to(tl.float64) * factor).to(tl.float32)  # then to bf16: the interpreter cannot cast fp64 to it directly
    tl.store(ptrs, y.to(x_ptr.dtype.element_ty), mask=mask)


# 2048 elements a program: 8 KiB of each fp32 tensor, 16-byte vectors on every thread of 4 warps
BLOCK = 2048


def _grid(x: torch.Tensor) -> tuple[tuple[int, int], int]:
    """((tiles of a matrix, batch), BLOCK) for the stack x."""
    n = x[0].numel()
    block = min(BLOCK, triton.next_power_of_2(n))
    return (triton.cdiv(n, block), x.shape[0]), block


def nesterov_(grads: list[torch.Tensor], momenta: list[torch.Tensor], x: torch.Tensor, ssq: torch.Tensor,
              mu: float) -> torch.Tensor:
    """M_j <- mu M_j + (1 - mu) G_j; x[j] <- (1 - mu) G_j + mu M_j in x's dtype; ssq[j] <- sum of x[j]^2 in fp64
    (module docstring). grads, momenta: fp32, contiguous, one a matrix of x (batch, ...), each of x[0]'s size;
    x: contiguous fp32 or bf16 (fp32's exponent range: an unscaled U could overflow fp16); ssq: (batch,) fp64,
    overwritten. Returns ssq."""
    _check(grads, momenta, x, ssq)
    addresses = [[t.data_ptr() for t in grads], [t.data_ptr() for t in momenta]]
    aligned = all(a % 16 == 0 for row in addresses for a in row)
    table = torch.tensor(addresses, dtype=torch.int64).to(x.device, non_blocking=True)  # staged at once: no sync
    grid, block = _grid(x)
    partial = torch.empty(grid[::-1], dtype=torch.float64, device=x.device)
    _nesterov_kernel[grid](table, x, partial, x.shape[0], x[0].numel(), mu, BLOCK=block, ALIGNED=aligned,
                           num_warps=_utils.num_warps_for(block))
    return torch.sum(partial, dim=1, out=ssq)  # in a fixed order (module docstring)


def divide_by_norm_(x: torch.Tensor, ssq: torch.Tensor) -> torch.Tensor:
    """x[j] <- x[j] / sqrt(ssq[j]) in place for the contiguous stack x (batch, ...), ssq (batch,) fp64 (0 where
    ssq[j] is 0). Returns x."""
    _utils.check_float("x", x)
    if not x.is_contiguous() or ssq.dtype != torch.float64 or ssq.shape != x.shape[:1]:
        raise ValueError(f"divide_by_norm_: need a contiguous x and a ({x.shape[0]},) fp64 ssq, got "
                         f"{tuple(ssq.shape)} {ssq.dtype}")
    _utils.check_same_device(x=x, ssq=ssq)
    grid, block = _grid(x)
    _divide_by_norm_kernel[grid](x, ssq, x[0].numel(), BLOCK=block, num_warps=_utils.num_warps_for(block))
    return x


def _check(grads: list[torch.Tensor], momenta: list[torch.Tensor], x: torch.Tensor, ssq: torch.Tensor) -> None:
    """Raise a clear error unless the arguments are as ``nesterov_`` documents."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"nesterov_: x must be a float32 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    batch, n = x.shape[0], x[0].numel()
    if not (len(grads) == len(momenta) == batch) or not x.is_contiguous():
        raise ValueError(f"nesterov_: need a contiguous x and {batch} gradients and momenta, got "
                         f"{len(grads)} and {len(momenta)}")
    for name, t in (("ssq", ssq), *(("gradient", g) for g in grads), *(("momentum", m) for m in momenta)):
        _utils.check_same_device(x=x, **{name: t})
    if ssq.dtype != torch.float64 or ssq.shape != (batch,):
        raise ValueError(f"nesterov_: ssq must be ({batch},) fp64, got {tuple(ssq.shape)} {ssq.dtype}")
    bad = [tuple(t.shape) for t in (*grads, *momenta)
           if t.dtype != torch.float32 or t.numel() != n or not t.is_contiguous()]  # fmt: skip
    if bad:
        raise ValueError(f"nesterov_: gradients and momenta must be contiguous fp32 of {n} elements, got {bad}")
