"""What a run continues from: the run directory it claims, the newest intact checkpoint in it, the model and the
schedule that checkpoint allows, and the state it restores.

``--resume`` continues a run from its last intact checkpoint (damaged newer ones are set aside: rundir.newest_intact).
The checkpoint decides the model (every field but FREE_ON_RESUME must match the flags) and the schedule of the steps
already trained (schedule.extend: an extended wsd run re-decays from its pre-decay checkpoint, whose later
checkpoints this module moves to ``decayed_<step>/``).
"""

import dataclasses

import torch

from smollm_stack.model import ModelConfig, current_names
from smollm_stack.train.config import CheckpointSection, make_config
from smollm_stack.train.parallel.distributed import Dist
from smollm_stack.train.store.checkpoint import apply_checkpoint, read_checkpoint, set_rng_state
from smollm_stack.train.store.rundir import RunDir, open_run
from smollm_stack.train.store.sharded import latest_sharded, load_sharded
from smollm_stack.train.schedule import Schedule, build_schedule, extend

# ModelConfig fields a resumed run may change: which backend computes the model, and an init its weights replace.
FREE_ON_RESUME = ("backend", "zero_init_residual")


def claim_run(cfg: CheckpointSection, parallel: str, preset: str, info: Dist) -> tuple[RunDir, dict | None]:
    """The run directory (locked by rank 0) and the newest intact checkpoint to resume from (None: from step 0), for
    a run of ``parallel`` ("ddp" or "fsdp") of the model ``preset`` (a new run's folder is named after it)."""
    run_dir, ckpt_path, checkpoint = None, None, None
    if info.main:
        run_dir = open_run(cfg.out_dir, cfg.resume, preset, cfg.force)
        try:
            if cfg.resume is not None and parallel == "ddp":
                ckpt_path, checkpoint = run_dir.latest_checkpoint()
                if checkpoint is None:
                    check_kind(run_dir, parallel)
        except BaseException:
            run_dir.close()
            raise
    if info.enabled:  # the others follow rank 0's choice (ranks started a second apart would name different dirs)
        shared = [str(run_dir) if info.main else None, str(ckpt_path) if ckpt_path else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        if not info.main:
            run_dir = RunDir(shared[0])
            checkpoint = read_checkpoint(shared[1]) if shared[1] else None
    if cfg.resume is not None and parallel == "fsdp":  # every rank verifies its share of the shards
        try:
            ckpt_path, checkpoint = latest_sharded(run_dir.sharded_checkpoints(), info)
            if checkpoint is None:
                check_kind(run_dir, parallel)
        except BaseException:
            if info.main:
                run_dir.close()
            raise
        if checkpoint is not None:
            checkpoint["shards"] = ckpt_path
    return run_dir, checkpoint


def check_kind(run_dir: RunDir, parallel: str):
    """A run's checkpoints are of its parallelism's kind; resuming under the other would silently start over."""
    if parallel == "ddp" and run_dir.sharded_checkpoints():
        raise ValueError(
            f"cannot resume: {run_dir} holds sharded checkpoints: resume with --parallel fsdp (on any number of "
            "processes), or turn one into a file with smollm consolidate"
        )
    if parallel == "fsdp" and run_dir.checkpoints():
        raise ValueError(f"cannot resume: {run_dir} holds single-file checkpoints: resume with --parallel ddp")


def resumed_model_config(saved: dict, config: ModelConfig) -> ModelConfig:
    """The model a resumed run trains: the checkpoint's. A field the checkpoint lacks is ModelConfig's default, the
    model it trained before the field existed (say, a tiny-preset run from before value embeddings); every other field
    but FREE_ON_RESUME must match ``config``, else say which."""
    saved = current_names(saved)  # a field's old name (kernels) as today's (backend)
    fields = dataclasses.fields(ModelConfig)
    missing = {f.name: f.default for f in fields if f.name not in saved and f.default is not dataclasses.MISSING}
    config, saved = dataclasses.replace(config, **missing), {**saved, **missing}
    current = dataclasses.asdict(config)
    changed = [
        f"{k} ({saved.get(k)!r} in the checkpoint, {v!r} now)"
        for k, v in current.items()
        if k not in FREE_ON_RESUME and saved.get(k) != v
    ]
    if changed:
        raise ValueError(f"cannot resume: the model differs from the checkpoint's in {', '.join(changed)}")
    return config


def resume_schedule(new: Schedule, checkpoint: dict, run_dir: RunDir, main: bool) -> tuple[Schedule, dict, str]:
    """(schedule, checkpoint to continue from, note for the console) of a resumed run whose config asks for ``new``.

    ``checkpoint`` is the run's last one; its saved schedule is the one its steps were trained with (checkpoints
    of older versions have none: their train_config's is rebuilt). Only the ``main`` process moves files.
    """
    start = checkpoint["iteration"]
    if "schedule" in checkpoint:
        old = Schedule(**checkpoint["schedule"])
    else:  # written before schedules were saved: the one its config gave
        saved = make_config(checkpoint["train_config"])
        old = build_schedule(saved.schedule, saved.training.steps)
    try:
        schedule, step, note = extend(old, new, start)
    except ValueError as e:
        raise ValueError(f"cannot resume {run_dir}: {e}") from None
    if step is None:
        return schedule, checkpoint, note
    path = run_dir.predecay(step)
    if not path.is_file():
        raise ValueError(
            f"cannot resume {run_dir} with this schedule: it changes the lr of steps already trained "
            f"(step {start}: {old.lr(start):.3g} -> {new.lr(start):.3g}), and there is no pre-decay checkpoint "
            f"{path.name} to redo the decay from; keep the run's schedule flags"
        )
    if main:
        run_dir.archive_decay(step, start)
    return schedule, read_checkpoint(path), note


def restore(checkpoint: dict, model: torch.nn.Module, optimizer, scaler: torch.amp.GradScaler, info: Dist):
    """Load a checkpoint (a file's dict, or a sharded one's meta with its "shards") into the model, optimizer, RNG
    and loss scaler; return (the last step it trained, the wall-clock seconds it took)."""
    if "shards" in checkpoint:
        load_sharded(checkpoint["shards"], model, optimizer, info)
        start = checkpoint["iteration"]
    else:
        start = apply_checkpoint(checkpoint, model, optimizer)
    set_rng_state(checkpoint["rng"])
    scaler.load_state_dict(checkpoint.get("scaler", {}))
    return start, checkpoint.get("elapsed_s", 0.0)
