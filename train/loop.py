"""The training run: ``run(cfg)`` goes setup -> data -> model -> optimizer -> loop -> sample, flat, top to bottom.

Host syncs (``.item()``) happen only on report steps (log, eval and checkpoint steps), so on a GPU the CPU queues
steps ahead in between. Everything a run writes lands in its run directory; ``summary.json`` is written last,
so its presence marks a finished run (or a diverged one: see its "status").
"""

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

import kernels
from model import ModelConfig, TransformerLM, flops_per_token, generate, param_counts
from train.checkpoint import (
    apply_checkpoint,
    ckpt_name,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from train.config import CONFIG_FILE, TrainConfig
from train.dataset import EOT, BatchSampler, batch_from_starts, check_length, eval_starts, open_tokens, resolve_data
from train.distributed import Dist, init_distributed, shutdown
from train.log import RunLogger, peak_flops, perplexity
from train.optim import clip_gradients, cosine_lr, make_adamw

SUMMARY_FILE = "summary.json"


class PreflightError(RuntimeError):
    """A Triton kernel disagrees with eager PyTorch on the run's shapes: training on it would be silently wrong."""


def run(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; return the summary also written to ``<run dir>/summary.json``.

    Bad inputs raise ValueError / FileNotFoundError with a message naming the problem. A run whose loss turns
    NaN/inf or passes ``cfg.diverge_loss`` stops early and returns ``{"status": "diverged", ...}`` instead of raising,
    keeping its last good checkpoint.
    """
    info, device = init_distributed(cfg.device)
    try:
        return _run(cfg, info, device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e):
            raise ValueError(
                f"a micro-batch of {cfg.batch_size} sequences of {cfg.context_length or 'the preset context'} tokens "
                f"does not fit in {device} memory: lower --batch-size (and raise --grad-accum to keep the global batch)"
            ) from None
        raise
    finally:
        shutdown(info)


def _run(cfg: TrainConfig, info: Dist, device: torch.device) -> dict:
    # ---- setup -------------------------------------------------------------------------------------------------
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    run_dir = Path(cfg.resume or cfg.out_dir or f"runs/{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}")
    if info.enabled and cfg.resume is None and cfg.out_dir is None:
        names = [str(run_dir)]
        torch.distributed.broadcast_object_list(names, src=0)  # ranks started a second apart must agree
        run_dir = Path(names[0])
    checkpoint = None
    if cfg.resume is not None:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise FileNotFoundError(f"cannot resume: no {ckpt_name(0).replace('000000', '*')} in {run_dir}")
        checkpoint = read_checkpoint(ckpts[-1])
    elif list_checkpoints(run_dir) or (run_dir / CONFIG_FILE).exists():
        raise ValueError(f"{run_dir} already holds a run: --resume {run_dir} to continue it, or pick another --out-dir")

    # ---- data: rank 0 trains the tokenizer and encodes first, the others then find it cached --------------------
    preset = ModelConfig.preset(cfg.model)  # the defaults of vocab_size and context_length
    vocab_size = cfg.vocab_size or preset.vocab_size
    if not info.main:
        info.barrier()
    train_path, val_path, tok_dir = resolve_data(
        cfg.train_data, cfg.val_data, cfg.tokenizer, vocab_size, progress=cfg.progress and info.main
    )
    if info.main:
        info.barrier()
    tokenizer = None
    if tok_dir is not None:
        from tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tok_dir)
        if cfg.vocab_size is not None and cfg.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"vocabulary/model mismatch: the tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens "
                f"but --vocab-size is {cfg.vocab_size}"
            )
        vocab_size = cfg.vocab_size or tokenizer.vocab_size  # a larger model vocabulary is fine (padding)
    train_data, val_data = open_tokens(train_path, vocab_size), open_tokens(val_path, vocab_size)

    # ---- model -------------------------------------------------------------------------------------------------
    context_length = cfg.context_length or preset.context_length
    check_length(val_data, context_length, "validation data")  # (the sampler checks the training data)
    model_config = ModelConfig.preset(cfg.model, **cfg.model_args, vocab_size=vocab_size, context_length=context_length)
    if checkpoint is not None and checkpoint["model_config"] != asdict(model_config):
        raise ValueError(f"cannot resume: the model config differs from the checkpoint's ({run_dir})")
    torch.manual_seed(cfg.seed)
    raw_model = TransformerLM(model_config).to(device)
    backend = kernels.resolve_backend(model_config.kernels, device)
    if cfg.preflight and device.type == "cuda" and backend == "triton":
        preflight(model_config, context_length, dtype, device, cfg.seed)
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]  # matrices and embeddings; not the norm gains
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    optimizer = make_adamw(
        cfg.optimizer,
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        device,
        lr=cfg.max_lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    start, elapsed_before = 0, 0.0
    if checkpoint is not None:
        start = apply_checkpoint(checkpoint, raw_model, optimizer)
        set_rng_state(checkpoint["rng"])
        elapsed_before = checkpoint.get("elapsed_s", 0.0)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    eval_model = model  # evaluation and sampling bypass DDP: no gradient hooks, no collective per forward
    if info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # ---- schedule, sampler, logger --------------------------------------------------------------------------------
    tokens_per_step = cfg.batch_size * context_length * cfg.grad_accum * info.world_size
    steps = max(1, cfg.tokens // tokens_per_step) if cfg.tokens else cfg.steps
    cosine_steps = cfg.cosine_steps or steps
    sampler = BatchSampler(train_data, cfg.batch_size, context_length, cfg.seed, cfg.grad_accum * info.world_size)
    val_starts = eval_starts(len(val_data), context_length, cfg.eval_batches * cfg.batch_size * info.world_size)
    diverge_loss = cfg.diverge_loss or 2 * math.log(vocab_size)
    flops, peak = flops_per_token(model_config), peak_flops(device)
    config_dict = {**cfg.to_dict(), "out_dir": str(run_dir), "resume": None}
    logger = None
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SUMMARY_FILE).unlink(missing_ok=True)  # a resumed run is unfinished again
        write_json(run_dir / CONFIG_FILE, config_dict)
        if tok_dir is not None and not (run_dir / "tokenizer").exists():  # the run dir alone is enough to sample
            shutil.copytree(tok_dir, run_dir / "tokenizer")
        resume_step = start if checkpoint else None
        logger = RunLogger(run_dir, config_dict, resume_step=resume_step, wandb_project=cfg.wandb_project)
        total, non_embedding = param_counts(model_config)
        resuming = f", resuming at step {start}" if start else ""
        print(
            f"{run_dir}: {cfg.model} preset, {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding), "
            f"vocab {vocab_size}, {steps} steps of {tokens_per_step:,} tokens on {info.world_size} x {device} "
            f"({str(dtype).removeprefix('torch.')}, kernels {backend}){resuming}"
        )

    def evaluate() -> float:
        """Mean validation loss over the fixed windows; ranks split the batches and sum."""
        eval_model.eval()
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        with torch.no_grad(), autocast:
            for i in range(info.rank * cfg.batch_size, len(val_starts), cfg.batch_size * info.world_size):
                x, y = batch_from_starts(val_data, val_starts[i : i + cfg.batch_size], context_length, device)
                total += eval_model(x, y).float() * len(x)
                count += len(x)
        eval_model.train()
        return (info.sum(total) / info.sum(count)).item()

    def checkpoint_now(step: int, elapsed: float):
        if info.main:
            path = run_dir / ckpt_name(step)
            extra = dict(model_config=asdict(model_config), train_config=config_dict, elapsed_s=elapsed)
            save_checkpoint(raw_model, optimizer, step, path, sampler=sampler.state_dict(), **extra)
            prune_checkpoints(run_dir, cfg.keep_ckpts)

    # ---- the loop -------------------------------------------------------------------------------------------------
    val_loss = train_loss = None
    logged = logger.rows if logger else []  # a resumed run's earlier rows
    best_val = min((r["val_loss"] for r in logged if r.get("val_loss") is not None), default=math.inf)
    status, message = "finished", ""
    t0 = time.perf_counter()
    if start == 0:
        val_loss = evaluate()
        best_val = min(best_val, val_loss)
        if logger:
            logger.log({"step": 0, "tokens": 0, "time_s": 0.0, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
    t_report, step_report = time.perf_counter(), start
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not (info.main and cfg.progress))
    params = list(raw_model.parameters())
    for step in range(start + 1, steps + 1):
        lr = cosine_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cosine_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = sampler.batch(step, info.rank * cfg.grad_accum + micro, device)
            last = micro == cfg.grad_accum - 1
            with model.no_sync() if info.enabled and not last else nullcontext():  # all-reduce once per step
                with autocast:
                    loss = model(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = clip_gradients(cfg.optimizer, params, cfg.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update()

        is_eval = step % cfg.eval_interval == 0 or step == steps
        is_ckpt = step % cfg.ckpt_interval == 0 or step == steps
        if not (is_eval or is_ckpt or step % cfg.log_interval == 0):
            continue
        # A report step: sync, check for divergence before anything is saved, then log.
        train_loss = info.mean(loss_sum / cfg.grad_accum).item()
        norm = grad_norm.item()
        now = time.perf_counter()
        interval = max(now - t_report, 1e-9)  # since the last report's end: its eval and checkpoint left out
        tokens_per_s = (step - step_report) * tokens_per_step / interval
        if not (math.isfinite(train_loss) and math.isfinite(norm)) or train_loss > diverge_loss:
            last_ckpt = list_checkpoints(run_dir)
            status = "diverged"
            message = (
                f"diverged at step {step}: train loss {train_loss:.4g}, grad norm {norm:.4g} "
                f"(limit {diverge_loss:.3g}); stopped, last good checkpoint: "
                f"{last_ckpt[-1] if last_ckpt else 'none'}. Try a lower --max-lr or a longer --warmup-steps."
            )
            break
        row = {
            "step": step,
            "tokens": step * tokens_per_step,
            "time_s": round(elapsed_before + now - t0, 3),
            "train_loss": train_loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens_per_s": tokens_per_s,
            "ms_per_step": 1000 * interval / (step - step_report),
            "mfu": flops * tokens_per_s / (peak * info.world_size) if peak else None,
        }
        if is_eval:
            val_loss = evaluate()
            best_val = min(best_val, val_loss)
            row.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
        if logger:
            logger.log(row)
            bar.set_postfix(loss=f"{train_loss:.3f}")
            if is_eval:
                logger.plot()
        if is_ckpt:
            checkpoint_now(step, elapsed_before + time.perf_counter() - t0)
        t_report, step_report = time.perf_counter(), step
    bar.close()

    # ---- the end: a sample, the summary -------------------------------------------------------------------------
    wall_s = elapsed_before + time.perf_counter() - t0
    if val_loss is None:  # resumed a run that had already reached its steps
        val_loss = evaluate()
    summary = {
        "status": status,
        "diverged": status == "diverged",
        "message": message,
        "run_dir": str(run_dir),
        "steps": step_report,
        "tokens": step_report * tokens_per_step,
        "final_train_loss": train_loss,
        "final_val_loss": val_loss,
        "best_val_loss": best_val,
        "final_val_ppl": perplexity(val_loss),
        "tokens_per_s": (step_report - start) * tokens_per_step / max(wall_s - elapsed_before, 1e-9),
        "wall_s": wall_s,
        "params": param_counts(model_config)[0],
    }
    if logger:
        logger.plot()
        logger.close()
        if status == "finished" and tokenizer is not None and cfg.sample_tokens > 0:
            summary["sample"] = sample_story(raw_model, tokenizer, cfg, context_length, run_dir)
        write_json(run_dir / SUMMARY_FILE, summary)
        print(message or f"done: val loss {val_loss:.4f} (ppl {perplexity(val_loss):.2f}) in {wall_s:.0f}s")
    return summary


def sample_story(model, tokenizer, cfg: TrainConfig, context_length: int, run_dir: Path) -> str:
    """Sample a story from the prompt (in fp32: a few hundred tokens), print it and write it to sample.txt."""
    prompt = tokenizer.encode(cfg.sample_prompt)
    max_new = min(cfg.sample_tokens, context_length - len(prompt))
    eos = tokenizer.special_token_id(EOT) if EOT in tokenizer.special_tokens else None
    model.eval()
    ids = generate(model, prompt, max_new, temperature=0.8, top_p=0.95, eos_id=eos, seed=cfg.seed)
    story = cfg.sample_prompt + tokenizer.decode(ids)
    (run_dir / "sample.txt").write_text(story + "\n")
    tqdm.write(f"--- sample ---\n{story}\n--------------")
    return story


def preflight(model_config: ModelConfig, seq_len: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Check every Triton kernel's forward and backward against eager PyTorch on this run's shapes (batch 2)."""
    from kernels.check import check_kernels, format_check_table

    results = check_kernels(
        batch_size=2,
        seq_len=seq_len,
        d_model=model_config.d_model,
        d_ff=model_config.d_ff,
        num_heads=model_config.num_heads,
        num_kv_heads=model_config.num_kv_heads,
        vocab_size=model_config.vocab_size,
        rope_theta=model_config.rope_theta,
        dtype=dtype,
        device=device,
        seed=seed,
    )
    if not all(r.ok for r in results):
        raise PreflightError(
            "kernel preflight failed: a Triton kernel disagrees with eager PyTorch on this run's shapes "
            "(--no-preflight skips this check; --kernels eager avoids the kernels)\n" + format_check_table(results)
        )


def write_json(path: Path, value: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)
