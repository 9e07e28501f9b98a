"""The Stanford CS336 assignment-1 interface (its tests/adapters.py) mapped onto this project.

To run that course's tests against our code, make the assignment's `tests/adapters.py` one line:

    from smollm_stack.train.cs336 import *  # noqa: F403

Each function has the assignment's name and signature and builds our module (model/model.py) with the given
weights, whose names and shapes are already the assignment's; the stateless ops come from kernels.reference, the
optimizer, schedule, clipping, batches and checkpoints from train/, the tokenizer from tokenizer/. Our layers run
their Triton kernels on CUDA and eager PyTorch elsewhere, as in training.
"""

import os
from collections.abc import Iterable

import numpy as np
import torch

from smollm_stack.kernels.reference import cross_entropy, scaled_dot_product_attention, silu, softmax
from smollm_stack.model import CausalSelfAttention, Embedding, Linear, ModelConfig, RMSNorm, RotaryEmbedding, SwiGLU
from smollm_stack.model import TransformerBlock, TransformerLM
from smollm_stack.tokenizer import Tokenizer, train_bpe
from smollm_stack.train.store.checkpoint import load_checkpoint, save_checkpoint
from smollm_stack.train.data.tokens import get_batch
from smollm_stack.train.optim.adamw import AdamW, clip_grad_norm
from smollm_stack.train.schedule import cosine_lr

__all__ = [
    "get_adamw_cls", "get_tokenizer", "run_cross_entropy", "run_embedding", "run_get_batch",
    "run_get_lr_cosine_schedule", "run_gradient_clipping", "run_linear", "run_load_checkpoint",
    "run_multihead_self_attention", "run_multihead_self_attention_with_rope", "run_rmsnorm", "run_rope",
    "run_save_checkpoint", "run_scaled_dot_product_attention", "run_silu", "run_softmax", "run_swiglu",
    "run_train_bpe", "run_transformer_block", "run_transformer_lm",
]  # fmt: skip


def _loaded(module: torch.nn.Module, weights: dict[str, torch.Tensor], like: torch.Tensor) -> torch.nn.Module:
    """module on like's device, holding weights (strict: every name must match), in eval mode."""
    module.to(like.device).load_state_dict(weights)
    return module.eval()


def _config(d_model: int, num_heads: int, d_ff: int = 1, max_seq_len: int = 1, theta: float = 1e4, **kw):
    """A ModelConfig for one block's worth of layers (vocab_size is never used by them)."""
    return ModelConfig(1, max_seq_len, d_model, 1, num_heads, d_ff=d_ff, rope_theta=theta, **kw)


def _rows(x: torch.Tensor, positions: torch.Tensor | None):
    """x (..., T, d) as (B, T, d) and positions (..., T) as (B, T): our layers take one batch dim."""
    if positions is not None:
        positions = positions.expand(*x.shape[:-1]).reshape(-1, x.shape[-2])
    return x.reshape(-1, *x.shape[-2:]), positions


def run_linear(d_in: int, d_out: int, weights, in_features):
    return _loaded(Linear(d_in, d_out), {"weight": weights}, in_features)(in_features)


def run_embedding(vocab_size: int, d_model: int, weights, token_ids):
    return _loaded(Embedding(vocab_size, d_model), {"weight": weights}, token_ids)(token_ids)


def run_swiglu(d_model: int, d_ff: int, w1_weight, w2_weight, w3_weight, in_features):
    weights = {"w1.weight": w1_weight, "w2.weight": w2_weight, "w3.weight": w3_weight}
    return _loaded(SwiGLU(_config(d_model, 1, d_ff)), weights, in_features)(in_features)


def run_scaled_dot_product_attention(Q, K, V, mask=None):
    return scaled_dot_product_attention(Q, K, V, mask=None if mask is None else mask.bool())


def _attention(config: ModelConfig, q, k, v, o, in_features, token_positions=None):
    weights = {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "output_proj.weight": o}
    x, positions = _rows(in_features, token_positions)
    return _loaded(CausalSelfAttention(config), weights, x)(x, positions).reshape(in_features.shape)


def run_multihead_self_attention(d_model, num_heads, q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight,
                                 in_features):  # fmt: skip
    config = _config(d_model, num_heads, max_seq_len=in_features.shape[-2], position="nope")
    return _attention(config, q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight, in_features)


def run_multihead_self_attention_with_rope(
    d_model, num_heads, max_seq_len, theta, q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight, in_features,
    token_positions=None,
):
    config = _config(d_model, num_heads, max_seq_len=max_seq_len, theta=theta)
    weights = q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight
    return _attention(config, *weights, in_features, token_positions)


def run_rope(d_k: int, theta: float, max_seq_len: int, in_query_or_key, token_positions):
    x, positions = _rows(in_query_or_key, token_positions)
    return RotaryEmbedding(theta, d_k, max_seq_len)(x, positions).reshape(in_query_or_key.shape)


def run_transformer_block(d_model, num_heads, d_ff, max_seq_len, theta, weights, in_features):
    config = _config(d_model, num_heads, d_ff, max_seq_len, theta)
    return _loaded(TransformerBlock(config), weights, in_features)(in_features)


def run_transformer_lm(vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta, weights,
                       in_indices):  # fmt: skip
    config = ModelConfig(vocab_size, context_length, d_model, num_layers, num_heads, d_ff=d_ff, rope_theta=rope_theta)
    return _loaded(TransformerLM(config), weights, in_indices)(in_indices)


def run_rmsnorm(d_model: int, eps: float, weights, in_features):
    return _loaded(RMSNorm(d_model, eps), {"weight": weights}, in_features)(in_features)


def run_silu(in_features):
    return silu(in_features)


def run_get_batch(dataset: np.ndarray, batch_size: int, context_length: int, device: str):
    return get_batch(dataset, batch_size, context_length, device)


def run_softmax(in_features, dim: int):
    return softmax(in_features, dim=dim)


def run_cross_entropy(inputs, targets):
    return cross_entropy(inputs, targets)


def run_gradient_clipping(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float) -> None:
    clip_grad_norm(parameters, max_l2_norm)


def get_adamw_cls() -> type[torch.optim.Optimizer]:
    return AdamW


def run_get_lr_cosine_schedule(it, max_learning_rate, min_learning_rate, warmup_iters, cosine_cycle_iters):
    return cosine_lr(it, max_learning_rate, min_learning_rate, warmup_iters, cosine_cycle_iters)


def run_save_checkpoint(model, optimizer, iteration: int, out):
    save_checkpoint(model, optimizer, iteration, out)


def run_load_checkpoint(src, model, optimizer) -> int:
    return load_checkpoint(src, model, optimizer)


def get_tokenizer(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens=None) -> Tokenizer:
    return Tokenizer(vocab, merges, special_tokens)


def run_train_bpe(input_path: str | os.PathLike, vocab_size: int, special_tokens: list[str], **kwargs):
    return train_bpe(input_path, vocab_size, special_tokens, **kwargs)
