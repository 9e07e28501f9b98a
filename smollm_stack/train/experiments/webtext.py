"""The web-text preset: a ~110M-parameter Llama trained compute-optimally on OpenWebText, as in the seed's run.

Sized by Chinchilla's rule (Hoffmann et al., 2022: ~20 training tokens per parameter, counting all parameters),
with about 1M (2^20) tokens per optimizer step reached by gradient accumulation and data parallelism, peak lr
3e-3 after a 5% warmup, cosine to 10%, AdamW (0.9, 0.95), weight decay 0.1, clipping at 1.0, bf16 autocast.
``webtext_config(smoke=True)`` is the same recipe shrunk to run in seconds on a CPU (tiny model, batch and steps).
"""

import os

from smollm_stack.model import ModelConfig, flops_per_token, param_counts
from smollm_stack.train.config import TrainConfig, make_config
from smollm_stack.train.log import PEAK_BF16_FLOPS

VOCAB_SIZE = 32000  # a BPE trained on the OWT training text (CS336's choice for this corpus)
CONTEXT_LENGTH = 1024
TOKENS_PER_STEP = 2**20
TOKENS_PER_PARAM = 20
MICRO_BATCH = 32  # sequences per GPU per micro-batch: fits an 80 GB card in bf16 with room to spare
# GPT-2 small's shape with a Llama block and a 32k vocabulary, embeddings tied: 110M parameters, 85M non-embedding.
MODEL = dict(d_model=768, num_layers=12, num_heads=12, d_ff=2048, tie_embeddings=True)
SMOKE = dict(  # the plumbing at toy scale: same optimizer, schedule shape, accumulation and bf16, seconds on a CPU
    vocab_size=512,
    context_length=32,
    batch_size=2,
    grad_accum=2,
    steps=6,
    warmup_steps=1,
    eval_interval=3,
    eval_batches=2,
    log_interval=1,
    ckpt_interval=6,
    sample_tokens=0,
    compile=False,
    device="cpu",
    model_args=dict(d_model=64, num_layers=2, num_heads=2, d_ff=192, tie_embeddings=True),
)


def webtext_model_config(vocab_size: int = VOCAB_SIZE) -> ModelConfig:
    return ModelConfig.preset("125m", **MODEL, vocab_size=vocab_size, context_length=CONTEXT_LENGTH)


def webtext_config(world_size: int | None = None, smoke: bool = False, **overrides) -> TrainConfig:
    """The preset as a TrainConfig; ``world_size`` (default: $WORLD_SIZE from torchrun, else 1) sets grad_accum.

    Overrides win (e.g. train_data, val_data, tokenizer, out_dir); with ``smoke`` the SMOKE shrinkage comes first.
    """
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    per_step = TOKENS_PER_STEP // CONTEXT_LENGTH  # sequences per optimizer step: 1024
    if per_step % (MICRO_BATCH * world_size):
        raise ValueError(f"{per_step} sequences per step do not split over {world_size} processes: use a power of 2")
    params = param_counts(webtext_model_config())[0]
    steps = TOKENS_PER_PARAM * params // TOKENS_PER_STEP
    recipe = dict(
        model="125m",
        model_args=MODEL,
        vocab_size=VOCAB_SIZE,
        context_length=CONTEXT_LENGTH,
        batch_size=MICRO_BATCH,
        grad_accum=per_step // MICRO_BATCH // world_size,
        steps=steps,
        max_lr=3e-3,
        min_lr=3e-4,
        warmup_steps=steps // 20,
        schedule="cosine",
        optimizer="torch",  # AdamW, as the recipe was sized for; the default's Muon is tuned on the tiny preset only
        beta1=0.9,
        beta2=0.95,
        weight_decay=0.1,
        grad_clip=1.0,
        dtype="bfloat16",
        compile=True,
        eval_interval=100,
        eval_batches=40,
        ckpt_interval=250,
        keep_ckpts=2,
        out_dir="runs/webtext",
    )
    if smoke:
        recipe = {**recipe, **SMOKE, "out_dir": "runs/webtext-smoke"}
    return make_config(recipe, **overrides)


def plan(gpu: str = "H100", mfu: float = 0.4, gpus: int = 8) -> str:
    """What a real run needs: data, tokens, FLOPs and GPU hours at an assumed MFU (an estimate, not a measurement)."""
    peak = next((p for key, p in PEAK_BF16_FLOPS if key.lower() == gpu.lower()), None)
    if peak is None:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(k for k, _ in PEAK_BF16_FLOPS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    cfg = webtext_config(world_size=1)
    t, sched, opt = cfg.training, cfg.schedule, cfg.optimizer
    model = webtext_model_config()
    total, non_embedding = param_counts(model)
    tokens = t.steps * TOKENS_PER_STEP
    flops = flops_per_token(model) * tokens
    hours = flops / (peak * mfu) / 3600
    return f"""web-text preset: {total / 1e6:.0f}M parameters ({non_embedding / 1e6:.0f}M non-embedding), \
vocab {VOCAB_SIZE}, context {CONTEXT_LENGTH}
  tokens: {TOKENS_PER_PARAM} x parameters = {tokens / 1e9:.2f}B in {t.steps} steps of {TOKENS_PER_STEP:,} tokens \
({MICRO_BATCH} x {CONTEXT_LENGTH} per micro-batch, {t.grad_accum} micro-batches per step on 1 GPU, \
{t.grad_accum // gpus if t.grad_accum % gpus == 0 else "?"} on {gpus})
  schedule: max lr {sched.max_lr:g}, {sched.warmup_steps} warmup steps, cosine to {sched.min_lr:g}; AdamW betas \
({opt.beta1}, {opt.beta2}), weight decay {opt.weight_decay}, clip {opt.grad_clip}, {cfg.system.dtype}
  compute: {flops_per_token(model) / 1e6:.0f} MFLOP/token x {tokens / 1e9:.2f}B tokens = {flops:.2e} FLOP
  ESTIMATE (not measured): {hours:.1f} {gpu}-hours at an assumed {100 * mfu:.0f}% MFU of {peak / 1e12:.0f} TFLOP/s \
bf16, about {60 * hours / gpus:.0f} minutes on {gpus} GPUs
data (OpenWebText sample, 11.9 GB of text, ~2.7B tokens: the run reads ~{tokens / 2.7e9:.0%} of one epoch):
  smollm download owt --out data/owt
  smollm tokenizer train data/owt/train.txt --vocab-size {VOCAB_SIZE} --special-token '<|endoftext|>' \
--out data/owt/tok
  smollm tokenizer encode data/owt/train.txt --tokenizer data/owt/tok --out data/owt/train.npy
  smollm tokenizer encode data/owt/valid.txt --tokenizer data/owt/tok --out data/owt/valid.npy
run ({gpus} GPUs; grad accumulation adapts to $WORLD_SIZE so a step stays {TOKENS_PER_STEP:,} tokens):
  torchrun --nproc_per_node={gpus} -m smollm_stack.train.experiments webtext --train-data data/owt/train.npy \
--val-data data/owt/valid.npy --tokenizer data/owt/tok"""
