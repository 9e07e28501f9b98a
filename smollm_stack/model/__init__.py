"""A Llama-style transformer LM with the classic ablation switches, generation, accounting and HF interop."""

from smollm_stack.model.accounting import flops_per_token, hidden_matrix_params, param_counts
from smollm_stack.model.checkpoint import clean_state_dict, load_model
from smollm_stack.model.config import PRESETS, ModelConfig, current_names
from smollm_stack.model.generate import generate
from smollm_stack.model.model import (
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
    "current_names",
    "flops_per_token",
    "generate",
    "hidden_matrix_params",
    "load_model",
    "param_counts",
]
