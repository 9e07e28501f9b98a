"""Compute budget -> model size and tokens by the 20-tokens-per-parameter (Chinchilla) rule, printed as a preset.

Training costs ``flops_per_token(config) * tokens`` FLOPs (about 6 N per token plus attention), and a compute-optimal
run trains on ``tokens = 20 * N``. Among a family of shapes (head dim 64, width = 64 x depth, GPT-2 small's 768 / 12
aspect) we pick the largest whose compute-optimal run fits the budget. A wall-clock budget becomes FLOPs through a
throughput: given in FLOP/s, measured by an earlier run (its tokens/s times its FLOPs per token), or a GPU's bf16
peak times an assumed MFU.
"""

from smollm_stack.model import ModelConfig, flops_per_token, param_counts
from smollm_stack.train.config import complete_saved
from smollm_stack.train.log import PEAK_BF16_FLOPS
from smollm_stack.train.parallel.memory import fitting_setting, memory_advice
from smollm_stack.train.store.rundir import RunDir, read_json

TOKENS_PER_PARAM = 20
HEAD_DIM = 64
MAX_LAYERS = 64


def measured_flops_per_s(run_dir: str) -> float:
    """Training FLOP/s of a finished run: its summary's tokens/s times its model's FLOPs per token."""
    run = RunDir(run_dir)
    summary, cfg = read_json(run.summary), read_json(run.config)
    if summary is None or cfg is None:
        raise FileNotFoundError(f"{run_dir} is not a finished run directory (needs {run.summary} and {run.config})")
    cfg = complete_saved(cfg)  # flat names, whichever version saved it
    preset = ModelConfig.preset(cfg["model"])
    model = ModelConfig.preset(
        cfg["model"],
        **cfg["model_args"],
        vocab_size=cfg["vocab_size"] or preset.vocab_size,
        context_length=cfg["context_length"] or preset.context_length,
    )
    return summary["tokens_per_s"] * flops_per_token(model)


def gpu_flops_per_s(gpu: str, mfu: float, gpus: int = 1) -> float:
    peak = next((p for key, p in PEAK_BF16_FLOPS if key.lower() == gpu.lower()), None)
    if peak is None:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(k for k, _ in PEAK_BF16_FLOPS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    return peak * mfu * gpus


def shape(num_layers: int, vocab_size: int, context_length: int) -> ModelConfig:
    d_model = HEAD_DIM * num_layers
    return ModelConfig.preset(
        "125m",
        vocab_size=vocab_size,
        context_length=context_length,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_layers,
        d_ff=None,
        tie_embeddings=True,
    )


def optimal_run_flops(config: ModelConfig) -> float:
    return flops_per_token(config) * TOKENS_PER_PARAM * param_counts(config)[0]


def propose(flops: float, vocab_size: int = 32000, context_length: int = 1024) -> tuple[ModelConfig, int]:
    """(model config, training tokens) of the largest compute-optimal run in the family that fits ``flops``."""
    if not flops > 0:
        raise ValueError(f"the FLOP budget must be positive, got {flops}")
    fits = [
        c
        for c in (shape(n, vocab_size, context_length) for n in range(1, MAX_LAYERS + 1))
        if optimal_run_flops(c) <= flops
    ]
    if not fits:
        smallest = optimal_run_flops(shape(1, vocab_size, context_length))
        raise ValueError(f"{flops:.3g} FLOPs is below the smallest model's compute-optimal run ({smallest:.3g} FLOPs)")
    best = fits[-1]
    return best, TOKENS_PER_PARAM * param_counts(best)[0]


def describe(flops: float, config: ModelConfig, tokens: int, flops_per_s: float | None = None, memory=None) -> str:
    """The proposal in words, plus a TOML config for ``smollm train --config``.

    ``memory`` (batch_size, gpus, gpu_mem_gb) adds the memory per GPU and the setting that fits the card.
    """
    total, non_embedding = param_counts(config)
    cost = flops_per_token(config) * tokens
    lines = [
        f"budget {flops:.3g} FLOPs -> {total / 1e6:.1f}M parameters ({non_embedding / 1e6:.1f}M non-embedding), "
        f"{tokens / 1e6:,.0f}M tokens ({TOKENS_PER_PARAM} per parameter), {cost:.3g} FLOPs "
        f"({flops_per_token(config) / 1e6:.1f} MFLOP/token)",
    ]
    if flops_per_s:
        lines.append(f"at {flops_per_s:.3g} FLOP/s: {cost / flops_per_s / 3600:.2f} hours")
    setting = None
    if memory is not None:
        lines += ["", *memory_advice(config, *memory)]
        setting = fitting_setting(config, *memory)
    lines += [
        "",
        "# TOML preset: smollm train --config this.toml --train-data ... --val-data ... --tokenizer ...",
        'model = "125m"',
        f"vocab_size = {config.vocab_size}",
        f"context_length = {config.context_length}",
        f"tokens = {tokens}",
        *([] if setting is None else [f'parallel = "{setting[0]}"', f"batch_size = {memory[0]}"]),
        *(["activation_checkpointing = true"] if setting and setting[1] else []),
        "",
        "[model_args]",
        f"d_model = {config.d_model}",
        f"num_layers = {config.num_layers}",
        f"num_heads = {config.num_heads}",
        f"d_ff = {config.d_ff}",
        f"tie_embeddings = {str(config.tie_embeddings).lower()}",
    ]
    return "\n".join(lines)
