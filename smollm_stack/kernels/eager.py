"""The fast eager backend: every kernel of this package from PyTorch's best built-in ops, same names and signatures.

This is what the model runs without Triton (``backend="eager"``, and so every CPU run) and the honest "eager
PyTorch" that benchmarks race our kernels against. It is not the test oracle: ``kernels.reference`` stays the
obviously-correct fp32/fp64 version, and tests/test_eager_backend.py holds this file to it.

Where the time goes on a CPU, and what each op does about it (17M preset, 8 x 256 tokens, fp32):
- attention: ``F.scaled_dot_product_attention`` runs a fused flash-style kernel that never materializes the
  (T, S) scores, reads each K/V head for its whole query group (``enable_gqa``, no ``repeat_interleave``) and
  applies the causal mask from the shape (no mask tensor), 5-10x faster than the reference's explicit softmax;
- RMSNorm: ``F.rms_norm`` (after the residual add, in add_rms_norm); SwiGLU: ``F.silu(g) * u``, two elementwise
  passes that autograd differentiates;
- RoPE: one complex multiply on a view of the adjacent pairs (no unflatten/stack/flatten copies);
- the loss: lm_head and cross-entropy fused in chunks of rows, the logits' gradient computed in the forward pass
  (softmax - one-hot) so backward only scales it; each chunk is upcast to fp32 on its own, never the whole
  (tokens, V) logits, and the logits never live beyond their chunk; its products, like the model's linear layers,
  go through ``kernels.cpu_blas`` (OpenBLAS rather than MKL for large products on AMD CPUs).
"""

import math

import torch
import torch.nn.functional as F

from smollm_stack.kernels._utils import check_doc_ids, document_starts
from smollm_stack.kernels.cpu_blas import mm

