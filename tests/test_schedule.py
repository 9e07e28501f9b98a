"""Learning-rate schedules: their shapes, and an extended run's lr history being one schedule (never a jump)."""

import json
import math

import pytest
import torch
from test_train_run import tiny

from smollm_stack.train import run
from smollm_stack.train.store.checkpoint import read_checkpoint
from smollm_stack.train.cli import load_run_config
from smollm_stack.train.config import make_config
from smollm_stack.train.log import read_metrics
from smollm_stack.train.store.rundir import RunDir
from smollm_stack.train.store.resume import resume_schedule
from smollm_stack.train.schedule import Schedule, build_schedule, warmup_note

SCHEDULES = [dict(schedule="cosine")] + [dict(schedule="wsd", decay_shape=s) for s in ("linear", "cosine", "1-sqrt")]


def test_wsd_shape():
    cfg = make_config(
        schedule="wsd", max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_fraction=0.25, decay_shape="linear"
    )
    s = build_schedule(cfg.schedule, 100)
    assert (s.decay_start, s.decay_end, s.predecay_step) == (75, 100, 75)
    assert [s.lr(t) for t in (0, 5, 10, 50, 75)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert s.lr(100) == s.lr(500) == 0.1
    halfway = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}  # fraction of max - min left at p = 1/2
    for shape, left in halfway.items():
        s = build_schedule(make_config(cfg.to_dict(), decay_shape=shape).schedule, 100)
        assert s.lr(75 + 25 / 2) == pytest.approx(0.1 + 0.9 * left)
        assert s.lr(76) < 1.0 and s.lr(99) > 0.1


@pytest.mark.parametrize("fields", SCHEDULES)
def test_a_run_shorter_than_its_warmup_says_so(fields):
    cfg = make_config(**fields, max_lr=1e-2, warmup_steps=30)
    note = warmup_note(build_schedule(cfg.schedule, 20), 20)
    assert "20 steps end inside its 30 warmup steps" in note
    assert "rises to 6.67e-03 only, never --max-lr 1.00e-02" in note
    assert warmup_note(build_schedule(cfg.schedule, 30), 30) == ""  # step 30 is at max_lr


def test_extending_a_finished_cosine_run_keeps_its_floor():
    """The bug: --resume RUN --steps 3000 re-stretched the default 900-step cosine, lr 5e-4 at 900 -> 4.1e-3 at 901."""
    cfg = make_config(schedule="cosine", max_lr=5e-3, min_lr=5e-4)  # the default lrs of the time
    old, stretched = build_schedule(cfg.schedule, 900), build_schedule(cfg.schedule, 3000)
    assert old.lr(900) == 5e-4 and stretched.lr(901) == pytest.approx(4.1e-3, abs=1e-4)  # what it used to do
    checkpoint = {"iteration": 900, "schedule": old.state_dict()}
    schedule, same, note = resume_schedule(stretched, checkpoint, None, main=True)
    assert schedule == old and same is checkpoint and "floor" in note
    assert schedule.lr(901) == schedule.lr(3000) == 5e-4


def test_wsd_is_the_default_and_cosine_steps_needs_cosine(tmp_path):
    assert make_config().schedule.kind == "wsd"
    assert build_schedule(make_config(schedule="cosine", cosine_steps=10).schedule, 20).decay_end == 10
    with pytest.raises(ValueError, match="only --schedule cosine"):  # silently ignored under wsd, before
        make_config(cosine_steps=10)
    # A run saved before the schedule and optimizer fields existed was trained with cosine and AdamW, the only ones
    # then: it resumes so (Muon's state would not load its checkpoints).
    run_dir = RunDir(tmp_path / "old")
    run_dir.path.mkdir()
    saved = make_config(cosine_steps=40, schedule="cosine").flat()  # flat, as configs were saved then
    run_dir.config.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("schedule", "optimizer")}))
    resumed = make_config(load_run_config(str(run_dir.path)))
    assert (resumed.schedule.kind, resumed.optimizer.name) == ("cosine", "torch")


def test_a_schedule_unchanged_so_far_is_taken_as_given(tmp_path):
    # Killed during warmup, or a wsd run still in its stable phase: the new length applies, nothing was decayed yet.
    for kind in ("cosine", "wsd"):
        cfg = make_config(schedule=kind)
        old, new = build_schedule(cfg.schedule, 900), build_schedule(cfg.schedule, 3000)
        start = 20 if kind == "cosine" else 400  # wsd: stable until step 450 of 900
        saved = {"iteration": start, "schedule": old.state_dict()}
        assert resume_schedule(new, saved, RunDir(tmp_path), True)[0] == new


