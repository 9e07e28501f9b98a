"""The training run: ``run(cfg)`` goes open the run -> data -> model and optimizer -> train -> finish, flat, top to
bottom, each phase one function.

Everything that can be checked is checked before the first step (data, tokenizer, sample prompt, the model against
a resumed checkpoint, the kernels), so a bad input fails in seconds, not after the training it would have wasted.
Host syncs (``.item()``) happen only on report steps (log, eval and checkpoint steps), so on a GPU the CPU queues
steps ahead in between. Everything a run writes lands in its run directory, which ``store.rundir`` names, locks and
lays out; ``summary.json`` is written last, so its presence marks a finished run (or a diverged one: its "status").
"""

import dataclasses
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from smollm_stack import kernels
from smollm_stack.files import write_atomic
from smollm_stack.model import ModelConfig, TransformerLM, flops_per_token, generate, param_counts
from smollm_stack.train import precision
from smollm_stack.train.config import EvalSection, TrainConfig
from smollm_stack.train.data.sources import tokenizer_digest
from smollm_stack.train.data.tokens import (
    EOT,
    batch_from_starts,
    batch_sampler,
    check_length,
    document_ids,
    eval_starts,
)
from smollm_stack.train.data.tokens import open_tokens, resolve_data
from smollm_stack.train.eval import last_task_columns, parse_tasks, task_columns, training_docs
from smollm_stack.train.log import RunLogger, console, peak_flops, perplexity, progress_bar
from smollm_stack.train.metrics import bits_per_byte, bits_per_byte_factor, token_byte_lengths
from smollm_stack.train.optim.adamw import clip_gradients
from smollm_stack.train.optim.builder import build_optimizer
from smollm_stack.train.parallel.distributed import Dist, accumulating, init_distributed, shutdown
from smollm_stack.train.parallel.fsdp import full_model, shard
from smollm_stack.train.parallel.memory import checkpoint_blocks, memory_line
from smollm_stack.train.store.checkpoint import rng_state, save_checkpoint
from smollm_stack.train.store.resume import claim_run, restore, resume_schedule, resumed_model_config
from smollm_stack.train.store.rundir import RunDir, read_json, write_json
from smollm_stack.train.store.sharded import save_sharded
from smollm_stack.train.schedule import Schedule, build_schedule, warmup_note


class PreflightError(RuntimeError):
    """A Triton kernel disagrees with eager PyTorch on the run's shapes: training on it would be silently wrong."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM ended the run; ``str()`` says what was saved and how to resume. Exit status 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """The signal handler of a run. Inside the training loop (``armed``) the first SIGINT/SIGTERM is noted and the
    loop finishes its step, saves a checkpoint and raises Interrupted; before the loop, or a second signal, raises
    Interrupted at once (writes in flight are abandoned whole: smollm_stack.files)."""

    def __init__(self):
        self.signum, self.armed = None, False

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.armed or self.signum is not None:
            raise Interrupted(signum, f"stopped by {name}: the run's last checkpoint is the one to resume from")
        self.signum = signum
        console(f"{name}: finishing this step and saving a checkpoint (again to stop at once)")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@dataclass
class Data:
    """What the run reads, checked: token arrays, the model's vocabulary and context, the tokenizer and prompt."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    context_length: int
    tok_dir: Path | None  # the tokenizer's directory, when the run has one
    tokenizer: object | None  # its Tokenizer (for the sample at the end)
    prompt: list[int] | None  # the sample prompt's ids; None: no sample
    eot_id: int | None  # the id of <|endoftext|>, where documents end; None: unknown (no tokenizer, or none in it)
    doc_mask: bool  # attention stays inside documents (--doc-mask): the model gets doc_ids
    sampler: object  # the training batches (dataset.batch_sampler), built here so its checks run before training