# Logits kept per chunk of the fused loss on a GPU: large enough that each chunk's matmuls run at full speed, small
# enough that a 50k vocabulary never holds all its logits (and their fp32 copy).
CHUNK_BUDGET_BYTES = 256 * 2**20
# Rows per chunk on a CPU, whatever the vocabulary. Fwd+bwd of 2048 rows on the 2-core AMD CPU (bench.cpu_blas):
# at V = 10000, d = 512 (OpenBLAS) 256 rows took 670 ms and 512-2048 rows 605-642, within the machine's noise; at
# V = 2048, d = 128 (MKL) 53 ms at 256 rows, 48 at 512, 44-45 at 1024-2048. 1024 rows: as fast as any, and half the
# memory of 2048 (at V = 50257 a chunk's fp32 logits are 206 MB). See bench/RESULTS.md, "Matrix products on the CPU".
CPU_CHUNK_ROWS = 1024


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, accumulated in fp32; the result in out_dtype (x's).

    F.rms_norm upcasts half inputs to fp32 for the statistics itself, so nothing here copies x.
    """
    y = F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    return y if out_dtype is None else y.to(out_dtype)


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = x + r: PyTorch has no fused add-and-norm, so the add and the norm as they are."""
    h = x + r
    return h, rms_norm(h, weight, eps, out_dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


def _rotations(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """exp(i * pos * theta^(-2j/d)) for pair j: complex64, positions.shape + (head_dim // 2,)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles)


def _rotate(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """x (..., T, d) with pair j of each row turned by rotations (T, d/2) or (B, T, d/2), broadcast over heads."""
    if rotations.dim() == 3 and x.dim() == 4:
        rotations = rotations[:, None]  # (B, 1, T, d/2)
    # (x0 + i x1) * (cos + i sin) is exactly the pair rotation; view_as_complex reads the pairs in place.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Turn adjacent pairs (x[2i], x[2i+1]) of x (..., T, d) by positions * theta^(-2i/d); positions (T,) or (B, T)."""
    return _rotate(x, _rotations(positions, x.shape[-1], theta))


def apply_rope_qk(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope on q and k with one table of rotations for both."""
    rotations = _rotations(positions, q.shape[-1], theta)
    return _rotate(q, rotations), _rotate(k, rotations)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T) v with grouped-query heads: q (B, H, T, d), k and v (B, Hkv, S, d), H a multiple of Hkv.

    With causal=True and T < S the queries are the last T positions (KV-cache decoding). SDPA's is_causal aligns the
    mask to the top left (query i sees keys j <= i), which is right only for T == S; one query (T == 1) sees every
    key, so needs no mask; a chunk of 1 < T < S queries gets the end-aligned mask explicitly. doc_ids (B, S) (a
    document is a run of equal consecutive ids, as in kernels.attention) make it block-causal: one (B, 1, T, S)
    boolean mask per call, query p sees keys from its document's start to itself.
    """
    T, S = q.shape[-2], k.shape[-2]
    if causal and T > S:
        raise ValueError(f"causal attention needs T <= S (queries are the last T of S positions), got T={T}, S={S}")
    mask = None
    if doc_ids is not None:
        check_doc_ids(doc_ids, k, causal)
        keys = torch.arange(S, device=q.device)
        start = document_starts(doc_ids)[:, S - T :, None]  # (B, T, 1): the first key each query sees
        mask = ((keys >= start) & (keys <= keys[S - T :, None]))[:, None]  # (B, 1, T, S)
    elif causal and 1 < T < S:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    is_causal = causal and T == S and T > 1 and doc_ids is None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True)


def rope_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
    causal: bool = True, scale: float | None = None, doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash_attention on apply_rope_qk's q and k (one op in the Triton backend, for its backward's sake)."""
    q, k = apply_rope_qk(q, k, positions, theta)
    return flash_attention(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over every non-ignored position; a fp32 scalar (0 if all are ignored).

    F.cross_entropy accumulates in fp32 inside its kernel whatever the logits' dtype; the per-row losses come out in
    that dtype (one rounding each) and are summed in fp32, so no fp32 copy of the logits is made.
    """
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    losses = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # 0 where ignored
    return losses.float().sum() / (targets != ignore_index).sum().clamp_min(1)


def _loss_and_grads(h, w, t, ignore_index: int, with_grad: bool):
    """Sum of the losses of rows h (n, d) against w (V, d), and (if with_grad) d(sum)/dh and d(sum)/dw.

    The logits of one chunk: log_softmax in fp32, the loss gathered from it, then exp() in place turns it into the
    softmax, and subtracting the one-hot gives the gradient of the summed loss with respect to the logits. Ignored
    rows are zeroed in h and in dh, (n, d), rather than in that gradient, (n, V).
    """
    logp = torch.log_softmax(mm(h, w.t()), dim=-1, dtype=torch.float32)  # (n, V); a fp32 chunk, never the whole
    keep = (t != ignore_index)[:, None]
    rows = torch.where(keep, t[:, None], 0)
    loss = -(logp.gather(1, rows) * keep).sum()
    if not with_grad:
        return loss, None, None
    grad = logp.exp_()
    grad.scatter_add_(1, rows, torch.full_like(rows, -1, dtype=grad.dtype))
    grad = grad.to(h.dtype)
    return loss, mm(grad, w) * keep, mm(grad.t(), h * keep)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int, with_grad: bool):
        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        w = weight.to(h.dtype)  # the matmuls run in the activations' dtype, as lm_head would under autocast
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if with_grad else None
        dw = None
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk_loss, chunk_dh, chunk_dw = _loss_and_grads(h[rows], w, t[rows], ignore_index, with_grad)
            loss += chunk_loss
            if with_grad:
                dh[rows] = chunk_dh
                dw = chunk_dw.float() if dw is None else dw + chunk_dw
        count = (t != ignore_index).sum().clamp_min(1)
        if with_grad:
            ctx.save_for_backward(dh, dw, count)
            ctx.shapes = hidden.shape, weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, dloss):
        dh, dw, count = ctx.saved_tensors
        shape, weight_dtype = ctx.shapes
        scale = dloss / count
        return (dh * scale.to(dh.dtype)).reshape(shape), (dw * scale).to(weight_dtype), None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) with the logits only ever one chunk of rows at a time; a fp32 scalar.

    hidden (..., d) and weight (V, d) may differ in dtype (bf16 activations, fp32 weight): the matmuls run in
    hidden's dtype and each gradient comes back in its input's dtype. chunk_size (rows per chunk) overrides the
    default (CPU_CHUNK_ROWS on a CPU, budget-derived elsewhere); tests use it to force many chunks.
    """
    if targets.shape != hidden.shape[:-1]:
        shapes = f"hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}"
        raise ValueError(f"targets must have shape hidden.shape[:-1]; got {shapes}")
    n_rows = max(1, math.prod(targets.shape))
    if chunk_size is None and hidden.device.type == "cpu":
        chunk_size = CPU_CHUNK_ROWS
    elif chunk_size is None:  # fp32 logits and their log-softmax: 4 bytes per logit
        chunk_size = max(128, CHUNK_BUDGET_BYTES // (4 * weight.shape[0]))
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, min(chunk_size, n_rows), with_grad)
