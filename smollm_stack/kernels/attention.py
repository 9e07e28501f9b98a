"""FlashAttention-2-style attention in Triton: tiled, online softmax, causal block skipping, grouped-query heads.

Forward, for q (B, H, T, d) and k, v (B, Hkv, S, d), query head h reading K/V head h // (H // Hkv):

    O = softmax(scale * Q K^T + mask) V,    mask(i, j) = 0 if j <= i + (S - T) else -inf    (causal)

The eager version (``kernels.reference.flash_attention``) materialises the (T, S) scores and probabilities in fp32 and
keeps both for backward: 8·B·H·T·S bytes, 2 GiB per layer at B·H = 64 and T = S = 2048, growing with the square of the
context. Here each program owns BLOCK_M query rows and streams K/V past them in BLOCK_N tiles, keeping a running max
m, running sum l and an unnormalised output tile in registers (the online softmax), so nothing (T, S)-shaped ever
reaches memory. Scores are taken in base 2 (scale * log2(e) folded into one multiply, then exp2). Only O and the per-row
log-sum-exp (4 bytes per row) are saved for backward, which recomputes the probabilities tile by tile.

Causal: key blocks entirely above the diagonal are never visited, and only the blocks that straddle it (or the ragged
end of S) pay for masking. With T < S the queries are the last T positions (KV-cache decoding), so the mask is
aligned to the end: query i sees keys j <= i + S - T.

Cost (causal halves every count): the forward's two dots are 4·B·H·T·S·d FLOPs; HBM traffic is Q and O once plus
K and V once per query block, 2·B·H·d·es·(T + 2·S·T/BLOCK_M) bytes, mostly L2 hits since the programs of one K/V
head run together. Per K/V tile a program does 4·BLOCK_M·BLOCK_N·d FLOPs for 2·BLOCK_N·d·es bytes, 2·BLOCK_M/es =
128 FLOP/B at BLOCK_M = 128 in bf16, so the tensor cores, not memory, set the pace, and the softmax is next: Hopper
does ~256 matmul FLOPs per exp2, and each score costs one exp2 for 4·d matmul FLOPs (256 at d = 64: as long).
So the per-score work is kept to the minimum: the scale is folded into the FMA that subtracts the running max
(forward) or the log-sum-exp (backward), s·c - m in one instruction, and masks are applied only to boundary blocks.
Every dot must lower to Hopper's wgmma (the legacy mma.sync runs the tensor cores at a fraction of their rate):
tests/test_lowering_gates.py checks it for every kept config; below Hopper (T4 to L4) every dot must be an
mma.sync on the tensor cores, in the configs kept for the card's shared memory (tests/test_lowering_archs.py).

Documents: a packed window holds several documents, and doc_ids (B, S), one integer per key position (a document is
a run of equal ids), keep each query inside its own: mask(i, j) is also -inf where key j lies outside the document of
query position p = i + S - T. The launcher turns the ids into each position's document start and end (two (B, S)
int32 tensors, a cummax each on the device, no host sync). Since p's document is [start(p), end(p)) and causality
already hides j > p, a query sees exactly the keys start(p) <= j <= p, and a block's rows have nondecreasing starts:
- forward and dQ: query block i begins at the key block holding the start of its first row's document; every key
  before it lies in an earlier document for every row, so those blocks are never loaded. Only the blocks that some
  row's document start cuts (up to the last row's start) and the diagonal ones are masked elementwise.
- dK/dV: key block j still begins at the diagonal and stops after the query block holding the end of its last key's
  document, beyond which no query sees it; the query blocks past the end of its first key's document are masked.
With documents of length L << T a query block visits at most (L + BLOCK_M) / BLOCK_N + 2 key blocks instead of up to
T / BLOCK_N, so the ~T^2 / 2 scores per head of causal attention become at most ~T (L + BLOCK_M + 2 BLOCK_N), and the
K/V bytes streamed per query block and the dot FLOPs (forward and backward) shrink by the same factor, about
(L + BLOCK_M + 2 BLOCK_N) / (T / 2): at least 4x at T = 4096 with L = 256 and 128 x 64 tiles, none at T = 256.
The price: 8 bytes per token for the bounds, a vector of row starts or key ends per program (and per masked query
block in dK/dV), one compare per score in the masked blocks. Without doc_ids the constexpr DOCS compiles it away
(the PTX of the bf16 d = 64 configs was compared, instruction for instruction, with that before documents came).

Precision: tiles are multiplied with ``tl.dot`` accumulating in fp32. fp16/bf16 inputs use the tensor cores directly;
fp32 inputs use input_precision="ieee" (no tf32), because tf32's 10-bit mantissa would put the kernel far above the
FlashAttention rule's bound of 2x eager fp32's own error. That makes fp32 correct but slow on a GPU; train in bf16.

Layouts: O and dq are allocated in q's layout, dk and dv in k's (``_utils.empty_like``: the input's strides where it
is dense). The model's q, k, v are (B, H, T, d) views of its (B, T, H, d) projections (RoPE keeps that layout, and v
shares k's), so O is (B, T, H, d) storage that output_proj reads as a view, and the gradients reach the projections'
backward as views too. Contiguous (B, H, T, d) outputs made each of the four a transpose copy reading and writing
2·B·T·H·d bytes in bf16: at 125M, 48 launches and 2.4 GB a step (bench.step), 3% of the step's HBM bytes. Inside the
kernels it costs nothing: every tensor is addressed by its strides, and a row of d elements is contiguous in either
layout (128 bytes at d 64 in bf16), so the tiles load in the same whole 128-byte lines.

Backward: two passes by default (dK/dV, then dQ: 7 dots a tile pair, deterministic), or FlashAttention-2's one pass
with an atomic fp32 dQ (5 dots, not bitwise reproducible) where $SMOLLM_ATTENTION_BWD=atomic or backward_pass("atomic")
says so; the comments above each backward kernel count their FLOPs and bytes.

Supported: head dims 16, 32, 64, 128; fp16, bf16, fp32; any strides (no copies of q, k, v, dO); T, S of any length;
doc_ids with causal attention, also when T < S (the ids then cover all S key positions).
"""

