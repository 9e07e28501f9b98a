"""Run a suite: every variant through the trainer into ``<suite dir>/<variant>``, N at a time, resumable.

A variant whose run directory is finished (train.store.rundir's states: it holds a summary, for finished and diverged
runs alike) is skipped; every other one runs with ``--resume auto``: a resumable one continues from its newest
intact checkpoint, a dead one (killed before its first checkpoint) and a new one start from step 0. So a killed suite
is continued by running the same command again; nothing is ever deleted. A variant that fails
(bad data, out of memory, a crash) is recorded as "failed" and the others go on. With ``jobs`` = 1 the variants run
one after another in this process; with ``jobs`` > 1 as that many subprocesses at once, each on its own GPU when
there are GPUs, else on cores / jobs CPU threads each.
"""

import json
import os
import platform
import subprocess
import sys
import time
from collections import deque
from datetime import datetime, UTC
from pathlib import Path

import torch
from tqdm import tqdm

from smollm_stack.model import ModelConfig
from smollm_stack.train.config import TrainConfig, complete_saved
from smollm_stack.train.data.tokens import resolve_data
from smollm_stack.train.experiments.suites import Variant, resolve_suite
from smollm_stack.train.loop import run
from smollm_stack.train.store.rundir import RunDir, read_json, write_json

SUITE_FILE = "suite.json"
# `smollm experiments _variant CONFIG_JSON` runs one variant in a subprocess (parallel suites): not a user
# command, so train.experiments dispatches it before its parser and --help never lists it.
VARIANT_COMMAND = "_variant"
# Fields that may change between an interrupted suite and its continuation without changing what a run computes.
RUNTIME_FIELDS = (
    "out_dir", "resume", "force", "progress", "threads", "device", "wandb_project", "logger", "logger_project",
)  # fmt: skip


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line), cpu
        )
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": gpus,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_os": platform.platform(),
    }


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_FIELDS}


def prepare(cfg: TrainConfig) -> str:
    """What to do with the run directory ``cfg.checkpoint.out_dir``: "done", "resume" or "start" (both set its resume
    to "auto").

    A directory holding a run of another config is refused: its results would be mistaken for this config's. So is
    a folder of other files (the trainer would refuse it too, but only once its turn comes).
    """
    run_dir = RunDir(cfg.checkpoint.out_dir)
    state = run_dir.state()
    if state == "foreign" and not cfg.checkpoint.force:
        raise ValueError(
            f"{run_dir} holds files that are not a run's ({', '.join(run_dir.entries()[:4])}): "
            "choose another output directory"
        )
    saved = read_json(run_dir.config)
    if saved is not None:  # a field added since that run was saved ran as its default then: no difference
        saved = complete_saved(saved)
    if saved is not None and _comparable(saved) != _comparable(cfg.flat()):
        changed = sorted(k for k in _comparable(cfg.flat()) if saved.get(k) != cfg.flat()[k])
        raise ValueError(
            f"{run_dir} holds a run with another config (differs in {', '.join(changed)}): "
            "choose another output directory, or delete that run directory"
        )
    if state == "finished":
        return "done"
    cfg.checkpoint.resume = "auto"
    return "resume" if state == "resumable" else "start"


