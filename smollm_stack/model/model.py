"""A Llama-style decoder-only transformer, readable top to bottom.

token_embeddings -> num_layers x TransformerBlock -> ln_final (RMSNorm) -> lm_head -> logits
                    (with value_embeddings, block i also adds value_embeddings[i](ids) to its attention values)

Every module with an op that has a Triton kernel (RMSNorm, SwiGLU, RoPE, attention, the loss) asks
``kernels.ops(kernels.resolve_backend(config.backend, x.device))`` on each call, so the same model runs Triton on CUDA
and the fast eager backend (``kernels.eager``) elsewhere without branching on the device itself. Parameter names
and shapes match the Stanford CS336 assignment-1 layout, so its checkpoints load as they are.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from smollm_stack.kernels import ops as backend_ops
from smollm_stack.kernels import linear, resolve_backend, stacked_linear
from smollm_stack.kernels.reference import silu
from smollm_stack.model.config import ModelConfig


# The modules below keep their config's backend ("auto", "triton", "eager") and ask for its ops on each call.
def _ops(backend: str, x: torch.Tensor):
    return backend_ops(resolve_backend(backend, x.device), x.device)


class Linear(nn.Module):
    """y = x W^T without a bias; W is (out_features, in_features).

    Under autocast the product reads a copy of W in the autocast dtype made once per optimizer step
    (kernels/weight_cache.py), and ``project`` stacks several Linears' copies into one GEMM. ``per_step_copy = False``
    multiplies by W itself, one product per Linear: what train/parallel/fsdp.py sets (FSDP2 gathers W each forward).
    """

    per_step_copy = True

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        # Xavier-like std sqrt(2 / (fan_in + fan_out)), truncated at 3 sigma so no weight starts as an outlier.
        std = math.sqrt(2.0 / sum(self.weight.shape))
        nn.init.trunc_normal_(self.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_step_copy:
            return stacked_linear(x, [self.weight])[0]
        return linear(x, self.weight)  # F.linear, or OpenBLAS where it is faster (kernels/cpu_blas.py)


def project(x: torch.Tensor, linears) -> tuple[torch.Tensor, ...]:
    """Each Linear of ``linears`` applied to x, as one GEMM against their stacked per-step copy (views of its output;
    kernels/stacked_linear.py), or one product each where the Linears keep no copy."""
    if all(m.per_step_copy for m in linears):
        return stacked_linear(x, [m.weight for m in linears])
    return tuple(m(x) for m in linears)


class Embedding(nn.Module):
    """Lookup table of num_embeddings rows of embedding_dim."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.trunc_normal_(self.weight, std=1.0, a=-3.0, b=3.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32 and cast back to x's dtype.

    With cast_output (a norm whose output feeds only matmuls) and autocast on, the output is in the autocast dtype:
    the fp32 residual is read once and written once in bf16, instead of an fp32 output that autocast casts again.
    Called with a branch r too, it returns (x + r, its norm), the residual add done in the norm's kernel.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, backend: str = "auto", device=None, dtype=None,
                 cast_output: bool = False):  # fmt: skip
        super().__init__()
        self.eps, self.backend, self.cast_output = eps, backend, cast_output
        self.weight = nn.Parameter(torch.empty(d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, r: torch.Tensor | None = None):
        autocast = self.cast_output and torch.is_autocast_enabled(x.device.type)
        out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else None
        if r is None:
            return _ops(self.backend, x).rms_norm(x, self.weight, self.eps, out_dtype=out_dtype)
        return _ops(self.backend, x).add_rms_norm(x, r, self.weight, self.eps, out_dtype=out_dtype)


class RotaryEmbedding(nn.Module):
    """RoPE on adjacent pairs: (x[2i], x[2i+1]) turns by pos * theta^(-2i/d_head) (RoFormer / original Llama).

    Holds no tables: the kernels compute the angles from the positions, which costs less than reading a cache.
    max_seq_len bounds the positions, since a model has only ever seen positions below its context length.
    """

    def __init__(self, theta: float, d_head: int, max_seq_len: int, backend: str = "auto"):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"RoPE rotates pairs, so d_head must be even, got {d_head}")
        self.theta, self.d_head, self.max_seq_len, self.backend = theta, d_head, max_seq_len, backend

    def forward(self, x: torch.Tensor, positions: torch.Tensor | int | None = None) -> torch.Tensor:
        """x (..., T, d_head); positions (T,) or (B, T) ints, or an int start for start..start+T-1 (default 0)."""
        return _ops(self.backend, x).apply_rope(x, self.checked(x, positions), self.theta)

    def pair(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | int | None = None):
        """(forward(q, positions), forward(k, positions)) in one kernel launch and one positions check."""
        return _ops(self.backend, q).apply_rope_qk(q, k, self.checked(q, positions), self.theta)

    def checked(self, x: torch.Tensor, positions: torch.Tensor | int | None) -> torch.Tensor:
        """positions as a tensor, within max_seq_len.

        Explicit positions are checked against max_seq_len, which costs a host sync (skipped under torch.compile,
        where it would break the graph); a start (what KV-cache decoding passes) is checked from the shape alone.
        """
        T = x.shape[-2]
        if positions is None or isinstance(positions, int):
            start = positions or 0
            if start + T > self.max_seq_len:
                raise ValueError(f"sequence of {T} tokens from {start} is longer than max_seq_len {self.max_seq_len}")
            return torch.arange(start, start + T, device=x.device)
        if not torch.compiler.is_compiling() and positions.numel():
            low, high = torch.stack(torch.aminmax(positions)).tolist()
            if low < 0 or high >= self.max_seq_len:
                raise ValueError(f"positions must lie in [0, {self.max_seq_len}), got {low}..{high}")
        return positions


