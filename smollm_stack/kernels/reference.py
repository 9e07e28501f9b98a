"""Eager PyTorch references for every kernel in this package.

One home for each reference: the tests compare the Triton kernels and the fast eager backend (``kernels.eager``)
against these, and the trainer's preflight and the benchmarks' correctness checks use them as gold. The model does
not run them (``backend="eager"`` is ``kernels.eager``). They favour clarity over speed, and do their reductions in
fp32 (fp64 stays fp64) before casting back to the input dtype.
"""

import math

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 for the math, except that fp64 stays fp64 so the references double as high-precision gold."""
    return x if x.dtype == torch.float64 else x.float()


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax: subtracting the max keeps exp() from overflowing for large inputs."""
    xf = upcast(x)
    e = torch.exp(xf - xf.amax(dim=dim, keepdim=True))
    return (e / e.sum(dim=dim, keepdim=True)).to(x.dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU (swish): x * sigmoid(x)."""
    return x * torch.sigmoid(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated half of a SwiGLU FFN: silu(gate) * up (the projections stay outside)."""
    return silu(gate) * up


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32 and cast to out_dtype (default x's)."""
    xf = upcast(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * upcast(weight)).to(out_dtype or x.dtype)


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h, weight, eps, out_dtype)) with h = x + r in x + r's dtype, as a residual stream holds it."""
    h = (upcast(x) + upcast(r)).to(torch.promote_types(x.dtype, r.dtype))
    return h, rms_norm(h, weight, eps, out_dtype)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles pos * theta^(-2i/d) for pair i, shape positions.shape + (head_dim // 2,), in fp32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    return positions.float()[..., None] * inv_freq


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (..., T, d) by positions * theta^(-2i/d).

    positions is (T,) or (B, T); with (B, T) and x of shape (B, H, T, d) the angle is shared across heads.
    This is the RoFormer / original-Llama convention, not the rotate-half one of Hugging Face.
    """
    d = x.shape[-1]
    angles = rope_angles(positions, d, theta)  # (T, d/2) or (B, T, d/2)
    if angles.dim() == 3 and x.dim() == 4:
        angles = angles[:, None]  # (B, 1, T, d/2): broadcast over heads
    cos, sin = angles.cos(), angles.sin()
    pairs = upcast(x).unflatten(-1, (d // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v over any leading dims, with an explicit fp32 softmax.

    q (..., T, d), k and v (..., S, d); mask broadcastable to (..., T, S), True where a query may attend.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (upcast(q) @ upcast(k).transpose(-2, -1)) * scale  # (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (softmax(scores, dim=-1) @ upcast(v)).to(q.dtype)


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) boolean mask for T queries that are the last T of S keys: query i sees keys j <= S - T + i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def document_mask(doc_ids: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, S) boolean mask, True where query i (key position S - T + i) and key j lie in one document.

    doc_ids is (B, S), one integer per key position; a document is a run of equal consecutive ids, numbered here by
    counting the changes before each position, so that a repeated id further on starts a new document.
    """
    changes = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    run = torch.cat([torch.zeros_like(changes[:, :1]), changes.cumsum(dim=1)], dim=1)  # (B, S) document numbers
    return (run[:, -T:, None] == run[:, None, :])[:, None]


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with grouped-query heads: q (B, H, T, d), k and v (B, Hkv, S, d), H a multiple of Hkv.

    Query head h reads K/V head h // (H // Hkv). With causal=True and T < S the queries are the last T positions
    (KV-cache decoding), so the mask is aligned to the end. doc_ids (B, S) also hides every key outside the query's
    document (document_mask).
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T, S = q.shape[-2], k.shape[-2]
    mask = causal_mask(T, S, q.device) if causal else None
    if doc_ids is not None:
        mask = document_mask(doc_ids, T) if mask is None else mask & document_mask(doc_ids, T)
    return scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)


def rope_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
    causal: bool = True, scale: float | None = None, doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash_attention on q and k turned by apply_rope."""
    q, k = apply_rope(q, positions, theta), apply_rope(k, positions, theta)
    return flash_attention(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over every non-ignored position of any leading dims, in fp32.

    Returns a fp32 scalar whatever the logits' dtype; 0 when every target is ignored.
    """
    logits = upcast(logits.reshape(-1, logits.shape[-1]))
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    target_logit = logits.gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    losses = (torch.logsumexp(logits, dim=-1) - target_logit) * keep
    return losses.sum() / keep.sum().clamp_min(1)


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets): the lm_head matmul and the loss (here with full logits)."""
    return cross_entropy(hidden @ weight.t(), targets, ignore_index=ignore_index)
