"""The training loop a student writes first: the baseline that ``smollm_stack.bench.train`` races our trainer against.

Same shapes as our TransformerLM (pre-norm Llama block: RMSNorm, RoPE on adjacent pairs, SwiGLU, no biases), in the
plainest PyTorch: attention as two matmuls around a masked softmax with a causal-mask buffer, RoPE in Python from
cos/sin tables (pairs split, rotated, stacked back), RMSNorm spelled out, F.cross_entropy on the full logits,
torch.optim.AdamW with its defaults and clip_grad_norm_. Nothing here is slow on purpose: it is what the textbooks
write, and what a stack that calls itself fast has to beat.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from smollm_stack.model import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    """Turn pairs (x[2i], x[2i+1]) of x (B, H, T, d) by the angles whose cos and sin are (T, d/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.dh = c.num_heads, c.num_kv_heads, c.head_dim
        self.ln1, self.ln2 = RMSNorm(c.d_model, c.norm_eps), RMSNorm(c.d_model, c.norm_eps)
        self.q = nn.Linear(c.d_model, c.num_heads * c.head_dim, bias=False)
        self.k = nn.Linear(c.d_model, c.num_kv_heads * c.head_dim, bias=False)
        self.v = nn.Linear(c.d_model, c.num_kv_heads * c.head_dim, bias=False)
        self.o = nn.Linear(c.num_heads * c.head_dim, c.d_model, bias=False)
        self.w1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w3 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w2 = nn.Linear(c.d_ff, c.d_model, bias=False)

    def attention(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, T, self.hkv, self.dh).transpose(1, 2)
        v = self.v(x).view(B, T, self.hkv, self.dh).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.repeat_interleave(self.h // self.hkv, 1), v.repeat_interleave(self.h // self.hkv, 1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.dh)
        scores = scores.masked_fill(~mask[:T, :T], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.ln1(x), cos, sin, mask)
        h = self.ln2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class NaiveLM(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.ln_f = RMSNorm(c.d_model, c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        T = c.context_length
        angles = torch.arange(T).float()[:, None] * c.rope_theta ** (-torch.arange(0, c.head_dim, 2) / c.head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)

    def forward(self, ids, targets):
        T = ids.shape[1]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T], self.mask)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def naive_step_fn(config: ModelConfig, lr: float = 1e-3):
    """A model, its optimizer, and step(ids, targets) -> loss: forward, backward, clip to 1, AdamW."""
    model = NaiveLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def step(ids, targets):
        loss = model(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step