import dataclasses
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from smollm_stack.kernels._utils import INTERPRET, check_doc_ids, check_float, check_same_device, empty, empty_like
from smollm_stack.kernels._utils import Choice, document_ends, document_starts

__all__ = ["BACKWARD_PASSES", "backward_pass", "flash_attention"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = math.log2(math.e)  # log2(e): exp(x) = exp2(x * log2(e))


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """One kernel's autotune space.

    gpu: Hopper candidates (BLOCK_M, BLOCK_N, num_warps, num_stages, largest head dim[, largest head dim with
    documents, if lower]), chosen by lowering each for sm_90a through the real launch path
    (kernels.tooling.lowering: bf16, causal, the argument specialization of a GPU launch)
    at head dims 32, 64 and 128: a candidate is kept for a head dim only where every tl.dot became a wgmma and
    ptxas spilled nothing (tests/test_lowering_gates.py holds the kept lists to that). wgmma needs 64 accumulator rows
    per warpgroup, so the dK/dV kernel, whose accumulators are BLOCK_N rows, takes BLOCK_N >= 64 (at BLOCK_N = 32
    every dot is a legacy mma.sync). Its S^T = K Q^T and dP^T = V dO^T dots have N = BLOCK_M, and at BLOCK_M = 32 they
    are wgmma m64n32k16, which Hopper runs far below peak: at head dim 128, 48 of the 60 wgmma of a 32 x 64 config,
    half its FLOPs. So on Hopper (full_width_m) the candidates with BLOCK_M >= 64 are the only ones kept wherever one
    is: at head dims up to 64, where every wgmma is then m64n64 or wider (at 32 the dV and dK dots are n32 by the head
    dim itself). At head dim 128 every BLOCK_M = 64 candidate spills (the two BLOCK_N x 128 fp32 accumulators take
    128 registers a thread; the least, 64 x 128 with 8 warps and one stage, 9 STL / 10 LDL; 64 x 64 with 4 warps
    15-44; 8 warps on 64 x 64 spill nothing but split N, so their S^T and dP^T are n32 again), so the BLOCK_M = 32 stay
    there until the kernel holds less. With documents (DOCS) the dQ kernel's 128 x 64 candidate spills at head dim
    128 (24 spill instructions at 255 registers: the row starts and the third loop on top of its 128 x 128 fp32
    accumulator), so it stops at 64 there. Stage variants let the tuner trade shared
    memory (K/V or Q/dO tiles in flight) against occupancy. fp32 inputs take the FMA path (input_precision="ieee"),
    with twice the bytes per tile and far more registers, so they get the one small config fp32. Under the
    interpreter a single config, which also skips benchmarking; its blocks are deliberately unequal so that the
    tests cross BLOCK_M != BLOCK_N boundaries as the GPU configs do.
    The one-pass atomic backward (_attn_bwd_atomic) holds a BLOCK_M x d fp32 dQ^T tile on top of dK/dV's
    accumulators: on sm_90a its 64 x 64 configs with 4 warps fit up to head dim 64 (m64n64 wgmma only; 64 x 128 with
    8 warps fits too but splits N to n32, and 128-row tiles spill); at 128 every BLOCK_M = 64 candidate tried spills
    (tens to hundreds of spill instructions: 64 x 64 and 64 x 128, 4 or 8 warps, 1 to 3 stages) and 32 x 64 with 4 warps
    fits (its S^T, dP^T and dQ^T dots n32, as dK/dV's are there); with 8 warps that tile splits N down to n16.
    With documents it fits only up to head dim 32: at 64 the 64 x 64 configs spill 38 to 89 instructions with 4
    warps (8 fit but split every dot to n32), at 128 every candidate spills (22 to 264); there the two-pass backward
    runs instead (_atomic_backward_fits).
    """

    gpu: list  # of (BLOCK_M, BLOCK_N, num_warps, num_stages, largest head dim[, largest with documents])
    fp32: tuple  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    interpreter: tuple  # (BLOCK_M, BLOCK_N)
    smem_rows: Callable[[int, int, int], int]  # (BLOCK_M, BLOCK_N, stages) -> head-dim-wide rows kept in shared memory
    full_width_m: int = 0  # Hopper: where a candidate with BLOCK_M >= this is kept, only those (0: no such rule)


# Shared memory, as an upper bound: every pipeline stage of the streamed tiles (K and V in the forward and dQ
# kernels, Q and dO in dK/dV's) plus the tiles a program keeps (Q; Q and dO; K and V), all at 2 bytes an element.
# Lowered for sm_80 and sm_86 the kept configs use 60-85% of it (tests/test_lowering_archs.py holds each kept config
# to its card's limit), so a config the bound passes fits. The atomic backward adds 4·BLOCK_M rows for its fp32 dQ
# tile and dS^T on their way through shared memory (its kept sm_90a lowerings use 71-87% of that bound).
TUNING = {
    "_attn_fwd": Tuning(gpu=[(128, 64, 4, 3, 32), (128, 64, 8, 3, 128), (128, 64, 8, 4, 128), (128, 128, 8, 3, 64),
                             (64, 64, 4, 3, 128)], fp32=(32, 32, 4, 2), interpreter=(16, 32),
                        smem_rows=lambda m, n, stages: 2 * stages * n + m),
    "_attn_bwd_dkdv": Tuning(gpu=[(64, 128, 8, 3, 64), (64, 64, 4, 3, 64), (32, 128, 8, 3, 128), (32, 64, 4, 3, 128),
                                  (32, 64, 4, 4, 128)],
                             fp32=(32, 32, 8, 2), interpreter=(16, 32),
                             smem_rows=lambda m, n, stages: 2 * stages * m + 2 * n, full_width_m=64),
    "_attn_bwd_dq": Tuning(gpu=[(128, 64, 8, 3, 128, 64), (128, 32, 8, 3, 128), (64, 32, 4, 3, 128),
                                (64, 64, 4, 3, 128)], fp32=(32, 32, 4, 2), interpreter=(32, 16),
                           smem_rows=lambda m, n, stages: 2 * stages * n + 2 * m),
    "_attn_bwd_atomic": Tuning(gpu=[(64, 64, 4, 3, 64, 32), (64, 64, 4, 2, 64, 32), (32, 64, 4, 3, 128, 32)],
                               fp32=(32, 32, 8, 2), interpreter=(16, 32),
                               smem_rows=lambda m, n, stages: 2 * stages * m + 2 * n + 4 * m, full_width_m=64),
}  # fmt: skip
# Candidates that spill where tl.dot lowers to mma.sync (capability < 9.0), by (kernel, config, head dim), from
# lowering every candidate for sm_80 and sm_86 (the forward's 6 spill instructions on sm_86 in fp16, dQ's 2 on sm_80).
MMA_SPILLS = {("_attn_fwd", (128, 64, 8, 4), 32), ("_attn_bwd_dq", (128, 64, 8, 3), 32)}


def _target() -> tuple[int, int]:
    """(capability, e.g. 86, and shared memory a block may use) of the device Triton compiles for: its active
    driver's, a GPU's or kernels.tooling.lowering's compile-only stand-in's."""
    active = triton.runtime.driver.active
    smem = active.utils.get_device_properties(active.get_current_device())["max_shared_mem"]
    return active.get_current_target().arch, smem


def kept_configs(kernel: str, dtype: torch.dtype, head_dim: int, docs: bool, target=None) -> list[triton.Config]:
    """The configs the autotuner of ``kernel`` tries for these inputs on ``target`` ((capability, shared memory per
    block); default: the device Triton compiles for): its pruner, also what gpu_check's device section reports.

    A candidate is kept up to its largest head dim, where its shared-memory bound fits the card, and, below Hopper,
    unless it spills there (MMA_SPILLS); on Hopper only those with BLOCK_M >= full_width_m where there are any (full
    width wgmma, see Tuning); where none is left (head dim 128 on an RTX 3090's 99 KB), the small fp32
    config, whose bound fits every card. Where the dots are FMA (fp32 inputs; capability below 8.0, where Triton
    gives tl.dot no tensor cores and the large tiles spill hundreds of registers and need more shared memory than the
    bound), only the small config."""
    tuning = TUNING[kernel]
    if INTERPRET and target is None:
        return [_config(*tuning.interpreter, 1, 1)]
    capability, smem = target or _target()
    if dtype == torch.float32 or capability < 80:
        return [_config(*tuning.fp32)]
    kept = [_config(*c[:4]) for c in tuning.gpu
            if head_dim <= (c[-1] if docs else c[4]) and 2 * head_dim * tuning.smem_rows(c[0], c[1], c[3]) <= smem
            and not (capability < 90 and (kernel, c[:4], head_dim) in MMA_SPILLS)]  # fmt: skip
    if capability >= 90 and tuning.full_width_m:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] >= tuning.full_width_m] or kept
    return kept or [_config(*tuning.fp32)]


