"""Learning-rate schedules, and what happens to them when a run is extended (``--resume RUN --steps N``).

Both schedules are one shape: a linear warmup from 0 to ``max_lr``, a stable phase at ``max_lr``, a decay to
``min_lr`` between ``decay_start`` and ``decay_end``, then flat at ``min_lr``.

- cosine (``--schedule cosine``): no stable phase; a cosine decay from the end of warmup to ``--cosine-steps``
  (default: the last step).
- warmup-stable-decay (``--schedule wsd``, Hägele et al., 2024, "Scaling Laws and Compute-Optimal Training Beyond
  Fixed Training Durations"): stable at ``max_lr`` until the last ``--decay-fraction`` of the steps, then a
  ``--decay-shape`` decay (linear, cosine or 1-sqrt) that ends at ``min_lr`` on the last step.

A run's schedule is fixed when the run starts and saved in every checkpoint (``Schedule.state_dict``), because a
schedule that is rebuilt from a new ``--steps`` changes the learning rate of steps already trained: the README's
promised extension of a 900-step cosine run to 3000 steps used to restart at 4.1e-3 on step 901 after ending at
5e-4 on step 900. ``extend`` decides what an extended run does instead (train/store/resume.py moves the files):

- wsd: the stable phase goes on, and the decay is redone at the end of the new length. A run that is already in
  (or past) its decay continues from the checkpoint of its last step at ``max_lr`` (``predecay_*.pt``, which the
  pruner keeps); its later checkpoints move, and copies of its metrics and summary go, to ``decayed_<step>/``.
- cosine: a cosine fixes its end at the start, so an extended cosine run keeps its schedule: the learning rate
  stays at the floor ``min_lr`` for the added steps (a note says so). Runs meant to be extended should use wsd.
"""

import math
from dataclasses import asdict, dataclass


# Decay shapes: the fraction of (max_lr - min_lr) left at progress p through the decay, from 1 at p=0 to 0 at p=1.
DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),  # half the drop in the first quarter; Hägele et al.'s best
}


@dataclass(frozen=True)
class Schedule:
    kind: str  # "cosine" or "wsd"
    max_lr: float
    min_lr: float
    warmup: int  # steps of linear warmup
    decay_start: int  # last step at max_lr (for cosine: the end of warmup)
    decay_end: int  # first step at min_lr
    shape: str  # a DECAY_SHAPES key

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (steps count from 1; step 0 is the initial state)."""
        if step < self.warmup:
            return self.max_lr * step / self.warmup
        if step >= self.decay_end:
            return self.min_lr
        if step <= self.decay_start:
            return self.max_lr
        progress = (step - self.decay_start) / (self.decay_end - self.decay_start)
        return self.min_lr + (self.max_lr - self.min_lr) * DECAY_SHAPES[self.shape](progress)

    @property
    def predecay_step(self) -> int | None:
        """The step whose checkpoint a longer wsd run re-decays from (None: cosine, or no stable phase)."""
        if self.kind == "wsd" and self.warmup <= self.decay_start < self.decay_end:
            return self.decay_start
        return None

    def same_until(self, other: "Schedule", step: int) -> bool:
        """Whether both give every step up to ``step`` the same learning rate (so the steps trained stay valid)."""
        return all(self.lr(s) == other.lr(s) for s in range(step + 1))

    def state_dict(self) -> dict:
        return asdict(self)


def build_schedule(section, steps: int) -> Schedule:
    """The schedule of a run of ``steps`` steps with a config's schedule section (``cfg.schedule``)."""
    s = section
    if s.kind == "cosine":
        return Schedule("cosine", s.max_lr, s.min_lr, s.warmup_steps, s.warmup_steps, s.cosine_steps or steps, "cosine")
    decay_start = max(s.warmup_steps, steps - round(s.decay_fraction * steps))
    return Schedule("wsd", s.max_lr, s.min_lr, s.warmup_steps, decay_start, steps, s.decay_shape)


def warmup_note(schedule: Schedule, steps: int) -> str:
    """A note for the console when a run of ``steps`` steps ends inside its warmup ("" otherwise)."""
    if steps >= schedule.warmup:
        return ""
    return (
        f"note: the run's {steps} steps end inside its {schedule.warmup} warmup steps, so the learning rate rises "
        f"to {schedule.lr(steps):.2e} only, never --max-lr {schedule.max_lr:.2e}, and never decays: lower "
        "--warmup-steps (or train longer)"
    )


def cosine_lr(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """Learning rate at iteration ``it``: linear warmup from 0, cosine decay to ``min_lr``, then flat.

    1. it < warmup_iters: max_lr * it / warmup_iters.
    2. warmup_iters <= it <= cosine_cycle_iters: min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2,
       progress going from 0 to 1 over the cycle.
    3. it > cosine_cycle_iters: min_lr.
    """
    return Schedule("cosine", max_lr, min_lr, warmup_iters, warmup_iters, cosine_cycle_iters, "cosine").lr(it)


def extend(old: Schedule, new: Schedule, start: int) -> tuple[Schedule, int | None, str]:
    """A run trained to step ``start`` under ``old`` whose config now asks for ``new``: (the schedule it continues with,
    the step whose pre-decay checkpoint it restarts from (None: it goes on from ``start``), a note for the console).

    A ValueError when no schedule keeps the learning rate of the steps already trained."""
    if new.same_until(old, start):  # the steps already trained had the lr the new schedule gives them
        return new, None, ""
    if old.kind == "cosine":
        note = (
            f"note: keeping the run's cosine schedule (min_lr {old.min_lr:g} from step {old.decay_end} on): "
            f"rebuilding it for the new length would move the lr of step {start + 1} from {old.lr(start + 1):.3g} "
            f"to {new.lr(start + 1):.3g}. A cosine run extends at its floor; --schedule wsd runs re-decay."
        )
        return old, None, note
    step = old.predecay_step
    if step is None or not new.same_until(old, step):
        raise ValueError(
            f"this schedule changes the lr of steps already trained (step {start}: {old.lr(start):.3g} -> "
            f"{new.lr(start):.3g}){', before the stable phase ends' if step is not None else ' (no stable phase)'}: "
            "keep the run's schedule flags"
        )
    note = f"note: re-decaying from the pre-decay checkpoint of step {step} (the old decay is in decayed_{start:06d}/)"
    return new, step, note