class KVCache:
    """Keys and values of the tokens seen so far for one attention layer, preallocated for max_len tokens."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, device=None, dtype=None):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens cached so far: a Python int, so the bounds check reads nothing from the device
        self.pad = None  # (B,) left-padding lengths of a batch of unequal prompts (generate.py), hidden from attention

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, Hkv, T, dh) and return every cached key and value, (B, Hkv, length, dh)."""
        end = self.length + k.shape[-2]
        if end > self.k.shape[-2]:
            raise ValueError(f"KV cache holds {self.k.shape[-2]} tokens, cannot grow to {end}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def attention_mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, length), True where each of the last T queries may attend: causal and never a row's padding.
        A padding query attends to the padding before it, so no row is empty (which some backends turn into NaN)."""
        key = torch.arange(self.length, device=self.k.device)
        query, pad = key[self.length - T :, None], self.pad[:, None, None]  # (T, 1), (B, 1, 1)
        return ((key <= query) & ((key >= pad) | (query < pad)))[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with grouped-query K/V heads and RoPE on q and k; no biases."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.backend = config.backend
        self.q_proj = Linear(config.d_model, self.num_heads * self.head_dim)
        self.k_proj = Linear(config.d_model, self.num_kv_heads * self.head_dim)
        self.v_proj = Linear(config.d_model, self.num_kv_heads * self.head_dim)
        self.output_proj = Linear(self.num_heads * self.head_dim, config.d_model)
        self.rope = None
        if config.position == "rope":
            self.rope = RotaryEmbedding(config.rope_theta, self.head_dim, config.context_length, config.backend)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | int | None = None,
        kv_cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
        value_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """value_embedding (B, T, Hkv * dh), if given, is added to the values (TransformerLM's value embeddings)."""
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))  # one GEMM
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, dh)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, dh)
        if value_embedding is not None:  # (an fp32 table under autocast: added in v's dtype, so q, k, v share one)
            v = v + value_embedding.to(v.dtype)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, dh)
        if kv_cache is not None:
            if self.rope is not None:
                q, k = self.rope.pair(q, k, positions)
            k, v = kv_cache.update(k, v)  # (B, Hkv, S, dh), the T new tokens last
        ops = _ops(self.backend, x)
        if kv_cache is not None and kv_cache.pad is not None:  # left-padded prompts: PyTorch's attention takes a mask
            y = F.scaled_dot_product_attention(q, k, v, kv_cache.attention_mask(T), enable_gqa=True)  # (B, H, T, dh)
        elif self.rope is not None and kv_cache is None:  # one op, whose backward writes dq, dk, dv side by side
            y = ops.rope_flash_attention(q, k, v, self.rope.checked(q, positions), self.rope.theta, doc_ids=doc_ids)
        else:  # the kernel reads each K/V head for its group of query heads (no repeat), mask aligned to the end
            y = ops.flash_attention(q, k, v, causal=True, doc_ids=doc_ids)  # (B, H, T, dh)
        # y is laid out like q, (B, T, H, dh) storage (our kernels' O, SDPA's on most paths): the reshape is a view
        return self.output_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    """W2(SiLU(W1 x) * W3 x): a gated FFN, three matrices of d_model x d_ff."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.backend = config.backend
        self.w1 = Linear(config.d_model, config.d_ff)
        self.w2 = Linear(config.d_ff, config.d_model)
        self.w3 = Linear(config.d_model, config.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.w1, self.w3))  # one GEMM
        return self.w2(_ops(self.backend, x).swiglu(gate, up))


class SiLUMLP(nn.Module):
    """W2 SiLU(W1 x): the ungated ablation of SwiGLU, two matrices (d_ff = 4 d_model keeps the parameter count)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = Linear(config.d_model, config.d_ff)
        self.w2 = Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu(self.w1(x)))


