"""The CS336 assignment-1 adapters: each against the formula the assignment states, written out here in fp64."""

import math
from pathlib import Path

import pytest
import torch

from smollm_stack.train import cs336

g = torch.Generator().manual_seed(0)
# fp32 against fp64: each output is a few chained dot products of length <= 24 over O(1) values, so its error is
# some 24 * 2^-24 ~ 1.5e-6 relative at worst; 1e-5 leaves a 6x margin for another BLAS's summation order.
TOL = dict(atol=1e-5, rtol=1e-5)


def randn(*shape):
    return torch.randn(*shape, generator=g)


def test_linear_rmsnorm_and_swiglu_follow_their_formulas():
    x, w1, w2, w3 = randn(2, 3, 8), randn(12, 8), randn(8, 12), randn(12, 8)
    torch.testing.assert_close(cs336.run_linear(8, 12, w1, x), (x.double() @ w1.double().T).float(), **TOL)
    gain = randn(8)
    expected = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * gain.double()
    torch.testing.assert_close(cs336.run_rmsnorm(8, 1e-5, gain, x), expected.float(), **TOL)
    a, b = x.double() @ w1.double().T, x.double() @ w3.double().T
    expected = (a * torch.sigmoid(a) * b) @ w2.double().T
    torch.testing.assert_close(cs336.run_swiglu(8, 12, w1, w2, w3, x), expected.float(), **TOL)


def reference_attention(x, wq, wk, wv, wo, heads, rotate=None):
    """Causal multi-head attention, head by head, in fp64; rotate(q_or_k) applies RoPE."""
    T, d = x.shape[-2], x.shape[-1] // heads
    q, k, v = (x.double() @ w.double().T for w in (wq, wk, wv))
    split = lambda t: t.unflatten(-1, (heads, d)).transpose(-3, -2)  # (..., heads, T, d)
    q, k, v = split(q), split(k), split(v)
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(-3, -2).flatten(-2) @ wo.double().T


def rope(x, positions, theta):
    """Pairs (x[2i], x[2i+1]) turned by position * theta^(-2i/d), as the assignment defines RoPE."""
    d = x.shape[-1]
    angle = positions.double()[..., None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], dim=-1)
    return out.flatten(-2)


def test_attention_and_rope_on_leading_dims():
    x, weights = randn(2, 3, 7, 16), [randn(16, 16) / 4 for _ in range(4)]  # (batch, extra, seq, d_model)
    expected = reference_attention(x, *weights, heads=4)
    torch.testing.assert_close(cs336.run_multihead_self_attention(16, 4, *weights, x), expected.float(), **TOL)
    positions = torch.tensor([5, 0, 2, 3, 9, 1, 4])
    got = cs336.run_multihead_self_attention_with_rope(16, 4, 12, 100.0, *weights, x, positions)
    expected = reference_attention(x, *weights, heads=4, rotate=lambda t: rope(t, positions, 100.0))
    torch.testing.assert_close(got, expected.float(), **TOL)
    q = randn(2, 3, 7, 8)
    expected = rope(q.double(), positions, 100.0).float()
    torch.testing.assert_close(cs336.run_rope(8, 100.0, 12, q, positions), expected, **TOL)


def test_transformer_lm_takes_the_assignments_state_dict():
    """The names of the assignment's state dict load as they are; the logits follow block by block."""
    V, d, d_ff, layers = 50, 16, 24, 2
    weights = {"token_embeddings.weight": randn(V, d), "ln_final.weight": randn(d), "lm_head.weight": randn(V, d)}
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            weights[f"layers.{i}.attn.{name}.weight"] = randn(d, d) / 4
        weights |= {f"layers.{i}.ffn.w1.weight": randn(d_ff, d) / 4, f"layers.{i}.ffn.w3.weight": randn(d_ff, d) / 4}
        weights |= {f"layers.{i}.ffn.w2.weight": randn(d, d_ff) / 4}
        weights |= {f"layers.{i}.ln1.weight": randn(d), f"layers.{i}.ln2.weight": randn(d)}
    ids = torch.randint(0, V, (2, 9), generator=g)
    x = weights["token_embeddings.weight"][ids]
    for i in range(layers):
        block = {k.removeprefix(f"layers.{i}."): w for k, w in weights.items() if k.startswith(f"layers.{i}.")}
        x = cs336.run_transformer_block(d, 4, d_ff, 16, 1e4, block, x)
    x = cs336.run_rmsnorm(d, 1e-5, weights["ln_final.weight"], x)
    expected = cs336.run_linear(d, V, weights["lm_head.weight"], x)
    torch.testing.assert_close(cs336.run_transformer_lm(V, 16, d, layers, 4, d_ff, 1e4, weights, ids), expected, **TOL)


def test_tokenizer_training_and_the_optimizer(tmp_path):
    corpus = Path(__file__).parent / "data" / "tinystories_excerpt.txt"
    vocab, merges = cs336.run_train_bpe(corpus, 300, ["<|endoftext|>"])
    tokenizer = cs336.get_tokenizer(vocab, merges, ["<|endoftext|>"])
    text = "Once upon a time<|endoftext|> there was"
    assert tokenizer.decode(tokenizer.encode(text)) == text and len(vocab) == 300
    assert cs336.run_get_lr_cosine_schedule(0, 1.0, 0.1, 10, 100) == 0.0
    assert issubclass(cs336.get_adamw_cls(), torch.optim.Optimizer)


def test_the_checkpoint_loader_round_trips_and_refuses_a_damaged_file(tmp_path):
    model = torch.nn.Linear(64, 64)
    optimizer = cs336.get_adamw_cls()(model.parameters(), lr=1e-3)
    cs336.run_save_checkpoint(model, optimizer, 7, tmp_path / "ckpt.pt")
    twin = torch.nn.Linear(64, 64)
    assert cs336.run_load_checkpoint(tmp_path / "ckpt.pt", twin, cs336.get_adamw_cls()(twin.parameters())) == 7
    torch.testing.assert_close(twin.weight, model.weight, atol=0, rtol=0)
    data = bytearray((tmp_path / "ckpt.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights: torch.load would read it, only the checksum tells
    (tmp_path / "ckpt.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ckpt\.pt is damaged: its SHA-256 differs"):
        cs336.run_load_checkpoint(tmp_path / "ckpt.pt", twin, None)