def _autotune(kernel: str):
    """Autotune arguments for one kernel: every candidate, pruned by kept_configs (one config in the interpreter,
    which also skips benchmarking).

    The key holds what changes the grid, (length / block, batch x heads), as tuning_len and tuning_heads: the best
    tiles for 24 (batch, head) programs a query block (a preflight's batch 2) are not those for 192 (batch 16), where
    smaller tiles no longer buy a fuller wave. (The autotuner adds the tensors' dtypes itself.)"""
    key = ["HEAD_DIM", "CAUSAL", "DOCS", "tuning_len", "tuning_heads"]
    if INTERPRET:
        return dict(configs=kept_configs(kernel, torch.float32, 0, False), key=key)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return kept_configs(kernel, args["Q"].dtype, args["HEAD_DIM"], args["DOCS"])

    configs = [_config(*c[:4]) for c in TUNING[kernel].gpu]
    return dict(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


def _tuning_size(n: int) -> int:
    """Autotune key for a length or a batch x heads: powers of two up to 4096, so a generation loop (T = 1, S
    growing) or a new prompt length or batch reuses an earlier choice instead of benchmarking again on every call."""
    return min(triton.next_power_of_2(n), 4096)


# Forward --------------------------------------------------------------------------------------------------------------


@triton.jit
def _query_block_start(BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """First row of this program's query block. Causal blocks further down see more keys, so they take the first
    program ids, which start first: the long programs overlap the short ones instead of trailing alone at the end."""
    pid = tl.program_id(0)
    if CAUSAL:
        pid = tl.num_programs(0) - 1 - pid
    return pid * BLOCK_M


@triton.jit
def _key_range(start_m, offset, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For the query block starting at row start_m (causal offset S - T): the end of the key blocks that need no mask
    (whole, in range, below the diagonal) and the end of the keys to visit at all (blocks past it are skipped)."""
    if CAUSAL:
        # the block's first row sees keys < start_m + offset + 1, so whole blocks up to there are unmasked
        unmasked_end = (start_m + offset + 1) // BLOCK_N * BLOCK_N
        end = tl.minimum(S, start_m + BLOCK_M + offset)
    else:
        unmasked_end = S // BLOCK_N * BLOCK_N
        end = S
    return unmasked_end, end


@triton.jit
def _document_key_range(row_start, row_ok, unmasked_end, BLOCK_N: tl.constexpr):
    """With documents, for a query block whose rows' documents start at row_start: the first key block to visit
    (the one holding the start of the first row's document: every key before it is in an earlier document for every
    row) and the first one that no row's document boundary cuts (from the last row's document start on), at most
    unmasked_end. Document ids are runs, so row_start is nondecreasing down the block: min and max are the first and
    last valid rows'."""
    first = tl.min(tl.where(row_ok, row_start, 2147483647), 0)
    last = tl.max(tl.where(row_ok, row_start, 0), 0)
    return first // BLOCK_N * BLOCK_N, tl.minimum(tl.cdiv(last, BLOCK_N) * BLOCK_N, unmasked_end)


@triton.jit
def _scores_block(
    q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, cols, offs_m, offs_d, S, offset,
    row_start,  # DOCS: (BLOCK_M,) first key position of each row's document
    MASKED: tl.constexpr,  # key block on the diagonal, past S or cut by a document start: load with bounds and mask
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block's K and V tiles and the raw scores q k^T, -inf where a key is hidden. The caller applies
    qk_scale inside the FMA that also subtracts the row's max or log-sum-exp (-inf stays -inf through it).

    Shared by the forward and the dQ pass, which walk the key blocks of a query block the same way."""
    k_ptrs = K + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd
    if MASKED:
        k = tl.load(k_ptrs, mask=cols[:, None] < S, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < S, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    if MASKED:
        keep = cols[None, :] < S
        if CAUSAL:
            keep = keep & (offs_m[:, None] + offset >= cols[None, :])
        if DOCS:  # with causality, "in the row's document" is "not before its start"
            keep = keep & (cols[None, :] >= row_start[:, None])
        s = tl.where(keep, s, float("-inf"))
    return s, k, v


@triton.jit
def _attn_fwd_blocks(
    acc, l_i, m_i, q, K, V,  # running state, this block's queries, K/V base pointers for this (batch, kv head)
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi, S, offset, row_start, qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # key blocks on the diagonal, past S or cut by a document start: bounds and masks
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        s, k, v = _scores_block(
            q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, start_n + offs_n, offs_m, offs_d, S, offset,
            row_start, MASKED, CAUSAL, DOCS, DOT_PRECISION,
        )
        # Every row sees at least one key in the first block it visits (key 0, or a whole unmasked block), so m_new
        # is finite from then on and exp2(m_i - m_new) never meets -inf - -inf, however large the scores.
        # The scale is positive, so max(s) * scale is the max of the scaled scores with the same rounding, and the
        # scale and the max subtraction are one FMA per score.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_base = m_new
        if MASKED:
            if DOCS:
                # Not so with documents: a row whose document starts past this block has no key in it yet. Its m
                # stays -inf and the exponentials take 0 as their base, so alpha and p are exp2(-inf) = 0, not NaN.
                m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_base)  # rescales what was accumulated under the old max
        p = tl.math.exp2(s * qk_scale - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(**_autotune("_attn_fwd"))
@triton.jit
def _attn_fwd(
    Q, K, V, Out, LSE,  # LSE: (B, H, T) fp32, per-row log-sum-exp of the scaled scores in base 2
    DOC_START,  # DOCS: (B, S) int32, the first position of each key position's document
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, S,
    group,  # query heads per K/V head
    qk_scale,  # scale * log2(e)
    tuning_len, tuning_heads,  # only autotune keys
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,  # mask across documents (CAUSAL only)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = _query_block_start(BLOCK_M, CAUSAL)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    K += b * stride_kb + (h // group) * stride_kh
    V += b * stride_vb + (h // group) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offset = S - T
    unmasked_end, end = _key_range(start_m, offset, S, BLOCK_M, BLOCK_N, CAUSAL)
    lo, row_start = 0, 0
    if DOCS:  # skip the blocks of earlier documents; mask those cut by a document start of this block's rows
        row_start = tl.load(DOC_START + b * S + offs_m + offset, mask=row_ok, other=0)
        first, lo = _document_key_range(row_start, row_ok, unmasked_end, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                                         offs_m, offs_d, first, lo, S, offset, row_start, qk_scale,
                                         BLOCK_N, True, CAUSAL, DOCS, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                                     offs_m, offs_d, lo, unmasked_end, S, offset, row_start, qk_scale,
                                     BLOCK_N, False, CAUSAL, DOCS, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                                     offs_m, offs_d, unmasked_end, end, S, offset, row_start, qk_scale,
                                     BLOCK_N, True, CAUSAL, DOCS, DOT_PRECISION)

    o = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# Backward -------------------------------------------------------------------------------------------------------------
#
# With P = softmax(scale * Q K^T + mask) row-wise, O = P V and the upstream gradient dO:
#
#   dV = P^T dO
#   dP = dO V^T
#   dS = P * (dP - delta),   delta_i = sum_j P_ij dP_ij = sum_j P_ij (dO_i . V_j) = dO_i . O_i
#   dQ = scale * dS K
#   dK = scale * dS^T Q
#
# dS is the softmax Jacobian applied to dP; delta turns it into the elementwise form above and costs one pass over
# O and dO (_attn_bwd_delta). P is never stored: every tile is recomputed as exp2(scale * log2(e) * q.k - lse2) from
# the forward's base-2 log-sum-exp, which also normalises it. dK and dV are sums over queries while dQ is a sum over
# keys, so they come from two kernels that each own what they write: one program per key block, looping over every
# query head of its GQA group and over the query blocks that can see it (GQA's sum over heads happens in registers);
# one program per query block, looping over its keys like the forward. No atomics: the same bits on every run.
# The price is two more dots than FlashAttention-2's one-pass backward with an atomic dQ (opt-in, _attn_bwd_atomic
# below): 7 (4 in dK/dV: S^T, dV, dP^T, dK; 3 in dQ: S, dP, dQ) against 5, so 3.5x the forward's matmul FLOPs instead of
# 2.5x, and P is recomputed twice. The scale is not pre-multiplied into K: rounding k·scale to bf16 would move each
# recomputed score by up to 2^-9 of its size, so P would no longer match the forward's log-sum-exp (at the large-score
# test's 1e4 that is exp2 of dozens); folding the scale into the FMA with the log-sum-exp subtraction costs the same one
# instruction per score and rounds once.
# Masking sets scores to -inf before exp2, as in the forward: a masked pair's raw score may exceed its row's lse by
# thousands under large inputs, and exp2 of that would be inf. Padded rows and keys (past T or S) only ever feed
# rows of dK, dV or dQ that are not stored.


@triton.jit
def _attn_bwd_delta(
    Out, DO, DELTA,  # DELTA: (B, H, T) fp32
    DQ,  # ZERO_DQ: the atomic backward's fp32 dQ, zeroed here rather than by a launch of its own
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T,
    HEAD_DIM: tl.constexpr,
    ZERO_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)
    if ZERO_DQ:
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], tl.float32), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_dkdv_blocks(
    dk, dv, k, v, Q, DO, LSE, DELTA,  # accumulators, this block's keys/values, base pointers for one query head
    DQ,  # ATOMIC_DQ: that head's fp32 dQ accumulator
    stride_qt, stride_qd, stride_dot, stride_dod, stride_dqt, stride_dqd,
    DOC_START,  # DOCS: this batch row's (S,) document starts
    offs_n, offs_d, lo, hi, T, offset, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,  # query blocks on the diagonal, past T or past a document end: bounds and masks
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,  # also add this block's dQ = scale dS K into DQ (_attn_bwd_atomic)
    DOT_PRECISION: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
        do_ptrs = DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
        if MASKED:
            row_ok = offs_m < T
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        # tiles are transposed (keys x queries) so that dV and dK come straight out of the dots
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if MASKED:
            keep = offs_m[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[None, :] + offset >= offs_n[:, None])
            elif ATOMIC_DQ:  # keys past S: their dS would reach dQ's stored rows (as 0 * exp2 of anything)
                keep = keep & (offs_n[:, None] < T + offset)
            if DOCS:
                q_start = tl.load(DOC_START + offs_m + offset, mask=row_ok, other=0)
                keep = keep & (offs_n[:, None] >= q_start[None, :])
            sT = tl.where(keep, sT, float("-inf"))
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])  # one FMA per score
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            # a wgmma needs M >= 64: as K^T dS^T, M is the head dim (so BLOCK_M = 32 tiles keep wgmma), as dS K BLOCK_M
            if k.shape[1] >= 64:
                dq = tl.trans(tl.dot(tl.trans(k), dsT, input_precision=DOT_PRECISION))
            else:
                dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION)
            dq_ptrs = DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
            if MASKED:
                tl.atomic_add(dq_ptrs, dq * sm_scale, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq * sm_scale, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_key_block(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, DOC_START, DOC_END,  # _attn_bwd_atomic's arguments (DQ: None in dK/dV's)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, S, group, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program of the dK/dV pass: this key block's dK and dV over every query that sees it, and with ATOMIC_DQ
    those queries' dQ contributions added into DQ."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)
    b, hk = bhk // (H // group), bhk % (H // group)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < S
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)

    # Query blocks [lo, mid) straddle the diagonal, [mid, full_end) see every key of this block, and the ragged tail
    # [full_end, T) is masked for its bounds; blocks before lo see none of these keys and are skipped.
    full_end = T // BLOCK_M * BLOCK_M
    offset = S - T
    if CAUSAL:
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M, full_end)
    else:
        lo = 0
        mid = 0
        if ATOMIC_DQ:  # a key block reaching past S is masked throughout (causal never leaves one unmasked)
            full_end = tl.where(start_n + BLOCK_N > S, 0, full_end)
    hi = T
    if DOCS:
        # Queries past the end of the last key's document see none of this block, and those before the end of the
        # first key's document see all of it (causality permitting): only the query blocks between are masked.
        key_end = tl.load(DOC_END + b * S + offs_n, mask=col_ok, other=0)
        first_end = tl.min(tl.where(col_ok, key_end, 2147483647), 0) - offset  # in query rows
        hi = tl.minimum(T, tl.cdiv(tl.max(key_end, 0) - offset, BLOCK_M) * BLOCK_M)
        mid = tl.minimum(mid, hi)
        full_end = tl.minimum(full_end, tl.maximum(first_end // BLOCK_M * BLOCK_M, mid))
        DOC_START += b * S

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(group):
        h = hk * group + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        LSEh = LSE + (b * H + h) * T
        DELTAh = DELTA + (b * H + h) * T
        DQh = DQ
        if ATOMIC_DQ:
            DQh = DQ + b * stride_dqb + h * stride_dqh
        dk, dv = _attn_bwd_dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_qd, stride_dot,
                                       stride_dod, stride_dqt, stride_dqd, DOC_START, offs_n, offs_d, lo, mid, T,
                                       offset, qk_scale, sm_scale, BLOCK_M, True, CAUSAL, DOCS, ATOMIC_DQ,
                                       DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_qd, stride_dot,
                                       stride_dod, stride_dqt, stride_dqd, DOC_START, offs_n, offs_d, mid, full_end, T,
                                       offset, qk_scale, sm_scale, BLOCK_M, False, CAUSAL, DOCS, ATOMIC_DQ,
                                       DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, DQh, stride_qt, stride_qd, stride_dot,
                                       stride_dod, stride_dqt, stride_dqd, DOC_START, offs_n, offs_d, full_end, hi, T,
                                       offset, qk_scale, sm_scale, BLOCK_M, True, CAUSAL, DOCS, ATOMIC_DQ,
                                       DOT_PRECISION)

    out = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.autotune(**_autotune("_attn_bwd_dkdv"))
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # DK, DV: both laid out like K
    DOC_START, DOC_END,  # DOCS: (B, S) int32, the first and one past the last position of each key's document
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    H, T, S, group, sm_scale, qk_scale,
    tuning_len, tuning_heads,  # only autotune keys
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    _attn_bwd_key_block(Q, K, V, DO, LSE, DELTA, DK, DV, None, DOC_START, DOC_END,
                        stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd, stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_dkb, stride_dkh, stride_dkt, stride_dkd, 0, 0, 0, 0,
                        H, T, S, group, sm_scale, qk_scale, HEAD_DIM, CAUSAL, DOCS, False, DOT_PRECISION,
                        BLOCK_M, BLOCK_N)


@triton.jit
def _attn_bwd_dq_blocks(
    dq, q, do, lse, delta, K, V,  # accumulator, this block's rows, K/V base pointers for this (batch, kv head)
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi, S, offset, row_start, qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # key blocks on the diagonal, past S or cut by a document start: bounds and masks
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        s, k, v = _scores_block(
            q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, start_n + offs_n, offs_m, offs_d, S, offset,
            row_start, MASKED, CAUSAL, DOCS, DOT_PRECISION,
        )
        p = tl.math.exp2(s * qk_scale - lse[:, None])  # one FMA per score
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(**_autotune("_attn_bwd_dq"))
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,  # DQ: laid out like Q
    DOC_START,  # DOCS: (B, S) int32, the first position of each key position's document
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, S, group, sm_scale, qk_scale,
    tuning_len, tuning_heads,  # only autotune keys
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = _query_block_start(BLOCK_M, CAUSAL)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    K += b * stride_kb + (h // group) * stride_kh
    V += b * stride_vb + (h // group) * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offset = S - T
    unmasked_end, end = _key_range(start_m, offset, S, BLOCK_M, BLOCK_N, CAUSAL)
    lo, row_start = 0, 0
    if DOCS:  # the forward's walk over the key blocks
        row_start = tl.load(DOC_START + b * S + offs_m + offset, mask=row_ok, other=0)
        first, lo = _document_key_range(row_start, row_ok, unmasked_end, BLOCK_N)
        dq = _attn_bwd_dq_blocks(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                                 offs_m, offs_d, first, lo, S, offset, row_start, qk_scale,
                                 BLOCK_N, True, CAUSAL, DOCS, DOT_PRECISION)
    dq = _attn_bwd_dq_blocks(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                             offs_m, offs_d, lo, unmasked_end, S, offset, row_start, qk_scale,
                             BLOCK_N, False, CAUSAL, DOCS, DOT_PRECISION)
    dq = _attn_bwd_dq_blocks(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                             offs_m, offs_d, unmasked_end, end, S, offset, row_start, qk_scale,
                             BLOCK_N, True, CAUSAL, DOCS, DOT_PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# One-pass backward with an atomic dQ (optional: SMOLLM_ATTENTION_BWD=atomic) -----------------------------------------
#
# FlashAttention-2's own backward: the dK/dV pass above, whose tiles already hold dS^T and K, also forms each query
# block's share of dQ there, dQ_i += scale dS_ij K_j, and adds it into a zeroed fp32 (B, H, T, d) buffer with atomic
# adds; one cast to the input dtype follows. 5 dots a tile (S^T, dV, dP^T, dK, dQ) instead of the two-pass 7:
# 2.5x the forward's matmul FLOPs instead of 3.5x, and P is recomputed once instead of twice.
# Bytes: the dQ pass's reads are gone (Q, dO, LSE and delta once and K, V once per query block, mostly L2 hits);
# in their place every (query block, key block) tile the dK/dV pass visits adds a BLOCK_M x d fp32 tile into dQ,
# 4·d bytes per query row and visiting key block: 4·B·H·T·d·S / (2·BLOCK_N) bytes of atomic adds in causal attention,
# S / (2·BLOCK_N) times the fp32 dQ itself (8x at S = 1024, BLOCK_N = 64). They are reductions done in L2, which holds
# the dQ rows that the programs of one K/V head (running together) update; HBM sees the zeroing (4 bytes an element,
# in the delta kernel, which reads O and dO there anyway), the buffer read into L2 and written back (4 + 4) and the
# cast (4 read, 2 written) against the two-pass dQ's 2-byte store: 16 more bytes per element of dQ (bench.step counts
# that), for two fewer dots. With GQA the group's query heads are visited in turn by the same program, so the atomics
# of one key block go to `group` different heads' rows.
# Nondeterministic: the key blocks' programs add into the same dQ rows in whatever order the GPU runs them, and fp32
# addition is not associative, so dQ's last bits (and what training does with them) differ from run to run; dK and dV
# are summed in registers in a fixed order and stay bitwise. Hence opt-in; the two-pass default is deterministic.
# A wgmma needs 64 rows a warpgroup (M): dQ = dS K has M = BLOCK_M, so the 32-row tiles that fit head dim 128 would
# issue it as a legacy mma.sync; there it is taken transposed, dQ^T = K^T dS^T, whose M is the head dim, as at 64
# (where it also takes fewer registers and less shared memory); below 64 as dS K, with BLOCK_M = 64.
# The atomics are 16-byte red.global.add.v4.f32 (the tile passes through shared memory to get there).


@triton.autotune(**_autotune("_attn_bwd_atomic"))
@triton.jit
def _attn_bwd_atomic(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # DK, DV: both laid out like K
    DQ,  # (B, H, T, d) fp32, zeroed: dQ summed over key blocks with atomic adds
    DOC_START, DOC_END,  # DOCS: (B, S) int32, the first and one past the last position of each key's document
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, S, group, sm_scale, qk_scale,
    tuning_len, tuning_heads,  # only autotune keys
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    _attn_bwd_key_block(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, DOC_START, DOC_END,
                        stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd, stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_dkb, stride_dkh, stride_dkt, stride_dkd, stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                        H, T, S, group, sm_scale, qk_scale, HEAD_DIM, CAUSAL, DOCS, True, DOT_PRECISION,
                        BLOCK_M, BLOCK_N)


# Launchers ------------------------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def _forward(q, k, v, causal: bool, scale: float, doc_start=None) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, d = q.shape
    S = k.shape[2]
    o = empty_like(q)  # q's layout: (B, T, H, d) storage when q is the projection's view
    lse = empty((B, H, T), torch.float32, q.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _attn_fwd[grid](
        q, k, v, o, lse, doc_start, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, T, S, H // k.shape[1], scale * LOG2E, _tuning_size(T), _tuning_size(B * H),
        HEAD_DIM=d, CAUSAL=causal, DOCS=doc_start is not None, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return o, lse


def _atomic_backward_fits(head_dim: int, docs: bool) -> bool:
    """Whether the atomic backward has a candidate for this head dim (Tuning: with documents it spills past 32);
    always in the interpreter, which has no registers to spill."""
    return INTERPRET or any(head_dim <= (c[-1] if docs else c[4]) for c in TUNING["_attn_bwd_atomic"].gpu)


def _backward(
    do, q, k, v, o, lse, causal: bool, scale: float, doc_start=None, doc_end=None, atomic: bool = False, out=None
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv), fresh, or written into out = (dq, dk, dv), where dk and dv share their strides."""
    B, H, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    atomic = atomic and _atomic_backward_fits(d, doc_start is not None)
    delta = empty((B, H, T), torch.float32, q.device)
    # the atomic backward's dQ sum, in q's layout, zeroed by the delta kernel
    dq32 = empty_like(q, torch.float32) if atomic else None
    block = 16 if INTERPRET else 64
    _attn_bwd_delta[(triton.cdiv(T, block), B * H)](
        o, do, delta, dq32, *o.stride(), *do.stride(), *(dq32.stride() if atomic else (0, 0, 0, 0)), H, T,
        HEAD_DIM=d, ZERO_DQ=atomic, BLOCK_M=block,
    )
    # dq in q's layout; dk and dv in k's, which is v's in the model (views of (B, T, Hkv, d) projections): one set of
    # strides for both (four more kept sm_80's 64 x 128 dK/dV config from fitting its registers)
    dk, dv = (empty_like(k), empty_like(k)) if out is None else out[1:]
    common = dict(HEAD_DIM=d, CAUSAL=causal, DOCS=doc_start is not None, DOT_PRECISION=_dot_precision(q.dtype))
    if atomic:
        kernel, dq_args = _attn_bwd_atomic, (dq32, doc_start, doc_end, *q.stride(), *k.stride(), *v.stride(),
                                             *do.stride(), *dk.stride(), *dq32.stride())
    else:
        kernel, dq_args = _attn_bwd_dkdv, (doc_start, doc_end, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                                           *dk.stride())
    kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, *dq_args,
        H, T, S, H // Hkv, scale, scale * LOG2E, _tuning_size(S), _tuning_size(B * Hkv), **common,
    )
    if atomic and q.dtype == torch.float32 and out is None:
        return dq32, dk, dv  # the fp32 sum is dq
    dq = empty_like(q) if out is None else out[0]
    if atomic:
        return dq.copy_(dq32), dk, dv  # the one cast (or copy into out)
    _attn_bwd_dq[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, doc_start, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, T, S, H // Hkv, scale, scale * LOG2E, _tuning_size(T), _tuning_size(B * H), **common,
    )
    return dq, dk, dv


BACKWARD_PASSES = ("two-pass", "atomic")  # the deterministic default; FlashAttention-2's one pass, atomic dQ
# $SMOLLM_ATTENTION_BWD, or ``with backward_pass("atomic"):``; the choice is made at the forward call and kept for its
# backward.
_BACKWARD_PASS = Choice("SMOLLM_ATTENTION_BWD", "backward pass", BACKWARD_PASSES, "two-pass")
backward_pass = _BACKWARD_PASS.override


def _atomic_backward() -> bool:
    return _BACKWARD_PASS.value() == "atomic"


# The forward and backward as torch.library custom ops, with fake (shape-only) versions, so that torch.compile
# traces a model through them with no graph break; the Triton launches stay opaque to it.
@torch.library.custom_op("smollm_stack::flash_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor | None, doc_end: torch.Tensor | None,
    causal: bool, scale: float, atomic: bool,  # atomic: the backward's choice, kept for it
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, scale, doc_start)


@_attention_op.register_fake
def _(q, k, v, doc_start, doc_end, causal, scale, atomic):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)  # the layouts of _forward's


@torch.library.custom_op("smollm_stack::flash_attention_backward", mutates_args=())
def _attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    doc_start: torch.Tensor | None, doc_end: torch.Tensor | None, causal: bool, scale: float, atomic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, causal, scale, doc_start, doc_end, atomic)


