"""A Llama-style transformer LM with the classic ablation switches, generation, accounting and HF interop."""

from kernels.reference import cross_entropy, scaled_dot_product_attention, silu, softmax
from model.accounting import flops_per_token, param_counts
from model.checkpoint import clean_state_dict, load_model
from model.config import PRESETS, ModelConfig
from model.generate import generate
from model.model import (
    CausalSelfAttention,
    Embedding,
    KVCache,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SiLUMLP,
    SwiGLU,
    TransformerBlock,
    TransformerLM,
)

__all__ = [
    "PRESETS",
    "CausalSelfAttention",
    "Embedding",
    "KVCache",
    "Linear",
    "ModelConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "SiLUMLP",
    "SwiGLU",
    "TransformerBlock",
    "TransformerLM",
    "clean_state_dict",
    "cross_entropy",
    "flops_per_token",
    "generate",
    "load_model",
    "param_counts",
    "scaled_dot_product_attention",
    "silu",
    "softmax",
]