def test_wsd_without_a_predecay_checkpoint_is_refused(tmp_path):
    cfg = make_config(schedule="wsd")
    old = build_schedule(cfg.schedule, 900)
    with pytest.raises(ValueError, match=f"no pre-decay checkpoint predecay_{old.predecay_step:06d}.pt"):
        saved = {"iteration": 900, "schedule": old.state_dict()}
        resume_schedule(build_schedule(cfg.schedule, 3000), saved, RunDir(tmp_path), True)


@pytest.mark.parametrize("fields", SCHEDULES, ids=lambda f: "-".join(f.values()))
def test_every_schedule_extends_without_a_jump(tmp_path, fields):
    """Finished at 900, extended to 3000: the lr of every step ever trained comes from the one schedule returned."""
    cfg = make_config(**fields)
    old = build_schedule(cfg.schedule, 900)
    if old.predecay_step is not None:
        predecay = RunDir(tmp_path).predecay(old.predecay_step)
        torch.save({"model": {}, "optimizer": {}, "iteration": old.predecay_step}, predecay)
    checkpoint = {"iteration": 900, "schedule": old.state_dict()}
    schedule, resumed, _ = resume_schedule(build_schedule(cfg.schedule, 3000), checkpoint, RunDir(tmp_path), main=True)
    start = resumed["iteration"]  # 900, or the pre-decay step where a wsd run re-decays
    assert schedule.same_until(old, start)
    steps = [schedule.lr(t) for t in range(start, 3001)]
    biggest = max(abs(b - a) for a, b in zip(steps, steps[1:]))
    assert biggest < 0.1 * cfg.schedule.max_lr  # the steepest own step: 1-sqrt's first, 4% of max; the bug's was 72%
    assert schedule.lr(3000) == cfg.schedule.min_lr


def _lrs(run_dir) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r}


@pytest.mark.parametrize("fields", [SCHEDULES[0], SCHEDULES[-1]], ids=lambda f: "-".join(f.values()))
def test_extending_a_finished_run_never_jumps(tokens, tmp_path, fields):
    """A 20-step run extended to 30: every logged lr is that of one schedule, which agrees with the first run's."""
    run_dir = tmp_path / "r"
    first = run(tiny(tokens, run_dir, **fields, decay_fraction=0.3, keep_ckpts=1))
    before = _lrs(run_dir)
    extended = run(make_config(load_run_config(run_dir), resume=str(run_dir), steps=30))
    assert first["status"] == extended["status"] == "finished"
    after = _lrs(run_dir)
    history = Schedule(**read_checkpoint(RunDir(run_dir).checkpoints()[-1])["schedule"])  # what the extension ran
    assert after == {step: history.lr(step) for step in after}
    if fields["schedule"] == "cosine":  # kept as it was: the floor from step 20 on
        assert history.decay_end == 20 and after == {**before, 25: history.min_lr, 30: history.min_lr}
    else:  # re-decayed from the checkpoint of step 14, the last one at max_lr: the rows after it were redone
        assert history.decay_end == 30 and history.predecay_step == 21 and RunDir(run_dir).predecay(14).is_file()
        assert (run_dir / "decayed_000020" / "ckpt_000020.pt").is_file()  # the first decay, kept aside
        assert [s for s in after if s > 14] == [15, 20, 21, 25, 30] and after[15] == after[20] == history.max_lr
        assert {s: lr for s, lr in before.items() if s <= 14} == {s: lr for s, lr in after.items() if s <= 14}


def test_schedule_suite_extensions_are_what_an_extending_resume_runs(tmp_path):
    from smollm_stack.train.experiments.suites import resolve_suite

    base = make_config(steps=300)
    _, variants = resolve_suite("schedule", base)
    configs = {v.name: v.config(base, tmp_path / v.name) for v in variants}
    for kind in ("cosine", "wsd"):
        short, extended = configs[kind], configs[f"{kind}-extended"]
        old = build_schedule(short.schedule, short.training.steps)
        if old.predecay_step is not None:
            predecay = RunDir(tmp_path).predecay(old.predecay_step)
            torch.save({"model": {}, "optimizer": {}, "iteration": old.predecay_step}, predecay)
        checkpoint = {"iteration": short.training.steps, "schedule": old.state_dict()}
        asked = build_schedule(
            make_config(short.to_dict(), steps=600).schedule, 600
        )  # what --resume RUN --steps 600 asks for
        resumed, _, _ = resume_schedule(asked, checkpoint, RunDir(tmp_path), main=False)
        assert extended.training.steps == 600 and build_schedule(extended.schedule, extended.training.steps) == resumed