@dataclass
class Model:
    """The model in its three wrappings, its optimizer, and where a resumed run picks up."""

    config: ModelConfig
    raw: TransformerLM  # the plain module (sharded in place under FSDP): parameters, checkpoints, sampling
    train: torch.nn.Module  # compiled and/or DDP-wrapped: the training forward
    eval: torch.nn.Module  # compiled but not DDP: evaluation needs no gradient hooks, no collective per forward
    optimizer: torch.optim.Optimizer
    schedule: Schedule  # the learning rate of every step (a resumed run keeps the one its steps were trained with)
    schedule_note: str  # what resuming did to the schedule, for the console ("" when nothing)
    backend: str  # the resolved backend: "triton" or "eager"
    start: int  # the last step already trained (0: a new run)
    elapsed_s: float  # wall-clock seconds of the steps before ``start``
    scaler: torch.amp.GradScaler  # fp16's loss scaling; passes everything through in bf16 and fp32


@dataclass
class Outcome:
    status: str  # "finished" or "diverged"
    message: str
    step: int  # the last step reported
    train_loss: float | None
    val_loss: float
    best_val: float
    wall_s: float
    bpb_factor: float | None  # val bits per byte = val loss x this (None: no tokenizer, so the bytes are unknown)


def run(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; return the summary also written to ``<run dir>/summary.json``.

    Bad inputs raise ValueError / FileNotFoundError with a message naming the problem. A run whose loss turns
    NaN/inf or passes ``cfg.training.diverge_loss`` stops early and returns ``{"status": "diverged", ...}`` instead of
    raising, keeping its last good checkpoint.
    """
    parse_tasks(cfg.eval.tasks)  # an unknown task: an error before anything starts
    info, device = init_distributed(cfg.system.device)
    try:
        with StopRequest().installed() as stop:
            return _run(cfg, info, device, stop)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e):
            raise ValueError(
                f"a micro-batch of {cfg.training.batch_size} sequences of "
                f"{cfg.model.context_length or 'the preset context'} tokens "
                f"does not fit in {device} memory: lower --batch-size (and raise --grad-accum to keep the global batch)"
            ) from None
        raise
    finally:
        shutdown(info)


def _run(cfg: TrainConfig, info: Dist, device: torch.device, stop: StopRequest) -> dict:
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    dtype = precision.resolve_dtype(cfg.system.dtype, device)
    run_dir, checkpoint = claim_run(cfg.checkpoint, cfg.parallel.kind, cfg.model.preset, info)
    try:
        if checkpoint is not None and checkpoint["iteration"] >= total_steps(cfg, info) and run_dir.summary.is_file():
            print(f"{run_dir} has finished its steps: nothing to do (give a larger --steps to train it further)")
            return read_json(run_dir.summary)
        data = prepare_data(cfg, info, run_dir)
        model = build_model(cfg, run_dir, data, checkpoint, info, device, dtype)
        autocast = precision.autocast(device, dtype)
        logger = start_log(cfg, info, run_dir, data, model, device, dtype)
        outcome = train(cfg, info, device, autocast, run_dir, data, model, logger, stop)
        return finish(cfg, info, run_dir, data, model, outcome, logger)
    finally:
        if info.main:
            run_dir.close()


def total_steps(cfg: TrainConfig, info: Dist) -> int:
    return max(1, cfg.training.tokens // tokens_per_step(cfg, info)) if cfg.training.tokens else cfg.training.steps


def tokens_per_step(cfg: TrainConfig, info: Dist) -> int:
    context_length = cfg.model.context_length or ModelConfig.preset(cfg.model.preset).context_length
    return cfg.training.batch_size * context_length * cfg.training.grad_accum * info.world_size


# ---- data: rank 0 trains the tokenizer and encodes first, the others then find it cached ------------------------


def prepare_data(cfg: TrainConfig, info: Dist, run_dir: RunDir) -> Data:
    preset = ModelConfig.preset(cfg.model.preset)  # the defaults of vocab_size and context_length
    vocab_size = cfg.data.vocab_size or preset.vocab_size
    context_length = cfg.model.context_length or preset.context_length
    if not info.node_main:  # the first process of each node prepares its cache, the others then find it there
        info.barrier()
    train_path, val_path, tok_dir = resolve_data(
        cfg.data.train_data,
        cfg.data.val_data,
        cfg.data.tokenizer,
        vocab_size,
        progress=cfg.logging.progress and info.main,
        field=cfg.data.text_field,
    )
    if info.node_main:
        info.barrier()
    tokenizer = None
    if tok_dir is not None:
        from smollm_stack.tokenizer import Tokenizer

        if run_dir.tokenizer.is_dir() and tokenizer_digest(run_dir.tokenizer) != tokenizer_digest(tok_dir):
            raise ValueError(
                f"the tokenizer {tok_dir} differs from the one this run trained with ({run_dir.tokenizer}): "
                "resume with that one, or start a new run"
            )
        tokenizer = Tokenizer.load(tok_dir)
        if cfg.data.vocab_size is not None and cfg.data.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"vocabulary/model mismatch: the tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens "
                f"but --vocab-size is {cfg.data.vocab_size}"
            )
        vocab_size = cfg.data.vocab_size or tokenizer.vocab_size  # a larger model vocabulary is fine (padding)
    train_data, val_data = open_tokens(train_path, vocab_size), open_tokens(val_path, vocab_size)
    check_length(val_data, context_length, "validation data")  # (the sampler, below, checks the training data)
    eot_id = tokenizer.special_token_id(EOT) if tokenizer is not None and EOT in tokenizer.special_tokens else None
    if cfg.data.doc_mask and eot_id is None:
        raise ValueError(
            f"--doc-mask needs to know where documents end: a tokenizer with {EOT} "
            "(with .npy data, pass the --tokenizer it was encoded with)"
        )
    prompt = None
    if tokenizer is not None and cfg.eval.sample_tokens > 0:
        prompt = tokenizer.encode(cfg.eval.sample_prompt)
        if not 0 < len(prompt) < context_length:
            raise ValueError(
                f"--sample-prompt is {len(prompt)} tokens: it needs 1 to {context_length - 1} to leave room in the "
                f"context of {context_length} (or --sample-tokens 0 for no sample)"
            )
    slots = cfg.training.grad_accum * info.world_size
    sampler = batch_sampler(
        cfg.data.windows, train_data, cfg.training.batch_size, context_length, cfg.training.seed, slots, eot_id
    )
    return Data(
        train_data, val_data, vocab_size, context_length, tok_dir, tokenizer, prompt, eot_id, cfg.data.doc_mask, sampler
    )


# ---- model and optimizer --------------------------------------------------------------------------------------


def build_model(cfg, run_dir: RunDir, data: Data, checkpoint: dict | None, info: Dist, device, dtype) -> Model:
    sizes = dict(vocab_size=data.vocab_size, context_length=data.context_length)
    config = ModelConfig.preset(cfg.model.preset, **cfg.model.args, **sizes)
    if checkpoint is not None:
        config = resumed_model_config(checkpoint["model_config"], config)
    try:
        backend = kernels.resolve_backend(config.backend, device)
    except RuntimeError as e:
        raise ValueError(f"--backend {config.backend}: {e}") from None
    torch.manual_seed(cfg.training.seed)
    raw = TransformerLM(config).to(device)
    if cfg.system.preflight and device.type == "cuda" and backend == "triton":
        preflight(config, data.context_length, dtype, device, cfg.training.seed, cfg.training.batch_size)
    if cfg.parallel.activation_checkpointing:
        checkpoint_blocks(raw)
    if cfg.parallel.kind == "fsdp" and info.enabled:
        shard(raw, device, dtype, info.world_size)  # before the optimizer: it swaps the parameters for shards
    optimizer = build_optimizer(cfg.optimizer, raw, device, cfg.schedule.max_lr)
    schedule = build_schedule(cfg.schedule, total_steps(cfg, info))
    schedule_note = warmup_note(schedule, total_steps(cfg, info))
    start, elapsed_s, scaler = 0, 0.0, precision.grad_scaler(device, dtype)
    if checkpoint is not None:  # (an extended WSD run may continue from its pre-decay checkpoint instead)
        schedule, checkpoint, schedule_note = resume_schedule(schedule, checkpoint, run_dir, info.main)
        start, elapsed_s = restore(checkpoint, raw, optimizer, scaler, info)
    compiled = torch.compile(raw) if cfg.system.compile else raw
    wrapped = compiled
    if info.enabled and cfg.parallel.kind == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(compiled, device_ids=device_ids)
    return Model(config, raw, wrapped, compiled, optimizer, schedule, schedule_note, backend, start, elapsed_s, scaler)


# ---- train ------------------------------------------------------------------------------------------------------


def start_log(cfg, info: Dist, run_dir: RunDir, data: Data, model: Model, device, dtype) -> RunLogger | None:
    """Rank 0 writes the run's config and tokenizer copy, and opens its metrics; the checks have all passed."""
    if not info.main:
        return None
    config_dict = saved_config(cfg, run_dir)
    run_dir.summary.unlink(missing_ok=True)  # a resumed run is unfinished again
    write_json(run_dir.config, config_dict)
    if data.tok_dir is not None:
        run_dir.copy_tokenizer(data.tok_dir)
    logger = RunLogger(run_dir, config_dict, model.start or None, cfg.logging.dashboards(), cfg.logging.project())
    total, non_embedding = param_counts(model.config)
    resuming = f", resuming at step {model.start}" if model.start else ""
    overrides = ", ".join(f"{k}={v}" for k, v in cfg.model.args.items())  # what runs: the preset as overridden
    preset = f"{cfg.model.preset} preset" + (f" ({overrides})" if overrides else "")
    print(
        f"{run_dir}: {preset}, {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding), "
        f"vocab {data.vocab_size}, {total_steps(cfg, info)} steps of {tokens_per_step(cfg, info):,} tokens on "
        f"{info.world_size} x {device} ({str(dtype).removeprefix('torch.')}, backend {model.backend}){resuming}"
    )
    if model.schedule_note:
        print(model.schedule_note)
    parallel = cfg.parallel.kind if info.enabled else "ddp"  # one process: nothing is sharded
    ckpt = cfg.parallel.activation_checkpointing
    print(
        memory_line(model.config, cfg.training.batch_size, dtype, parallel, info.world_size, ckpt, cfg.optimizer.name)
    )
    return logger


def saved_config(cfg: TrainConfig, run_dir: RunDir) -> dict:
    """The config as the run directory and its checkpoints keep it: what ``--resume`` starts from."""
    ckpt = dataclasses.replace(cfg.checkpoint, out_dir=str(run_dir), resume=None, force=False)
    return dataclasses.replace(cfg, checkpoint=ckpt).to_dict()


def save(run_dir: RunDir, model: Model, sampler, cfg: TrainConfig, info: Dist, step: int, elapsed_s: float):
    """Rank 0 writes a checkpoint file; under FSDP every rank writes its shards of a step directory."""
    extra = dict(model_config=asdict(model.config), train_config=saved_config(cfg, run_dir), elapsed_s=elapsed_s)
    extra.update(sampler=sampler.state_dict(), schedule=model.schedule.state_dict(), scaler=model.scaler.state_dict())
    if cfg.parallel.kind == "fsdp":
        meta = dict(iteration=step, rng=rng_state(), **extra)
        save_sharded(run_dir.sharded_checkpoint(step), model.raw, model.optimizer, meta, info)
    elif info.main:
        run_dir.check_alive()
        save_checkpoint(model.raw, model.optimizer, step, run_dir.checkpoint(step), **extra)
        if step == model.schedule.predecay_step:  # what a longer run re-decays from (the pruner keeps it)
            save_checkpoint(model.raw, model.optimizer, step, run_dir.predecay(step), **extra)
    if info.main:
        run_dir.record(run_dir.sharded_checkpoint(step) if cfg.parallel.kind == "fsdp" else run_dir.checkpoint(step))
        run_dir.prune(cfg.checkpoint.keep)


def doc_ids(x: torch.Tensor, data: Data) -> torch.Tensor | None:
    """The model's doc_ids for input windows x under --doc-mask (evaluation masks as training did), else None."""
    return document_ids(x, data.eot_id) if data.doc_mask else None


def evaluate(model: torch.nn.Module, data: Data, starts, batch_size: int, info: Dist, device, autocast) -> float:
    """Mean validation loss over the fixed windows; ranks split the batches and sum."""
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    stride = batch_size * info.world_size
    with torch.no_grad(), autocast:
        for i in range(info.rank * batch_size, -(-len(starts) // stride) * stride, stride):
            chunk = starts[i : i + batch_size]
            weight = len(chunk)  # 0 for a rank past the end: under FSDP it still joins the forward's all-gathers
            chunk = chunk if weight else starts[:batch_size]
            x, y = batch_from_starts(data.val, chunk, data.context_length, device)
            total += model(x, y, doc_ids=doc_ids(x, data)).float() * weight
            count += weight
    model.train()
    return (info.sum(total) / info.sum(count)).item()


def train(cfg, info: Dist, device, autocast, run_dir: RunDir, data: Data, model: Model, logger, stop) -> Outcome:
    steps, per_step, start = total_steps(cfg, info), tokens_per_step(cfg, info), model.start
    tokenizer, sampler, batch = data.tokenizer, data.sampler, cfg.training.batch_size
    val_starts, between_starts = (
        eval_starts(len(data.val), data.context_length, batches * cfg.training.batch_size * info.world_size)
        for batches in (cfg.eval.batches, cfg.eval.between_batches())
    )  # the last eval's (the whole split by default), and the cheaper subset of the ones before
    bpb_factor = between_factor = None
    if tokenizer is not None:
        lengths = token_byte_lengths(tokenizer, data.vocab_size)
        bpb_factor = bits_per_byte_factor(data.val, val_starts, data.context_length, lengths)
        between_factor = bits_per_byte_factor(data.val, between_starts, data.context_length, lengths)
    task_docs = training_docs(cfg.eval.tasks, cfg.eval.task_docs, tokenizer)  # every rank scores them all
    diverge_loss = cfg.training.diverge_loss or 2 * math.log(data.vocab_size)
    flops, peak = flops_per_token(model.config), peak_flops(device)
    params = list(model.raw.parameters())
    val_loss = train_loss = None
    logged = logger.rows if logger else []  # a resumed run's earlier rows
    whole = len(val_starts)  # best_val compares evals of these windows only, never the subset's
    whole_evals = [r for r in logged if r.get("val_loss") is not None and r.get("val_windows", whole) == whole]
    best_val = min((r["val_loss"] for r in whole_evals), default=math.inf)
    status, message = "finished", ""
    t0 = time.perf_counter()
    if start == 0:
        val_loss = evaluate(model.eval, data, between_starts, batch, info, device, autocast)  # the untrained model
        best_val = val_loss if len(between_starts) == whole else best_val
        tasks = task_columns(model.raw, tokenizer, task_docs)  # in fp32, as the sample: KV caches of one dtype
        if logger:
            row = {"step": 0, "tokens": 0, "time_s": 0.0, "val_loss": val_loss, "val_ppl": perplexity(val_loss),
                   "val_windows": len(between_starts)}  # fmt: skip
            logger.log({**row, "val_bpb": bits_per_byte(val_loss, between_factor), **tasks})
    t_report, step_report = time.perf_counter(), start
    stop.armed = True
    bar = progress_bar(
        total=steps, initial=start, desc="train", unit="step", disable=not (info.main and cfg.logging.progress)
    )
    for step in range(start + 1, steps + 1):
        lr = model.schedule.lr(step)
        for group in model.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.training.grad_accum):
            x, y = sampler.batch(step, info.rank * cfg.training.grad_accum + micro, device)
            last = micro == cfg.training.grad_accum - 1
            with accumulating(model.train, last):
                with autocast:
                    loss = model.train(x, y, doc_ids=doc_ids(x, data))
                model.scaler.scale(loss / cfg.training.grad_accum).backward()
            loss_sum += loss.detach()
        model.scaler.unscale_(model.optimizer)  # clipping sees the true gradients
        grad_norm = clip_gradients(cfg.optimizer.name, params, cfg.optimizer.grad_clip or math.inf)
        model.scaler.step(model.optimizer)  # skipped where fp16's gradients overflowed
        model.scaler.update()
        model.optimizer.zero_grad(set_to_none=True)
        bar.update()

        is_eval = step % cfg.eval.interval == 0 or step == steps
        is_ckpt = step % cfg.checkpoint.interval == 0 or step == steps or step == model.schedule.predecay_step
        if not (is_eval or is_ckpt or step % cfg.logging.interval == 0):
            if stop.signum is not None and not info.enabled:  # (several ranks agree on report steps only)
                elapsed_s = model.elapsed_s + time.perf_counter() - t0
                stop_run(run_dir, model, sampler, cfg, info, step, elapsed_s, stop, bar)
            continue
        # A report step: sync, check for divergence before anything is saved, then log.
        train_loss = info.mean(loss_sum / cfg.training.grad_accum).item()
        norm = grad_norm.item()
        now = time.perf_counter()
        interval = max(now - t_report, 1e-9)  # since the last report's end: its eval and checkpoint left out
        tokens_per_s = (step - step_report) * per_step / interval
        scaling = model.scaler.is_enabled()  # fp16: a step whose gradients overflowed was skipped, not diverged
        if not (math.isfinite(train_loss) and (math.isfinite(norm) or scaling)) or train_loss > diverge_loss:
            status, message = "diverged", diverged_message(step, train_loss, norm, diverge_loss, run_dir)
            break
        row = {
            "step": step,
            "tokens": step * per_step,
            "time_s": round(model.elapsed_s + now - t0, 3),
            "train_loss": train_loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens_per_s": tokens_per_s,
            "ms_per_step": 1000 * interval / (step - step_report),
            "mfu": flops * tokens_per_s / (peak * info.world_size) if peak else None,
        }
        if model.scaler.is_enabled():
            row["loss_scale"] = model.scaler.get_scale()
        if is_eval:
            starts, factor = (val_starts, bpb_factor) if step == steps else (between_starts, between_factor)
            val_loss = evaluate(model.eval, data, starts, batch, info, device, autocast)
            best_val = min(best_val, val_loss) if len(starts) == whole else best_val
            row.update(val_loss=val_loss, val_ppl=perplexity(val_loss), val_bpb=bits_per_byte(val_loss, factor))
            row.update(val_windows=len(starts))
            row.update(task_columns(model.raw, tokenizer, task_docs))
        if logger:
            logger.log(row)
            bar.set_postfix(loss=f"{train_loss:.3f}")
            if is_eval:
                logger.plot()
        if is_ckpt:
            save(run_dir, model, sampler, cfg, info, step, model.elapsed_s + time.perf_counter() - t0)
        if any(info.gather(stop.signum is not None)):
            elapsed_s = model.elapsed_s + time.perf_counter() - t0
            stop_run(run_dir, model, sampler, cfg, info, step, None if is_ckpt else elapsed_s, stop, bar)
        t_report, step_report = time.perf_counter(), step
    bar.close()
    if val_loss is None:  # resumed a run that had already reached its steps
        val_loss = evaluate(model.eval, data, val_starts, batch, info, device, autocast)
    wall_s = model.elapsed_s + time.perf_counter() - t0
    return Outcome(status, message, step_report, train_loss, val_loss, min(best_val, val_loss), wall_s, bpb_factor)


def stop_run(run_dir: RunDir, model: Model, sampler, cfg, info: Dist, step: int, elapsed_s: float | None, stop, bar):
    """Save ``step`` (unless ``elapsed_s`` is None: it was just saved) and raise Interrupted saying how to resume."""
    bar.close()
    if elapsed_s is not None:
        save(run_dir, model, sampler, cfg, info, step, elapsed_s)
    signum = stop.signum or signal.SIGTERM  # (another rank was signalled)
    raise Interrupted(
        signum,
        f"stopped by {signal.Signals(signum).name} after step {step}, checkpoint saved: "
        f"continue with smollm train --resume {run_dir}",
    )


def diverged_message(step: int, train_loss: float, norm: float, limit: float, run_dir: RunDir) -> str:
    last_ckpt = run_dir.checkpoints()  # all written by this run or verified on resume: good ones
    return (
        f"diverged at step {step}: train loss {train_loss:.4g}, grad norm {norm:.4g} (limit {limit:.3g}); stopped, "
        f"last good checkpoint: {last_ckpt[-1] if last_ckpt else 'none'}. "
        "Try a lower --max-lr or a longer --warmup-steps."
    )


# ---- finish: a sample, the summary ------------------------------------------------------------------------------


def finish(cfg, info: Dist, run_dir: RunDir, data: Data, model: Model, out: Outcome, logger) -> dict:
    per_step = tokens_per_step(cfg, info)
    summary = {
        "status": out.status,
        "diverged": out.status == "diverged",
        "message": out.message,
        "run_dir": str(run_dir),
        "steps": out.step,
        "tokens": out.step * per_step,
        "final_train_loss": out.train_loss,
        "final_val_loss": out.val_loss,
        "best_val_loss": out.best_val,
        "final_val_ppl": perplexity(out.val_loss),
        "final_val_bpb": bits_per_byte(out.val_loss, out.bpb_factor),
        "best_val_bpb": bits_per_byte(out.best_val, out.bpb_factor),
        "tokens_per_s": (out.step - model.start) * per_step / max(out.wall_s - model.elapsed_s, 1e-9),
        "wall_s": out.wall_s,
        "params": param_counts(model.config)[0],
    }
    sampling = out.status == "finished" and data.prompt is not None
    whole = full_model(model.raw, info) if sampling and cfg.parallel.kind == "fsdp" and info.enabled else model.raw
    if logger:
        run_dir.check_alive()  # never "done" for a run whose files went with its folder
        logger.plot()
        logger.close()
        if sampling:
            summary["sample"] = sample_story(whole, data, cfg.eval, cfg.training.seed, run_dir)
        summary.update(last_task_columns(logger.rows))  # --eval-tasks' final scores
        write_json(run_dir.summary, summary)
        ppl = summary["final_val_ppl"]
        print(out.message or f"done: val loss {out.val_loss:.4f} (ppl {ppl:.2f}) in {out.wall_s:.0f}s")
    return summary


def sample_story(model, data: Data, cfg: EvalSection, seed: int, run_dir: RunDir) -> str:
    """Sample a story from the prompt (in fp32: a few hundred tokens), print it and write it to sample.txt."""
    tokenizer = data.tokenizer
    max_new = min(cfg.sample_tokens, data.context_length - len(data.prompt))
    eos = tokenizer.special_token_id(EOT) if EOT in tokenizer.special_tokens else None
    model.eval()
    sampling = dict(temperature=0.8, top_p=0.95, eos_id=eos, seed=seed)
    ids = generate(model, data.prompt, max_new, **sampling, vocab_limit=tokenizer.vocab_size)  # no padding rows
    story = cfg.sample_prompt + tokenizer.decode(ids)
    write_atomic(run_dir.sample, story + "\n")
    console(f"--- sample ---\n{story}\n--------------")
    return story


def preflight(
    model_config: ModelConfig, seq_len: int, dtype: torch.dtype, device: torch.device, seed: int, batch_size: int
):
    """Check every Triton kernel's forward and backward against eager PyTorch on this run's shapes (batch 2: the fp64
    references fit beside it at any training batch), then tune attention at the training batch."""
    from smollm_stack.kernels.check import check_kernels, format_check_table

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
            "(--no-preflight skips this check; --backend eager avoids the kernels)\n" + format_check_table(results)
        )
    tune_attention(model_config, batch_size, seq_len, dtype, device)


def tune_attention(config: ModelConfig, batch_size: int, seq_len: int, dtype: torch.dtype, device: torch.device):
    """Attention's forward and backward once at the training shape, q, k, v laid out as the model passes them, so its
    autotuner (keyed by batch x heads and length) picks the tiles of the training grid here, before the first step."""
    heads = (config.num_heads, config.num_kv_heads, config.num_kv_heads)
    q, k, v = (torch.randn(batch_size, seq_len, h, config.head_dim, device=device, dtype=dtype, requires_grad=True)
               for h in heads)  # fmt: skip
    out = kernels.ops("triton", device).flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out.backward(torch.randn_like(out))
