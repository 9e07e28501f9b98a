"""The model's configuration: one dataclass, its validation, and named presets."""

import math
from dataclasses import dataclass
from typing import Literal

from smollm_stack.kernels import BACKENDS  # ("auto", "triton", "eager")

NORMS = ("pre", "post", "none")
POSITIONS = ("rope", "nope")
FFNS = ("swiglu", "silu")
# Fields renamed since checkpoints were first saved, old name -> new: a saved config dict still loads (from_dict).
RENAMED_FIELDS = {"kernels": "backend"}


@dataclass
class ModelConfig:
    vocab_size: int  # rows of the embedding and lm_head; set from the tokenizer
    context_length: int  # longest sequence (and largest position + 1) the model accepts
    d_model: int  # width of the residual stream
    num_layers: int  # transformer blocks
    num_heads: int  # query heads; d_model / num_heads is the head dim
    num_kv_heads: int | None = None  # key/value heads: None -> num_heads (MHA), fewer -> grouped-query attention
    d_ff: int | None = None  # FFN hidden width: None -> ~8/3 d_model rounded to 64 (swiglu) or 4 d_model (silu)
    rope_theta: float = 10000.0  # RoPE base: pair i turns by pos * theta^(-2i/d_head)
    norm_eps: float = 1e-5  # RMSNorm epsilon, keeps 1/rms finite on all-zero rows
    norm: Literal["pre", "post", "none"] = "pre"  # pre: x + f(norm(x)); post: norm(x + f(x)); none: no norms at all
    position: Literal["rope", "nope"] = "rope"  # nope: no positional signal but the causal mask
    ffn: Literal["swiglu", "silu"] = "swiglu"  # swiglu: W2(SiLU(W1 x) * W3 x); silu: W2 SiLU(W1 x)
    tie_embeddings: bool = False  # share one (V, d) matrix between token_embeddings and lm_head
    # Start output_proj and w2 at zero, so every block begins as the identity and the residual stream as the
    # embeddings; the presets turn it on (it trained better, bench/RESULTS.md), a bare config keeps the Xavier init.
    zero_init_residual: bool = False
    # Each block adds a learned embedding of the input tokens, (V, num_kv_heads * head_dim) per block, to its
    # attention values (modded-nanogpt's value embeddings): lookups, no FLOPs, but V x kv width parameters a block.
    value_embeddings: bool = False
    # Which implementation of the ops computes the model: auto: Triton on CUDA, eager PyTorch elsewhere.
    backend: Literal["auto", "triton", "eager"] = "auto"

    def __post_init__(self):
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("position", self.position, POSITIONS),
            ("ffn", self.ffn, FFNS),
            ("backend", self.backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        # Resolve the defaults here so that asdict() records the real widths (checkpoints and HF export need them).
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.ffn)
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs, so the head dim must be even, got {self.head_dim}")
        if not (0 < self.rope_theta < math.inf and 0 < self.norm_eps < math.inf):  # (NaN fails both)
            raise ValueError(f"rope_theta, norm_eps must be finite and positive: {self.rope_theta}, {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def from_dict(cls, saved: dict) -> "ModelConfig":
        """The config of a saved dict (a checkpoint's model_config), written by this code or an older one."""
        return cls(**current_names(saved))

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named configuration from PRESETS, with any field overridden (e.g. vocab_size from the tokenizer)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        # Presets are kwargs, not configs, so that derived defaults (d_ff, num_kv_heads) follow the overrides.
        return cls(**{**PRESETS[name], **overrides})


def current_names(saved: dict) -> dict:
    """A saved config dict with each field's old name (RENAMED_FIELDS) replaced by today's; both at once must agree."""
    current = dict(saved)
    for old, new in RENAMED_FIELDS.items():
        if old not in current:
            continue
        value = current.pop(old)
        if new in current and current[new] != value:
            raise ValueError(f"the model config gives both {old}={value!r} and {new}={current[new]!r} "
                             f"({old} is {new}'s old name)")
        current[new] = value
    return current


def default_d_ff(d_model: int, ffn: str) -> int:
    """FFN width that keeps the FFN at ~8 d_model^2 parameters whichever FFN is chosen.

    SwiGLU has three matrices, so it gets 8/3 d_model, rounded to a multiple of 64 for the matmul tiles
    (512 -> 1344, 768 -> 2048); the two-matrix SiLU MLP gets 4 d_model.
    """
    if ffn == "silu":
        return 4 * d_model
    return max(64, 64 * round(8 * d_model / 3 / 64))


PRESETS = {
    # Small enough to train for a few hundred steps on a laptop CPU; the trainer overrides vocab_size.
    # Its value embeddings (one per block, 1.05M parameters, no FLOPs) took the default run 0.03-0.06 nats lower.
    "tiny": dict(
        vocab_size=2048, context_length=128, d_model=128, num_layers=4, num_heads=4, zero_init_residual=True,
        value_embeddings=True,
    ),
    # The TinyStories model of the Stanford CS336 course: 22.7M parameters, 12.5M of them outside the embeddings.
    "tinystories-17m": dict(
        vocab_size=10000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344, rope_theta=10000.0,
        zero_init_residual=True,
    ),
    # GPT-2 small's shape with a Llama block; tied embeddings as in GPT-2 bring it to 124M parameters.
    "125m": dict(
        vocab_size=50257, context_length=1024, d_model=768, num_layers=12, num_heads=12, d_ff=2048, tie_embeddings=True,
        zero_init_residual=True,
    ),
}