def make_norm(config: ModelConfig, cast_output: bool = False) -> nn.Module:
    """An RMSNorm, or a parameter-free identity for the norm="none" ablation (so no ln weights are saved)."""
    if config.norm == "none":
        return nn.Identity()
    return RMSNorm(config.d_model, config.norm_eps, config.backend, cast_output=cast_output)


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(ln1(x)), then + ffn(ln2(.)); post-norm: ln1(x + attn(x)), then ln2(. + ffn(.)).

    With norm="none" ln1 and ln2 are identities, so the block is the pre-norm one without norms.
    Pre-norm adds each branch inside the norm after it (RMSNorm with r): attn's in ln2, ffn's in the next block's ln1
    (or ln_final), which TransformerLM asks for with add_branch=False: (x, ffn branch) comes back unadded, and the
    next block gets the branch as ``branch``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.post_norm, self.fused_adds = config.norm == "post", config.norm == "pre"
        # Post-norm outputs are the fp32 residual stream; pre-norm outputs only feed the matmuls.
        self.ln1, self.ln2 = (make_norm(config, cast_output=not self.post_norm) for _ in range(2))
        self.attn = CausalSelfAttention(config)
        self.ffn = SwiGLU(config) if config.ffn == "swiglu" else SiLUMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | int | None = None,
        kv_cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
        value_embedding: torch.Tensor | None = None,
        branch: torch.Tensor | None = None,
        add_branch: bool = True,
    ):
        if self.post_norm:
            x = self.ln1(x + self.attn(x, positions, kv_cache, doc_ids, value_embedding))
            return self.ln2(x + self.ffn(x))
        if not self.fused_adds:
            x = x + self.attn(self.ln1(x), positions, kv_cache, doc_ids, value_embedding)
            return x + self.ffn(self.ln2(x))
        x, y = (x, self.ln1(x)) if branch is None else self.ln1(x, branch)
        x, y = self.ln2(x, self.attn(y, positions, kv_cache, doc_ids, value_embedding))
        f = self.ffn(y)
        return x + f if add_branch else (x, f)


class TransformerLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        # norm="none" drops every norm, the final one too; post-norm keeps it as a learned output gain.
        self.ln_final = make_norm(config, cast_output=True)  # feeds only lm_head
        self.lm_head = Linear(config.d_model, config.vocab_size)
        # Value embeddings: block i adds value_embeddings[i](ids) to its attention values, a per-token shortcut into
        # every position that attends to it (modded-nanogpt's). Outside the blocks, so the optimizer treats them as
        # the embeddings they are (AdamW, not Muon).
        kv_width = config.num_kv_heads * config.head_dim
        tables = config.num_layers if config.value_embeddings else 0
        self.value_embeddings = nn.ModuleList(Embedding(config.vocab_size, kv_width) for _ in range(tables))
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """(Re)draw every parameter.

        - Linear weights (q/k/v/output_proj, w1/w2/w3, lm_head): truncated normal, std sqrt(2 / (in + out)),
          cut at 3 std.
        - token_embeddings and value_embeddings: truncated normal, std 1, cut at +-3.
        - RMSNorm gains: 1.
        - Tied embeddings: the shared matrix takes lm_head's init, since std-1 output weights would start the
          logits at std sqrt(d_model); the first RMSNorm rescales the small embeddings anyway.
        - zero_init_residual: each block's last matrices (attention's output_proj, the FFN's w2) start at zero, so
          every block adds nothing at first and the first steps shape the logits of the embeddings alone; the other
          matrices get gradients from the second step on, once the zeros have moved.
        """
        for module in self.modules():  # lm_head comes after token_embeddings, so a tied matrix ends with its init
            if isinstance(module, (Linear, Embedding, RMSNorm)):
                module.reset_parameters()
        if self.config.zero_init_residual:
            for layer in self.layers:
                layer.attn.output_proj.weight.zero_()
                layer.ffn.w2.weight.zero_()

    def make_kv_caches(self, batch_size: int, max_len: int, device=None, dtype=None) -> list[KVCache]:
        """One empty KVCache per layer for decoding up to max_len tokens (at most context_length)."""
        if max_len > self.config.context_length:
            raise ValueError(f"max_len {max_len} is longer than the context length {self.config.context_length}")
        c = self.config
        return [KVCache(batch_size, c.num_kv_heads, max_len, c.head_dim, device, dtype) for _ in range(c.num_layers)]

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | int | None = None,
        kv_caches: list[KVCache] | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V); with targets (B, T), already shifted, the fp32 mean loss instead.

        positions (T,) or (B, T), or an int start, overrides the default arange(T), which starts after the cached
        tokens when kv_caches (from make_kv_caches) are given. Targets equal to -100 are ignored. doc_ids (B, T)
        integers, a run of equal ids per document, keep attention inside each document of a packed window (the
        caller knows where documents end; the model knows no tokenizer). Positions need no reset per document:
        RoPE is relative, so a document attends as it would alone. Not with kv_caches: a decoded sequence is one
        document.
        """
        T = ids.shape[-1]
        if T > self.config.context_length:
            raise ValueError(f"sequence of {T} tokens is longer than the context length {self.config.context_length}")
        if doc_ids is not None and kv_caches is not None:
            raise ValueError("doc_ids and kv_caches do not go together: decoding runs one document")
        if positions is None and kv_caches is not None:
            positions = kv_caches[0].length  # a start: RoPE checks it without reading the device
        x = self.token_embeddings(ids)  # (B, T, d)
        values = [table(ids) for table in self.value_embeddings] or [None] * len(self.layers)  # (B, T, Hkv * dh)
        fused, branch = self.config.norm == "pre", None  # pre-norm: the last ffn's output, added in the next norm
        for i, (layer, value) in enumerate(zip(self.layers, values)):
            x = layer(x, positions, None if kv_caches is None else kv_caches[i], doc_ids, value, branch, not fused)
            x, branch = x if fused else (x, None)
        x = self.ln_final(x) if branch is None else self.ln_final(x, branch)[1]
        if targets is None:
            return self.lm_head(x)  # (B, T, V)
        # The loss kernel fuses lm_head with cross-entropy so the (B*T, V) logits are never all in memory at once.
        # Under autocast it gets what lm_head would: activations in the autocast dtype, the weight as stored.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ops = _ops(self.config.backend, x)
        return ops.fused_linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