@_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, doc_start, doc_end, causal, scale, atomic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(k)  # the layouts of _backward's


def _setup_context(ctx, inputs, output):
    q, k, v, doc_start, doc_end, ctx.causal, ctx.scale, ctx.atomic = inputs
    ctx.save_for_backward(q, k, v, *output, doc_start, doc_end)


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(do, q, k, v, o, lse, doc_start, doc_end, ctx.causal, ctx.scale, ctx.atomic)
    return dq, dk, dv, None, None, None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_setup_context)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            "flash_attention expects q (B, H, T, d) and k, v (B, Hkv, S, d), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    (B, H, T, d), (Bk, Hkv, S, dk) = q.shape, k.shape
    if B != Bk or d != dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head dim")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"flash_attention needs at least one query and one key, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if B * H > 65535:  # (batch, head) is the launch grid's second dimension, which CUDA caps at 65535
        raise ValueError(f"flash_attention supports batch x heads <= 65535, got {B} x {H}")
    if causal and T > S:
        raise ValueError(f"causal attention needs T <= S (queries are the last T of S positions), got T={T}, S={S}")


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T) v with grouped-query heads: q (B, H, T, d), k and v (B, Hkv, S, d), H a multiple of Hkv.

    Query head h reads K/V head h // (H // Hkv) without repeating K/V. With causal=True and T < S the queries are the
    last T positions (KV-cache decoding). scale defaults to 1/sqrt(d). doc_ids (B, S) integers, one per key position
    (query i is position S - T + i), mask attention across documents: a document is a run of equal consecutive ids,
    and a query sees only the keys of its own (causal only). Differentiable in q, k and v; the result is in the input
    dtype. Same semantics as ``kernels.reference.flash_attention``. The backward is the deterministic two-pass one,
    or the one-pass atomic-dQ one where ``$SMOLLM_ATTENTION_BWD`` or ``backward_pass`` says "atomic".
    """
    doc_start, doc_end, scale = checked(q, k, v, causal, scale, doc_ids)
    return _attention_op(q, k, v, doc_start, doc_end, causal, scale, _atomic_backward())[0]


def checked(q, k, v, causal: bool, scale: float | None, doc_ids: torch.Tensor | None):
    """flash_attention's checks; its documents' (start, end) bounds (None without doc_ids) and its scale."""
    _check_inputs(q, k, v, causal)
    doc_start = doc_end = None
    if doc_ids is not None:
        check_doc_ids(doc_ids, k, causal)
        doc_start, doc_end = document_starts(doc_ids), document_ends(doc_ids)
    return doc_start, doc_end, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
