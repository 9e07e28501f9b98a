"""Parameter counts and training FLOPs per token of a config, from its shapes alone (no model is built)."""

from smollm_stack.model.config import ModelConfig


def _layer_params(config: ModelConfig) -> tuple[int, int]:
    """(matmul weights, norm gains) of one transformer block."""
    d, dh = config.d_model, config.head_dim
    attn = d * config.num_heads * dh * 2 + d * config.num_kv_heads * dh * 2  # q and output_proj, k and v
    ffn = (3 if config.ffn == "swiglu" else 2) * d * config.d_ff
    norms = 0 if config.norm == "none" else 2 * d
    return attn + ffn, norms


def param_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, non_embedding) parameters.

    non_embedding leaves out the vocab-sized matrices (token_embeddings, an untied lm_head, the value embeddings), as
    in Kaplan et al.'s scaling laws; total counts a tied matrix once.
    """
    matmul, norms = _layer_params(config)
    body = config.num_layers * (matmul + norms) + (0 if config.norm == "none" else config.d_model)  # + ln_final
    vocab = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    values = config.value_embeddings * config.num_layers * config.vocab_size * config.num_kv_heads * config.head_dim
    return body + vocab + values, body


def hidden_matrix_params(config: ModelConfig) -> int:
    """Parameters in the blocks' weight matrices: what Muon updates (embeddings, lm_head and norm gains are not)."""
    return config.num_layers * _layer_params(config)[0]


def flops_per_token(config: ModelConfig) -> float:
    """Training (forward + backward) FLOPs per token at full context, to report MFU.

    6 * (block matmul weights + lm_head) + 6 * num_layers * context_length * d_model.

    A matmul weight costs 2 FLOPs per token forward and 4 backward; the embedding lookup costs none, but
    lm_head does even when tied. Attention scores QK^T and the weighted sum AV cost 2 * T * d each per token
    and layer forward, so 12 * L * T * d for training; a causal mask halves that, and we count the half
    because causal kernels skip the masked blocks (PaLM's appendix counts the full 12 * L * T * d).
    Norms, RoPE, SiLU and softmax are left out: they are O(d) per token against O(d^2).
    """
    matmul, _ = _layer_params(config)
    weights = config.num_layers * matmul + config.vocab_size * config.d_model
    attention = 6 * config.num_layers * config.context_length * config.num_heads * config.head_dim
    return float(6 * weights + attention)