def slot_settings(slot: int, jobs: int, cfg: TrainConfig) -> dict:
    """Environment for the subprocess in ``slot`` (sets cfg.system.threads on the CPU): its own GPU, or its share of
    cores."""
    env = dict(os.environ)
    gpus = torch.cuda.device_count() if cfg.system.device in ("auto", "cuda") else 0
    if gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
        env["CUDA_VISIBLE_DEVICES"] = visible[slot % gpus]
    elif jobs > 1:
        cfg.system.threads = max(1, (os.cpu_count() or 1) // jobs)
        env["OMP_NUM_THREADS"] = str(cfg.system.threads)
    return env


def run_suite(
    suite: str, base: TrainConfig, out_dir: str | None = None, jobs: int = 1, progress: bool = True
) -> tuple[Path, list[dict]]:
    """Run (or continue) ``suite`` on ``base``; return the suite directory and one status row per variant.

    ``suite`` is a name from ``SUITES`` or a spec file. Rows are ``{"name", "note", "status", "message"}`` with
    status "finished", "diverged" or "failed" (the variant's own error; the suite goes on).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    name, variants = resolve_suite(suite, base)
    suite_dir = Path(out_dir or f"runs/experiments/{name}")
    configs = {v.name: v.config(base, suite_dir / v.name) for v in variants}
    actions = {v.name: prepare(configs[v.name]) for v in variants}
    todo = deque(v for v in variants if actions[v.name] != "done")
    gpus = torch.cuda.device_count() if base.system.device in ("auto", "cuda") else 0
    if jobs > 1 and gpus and jobs > gpus:
        print(f"warning: --jobs {jobs} on {gpus} GPUs: some variants share a GPU")
    suite_dir.mkdir(parents=True, exist_ok=True)
    meta = read_json(suite_dir / SUITE_FILE) or {"started": now()}
    meta.update(
        name=name,
        base=base.to_dict(),
        variants=[{"name": v.name, "note": v.note, "overrides": v.overrides} for v in variants],
    )
    if todo or "machine" not in meta:  # where and how the results were made: a no-op rerun elsewhere changes nothing
        meta.update(machine=machine_info(), jobs=jobs)
    write_suite(suite_dir, meta)
    done = len(variants) - len(todo)
    print(f"suite {name} -> {suite_dir}: {len(variants)} variants, {done} done, {len(todo)} to run, {jobs} at once")
    if todo:
        # Train the tokenizer and encode the data once, here, rather than in every variant at the same time.
        vocab_size = base.data.vocab_size or ModelConfig.preset(base.model.preset).vocab_size
        resolve_data(
            base.data.train_data,
            base.data.val_data,
            base.data.tokenizer,
            vocab_size,
            progress=progress,
            field=base.data.text_field,
        )
    run_all = _run_inline if jobs == 1 else _run_parallel
    failures = run_all(todo, configs, actions, suite_dir, jobs, progress) if todo else {}
    rows = [variant_status(v, suite_dir, failures) for v in variants]
    meta = {**meta, "finished": now() if todo else meta.get("finished", now()), "status": rows}
    write_suite(suite_dir, meta)
    return suite_dir, rows


def _run_inline(todo, configs, actions, suite_dir: Path, jobs: int, progress: bool) -> dict[str, str]:
    """Run the variants in ``todo`` one by one in this process; return {name: error} of those that failed."""
    failures = {}
    for variant in todo:
        cfg = configs[variant.name]
        cfg.logging.progress = progress
        print(f"{'resuming' if actions[variant.name] == 'resume' else 'starting'} {variant.name}")
        try:
            run(cfg)
        except (ValueError, FileNotFoundError, TypeError, RuntimeError) as e:
            failures[variant.name] = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"variant {variant.name} failed ({failures[variant.name]}); going on with the others")
    return failures


def _run_parallel(todo, configs, actions, suite_dir: Path, jobs: int, progress: bool) -> dict[str, str]:
    """Run the variants in ``todo``, ``jobs`` subprocesses at a time; return {name: error} of those that failed."""
    failures, running, free = {}, {}, list(range(jobs))
    (suite_dir / "logs").mkdir(exist_ok=True)
    bar = tqdm(total=len(todo), desc="variants", unit="variant", disable=not progress)
    try:
        while todo or running:
            while todo and free:
                slot, variant = free.pop(0), todo.popleft()
                cfg = configs[variant.name]
                env = slot_settings(slot, jobs, cfg)
                cfg.logging.progress = False  # several bars in one terminal garble; the logs get the per-interval lines
                log = open(suite_dir / "logs" / f"{variant.name}.log", "a")
                what = "resuming" if actions[variant.name] == "resume" else "starting"
                tqdm.write(f"{what} {variant.name} (log: {log.name})")
                cmd = [sys.executable, "-m", "smollm_stack.train.experiments", VARIANT_COMMAND]
                cmd.append(json.dumps(cfg.to_dict()))
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                running[slot] = (variant, proc, log)
            time.sleep(0.2)
            for slot, (variant, proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                if proc.returncode != 0:
                    failures[variant.name] = f"exit code {proc.returncode}, see logs/{variant.name}.log"
                    tqdm.write(f"variant {variant.name} failed ({failures[variant.name]}); going on with the others")
                del running[slot]
                free.append(slot)
                bar.update()
    finally:
        for _, proc, log in running.values():  # interrupted: stop our own children, keep their checkpoints
            proc.terminate()
            proc.wait()
            log.close()
        bar.close()
    return failures


def variant_status(variant: Variant, suite_dir: Path, failures: dict[str, str]) -> dict:
    summary = read_json(RunDir(suite_dir / variant.name).summary)
    if summary is None:
        status, message = "failed", failures.get(variant.name, "no summary.json")
    else:
        status, message = summary["status"], summary.get("message", "")
    return {"name": variant.name, "note": variant.note, "status": status, "message": message}


def write_suite(suite_dir: Path, meta: dict):
    write_json(suite_dir / SUITE_FILE, meta)
