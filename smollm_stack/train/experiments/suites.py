"""Suites: named lists of variants, each a set of TrainConfig overrides applied to one base config.

A suite is a function of the base config, so the same study runs on the tiny preset on a laptop or on the 17M
preset on real data: the learning rates are multiples of the base's, the widths follow the base model, and so on.
A spec file (TOML or JSON) gives a custom suite: ``name = "..."`` and a list of ``[[variants]]`` tables, each with a
``name``, an optional ``note`` and TrainConfig fields (a ``[variants.model]`` table holds ModelConfig overrides).
"""

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smollm_stack.model import ModelConfig
from smollm_stack.train.cli import read_toml
from smollm_stack.train.config import TrainConfig, make_config


@dataclass
class Variant:
    name: str  # its run directory under the suite directory, and its label in the plots
    overrides: dict = field(default_factory=dict)  # TrainConfig fields; "model_args" merges into the base's
    note: str = ""  # what changed, for the report's table

    def config(self, base: TrainConfig, out_dir: Path) -> TrainConfig:
        return make_config(base.to_dict(), **self.overrides, out_dir=str(out_dir), resume=None)


def base_model(base: TrainConfig) -> ModelConfig:
    return ModelConfig.preset(base.model.preset, **base.model.args)


def scaled_lr(base: TrainConfig, factor: float) -> dict:
    """max_lr and min_lr both times factor: the cosine keeps its floor at the same fraction of the peak."""
    return {
        "max_lr": float(f"{base.schedule.max_lr * factor:.4g}"),
        "min_lr": float(f"{base.schedule.min_lr * factor:.4g}"),
    }


def ablations(base: TrainConfig) -> list[Variant]:
    """The classic architecture ablations of a Llama block, one change each (CS336 assignment 1's list)."""
    model = base_model(base)
    # Without norms the initial logits are large: the loss starts near 4 ln(vocab), above the trainer's default
    # divergence limit of 2 ln(vocab), which would stop the run while its loss is still falling. Keep the check, higher.
    limit = round(10 * math.log(base.data.vocab_size or model.vocab_size), 1)
    no_norm = {"model_args": {"norm": "none"}, "diverge_loss": limit}
    return [
        Variant("baseline", {}, "pre-norm RMSNorm, RoPE, SwiGLU"),
        Variant("no-norm", no_norm, f"no RMSNorm at all, same lr (divergence limit {limit:g})"),
        Variant("no-norm-low-lr", {**no_norm, **scaled_lr(base, 0.25)}, f"no RMSNorm, lr / 4 (limit {limit:g})"),
        Variant("post-norm", {"model_args": {"norm": "post"}}, "norm(x + f(x)) as in the 2017 Transformer"),
        Variant("nope", {"model_args": {"position": "nope"}}, "no position embedding (causal mask only)"),
        Variant(
            "silu-mlp",
            {"model_args": {"ffn": "silu", "d_ff": 4 * model.d_model}},
            f"W2 SiLU(W1 x), d_ff = 4 d_model = {4 * model.d_model} (about SwiGLU's parameters)",
        ),
    ]


LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0, 1000.0)  # the last one is meant to diverge (100x does not, on tiny)


def lr(base: TrainConfig) -> list[Variant]:
    """A learning-rate sweep around the base's max_lr, up to one far past the stable range."""
    return [
        Variant(
            f"lr={base.schedule.max_lr * f:.3g}",
            scaled_lr(base, f),
            f"max_lr = {f:g} x base ({base.schedule.max_lr:g})",
        )
        for f in LR_FACTORS
    ]


def batch(base: TrainConfig) -> list[Variant]:
    """Batch sizes 1, 4, 16, ... up to 8x the base's, at the base's token budget, lr scaled by sqrt(batch / base).

    The base's batch_size is taken as the largest micro-batch that fits in memory: larger batches reach their size
    by gradient accumulation. Steps shrink as the batch grows so every variant sees the same tokens; warmup,
    evaluation and checkpoint intervals scale with the steps so the curves have the same shape and resolution.
    The square-root rule keeps the noise of an Adam update about constant (Malladi et al., 2022).
    """
    if base.training.tokens:
        raise ValueError("the batch suite scales the base's --steps: give --steps rather than --tokens")
    base_batch = base.training.batch_size * base.training.grad_accum
    budget = base.training.steps * base_batch  # sequences
    variants, size = [], 1
    while size <= 8 * base_batch:
        steps = max(1, budget // size)
        scale = steps / base.training.steps
        micro = min(size, base.training.batch_size)
        overrides = {
            "batch_size": micro,
            "grad_accum": size // micro,
            "steps": steps,
            "tokens": None,  # the budget is set through steps here (a base --tokens would override them)
            "warmup_steps": round(base.schedule.warmup_steps * scale),
            "eval_interval": max(1, round(base.eval.interval * scale)),
            "log_interval": max(1, round(base.logging.interval * scale)),
            "ckpt_interval": max(1, round(base.checkpoint.interval * scale)),
            **scaled_lr(base, (size / base_batch) ** 0.5),
        }
        note = f"{micro} x {size // micro} accumulated, {steps} steps, lr x {(size / base_batch) ** 0.5:.3g}"
        variants.append(Variant(f"batch={size}", overrides, note))
        size *= 4
    return variants


OPTIMIZER_LR_FACTORS = (0.3, 1.0, 3.0)


def optimizer(base: TrainConfig) -> list[Variant]:
    """AdamW against Muon (on the hidden matrices, AdamW on the rest) at the base's lr and 0.3x, 3x around it.

    Muon's update is scaled to an AdamW update's RMS (train/optim/muon.py), so the same max_lr is a fair comparison
    point for both; each still gets three lrs, as their best lr need not coincide.
    """
    return [
        Variant(
            f"{label}-lr={base.schedule.max_lr * f:.3g}",
            {"optimizer": name, **scaled_lr(base, f)},
            f"{note}, lr x {f:g}",
        )
        for label, name, note in (
            ("adamw", "torch", "AdamW everywhere"),
            ("muon", "muon", "Muon on hidden matrices, AdamW on the rest"),
        )
        for f in OPTIMIZER_LR_FACTORS
    ]


def schedule(base: TrainConfig) -> list[Variant]:
    """Cosine against warmup-stable-decay at the base's length, and each extended to twice that length.

    An extension (``--resume RUN --steps 2N``) of a run is bitwise the run of the config given here (resumes are
    exact, and tests/test_schedule.py holds that the extended schedule is the one below), so each extension runs as
    a fresh config: a cosine extended keeps its floor from step N on (cosine_steps = N); a WSD run extended
    continues its stable phase and decays over the last fraction of 2N, which is a 2N-step WSD run.
    """
    if base.training.tokens:
        raise ValueError("the schedule suite doubles the base's --steps: give --steps rather than --tokens")
    n = base.training.steps
    longer = {"steps": 2 * n}
    return [
        Variant("cosine", {"schedule": "cosine"}, f"cosine to min_lr at step {n}"),
        Variant(
            "wsd",
            {"schedule": "wsd"},
            f"WSD, {base.schedule.decay_shape} decay over the last {base.schedule.decay_fraction:g}",
        ),
        Variant(
            "cosine-extended",
            {"schedule": "cosine", "cosine_steps": n, **longer},
            f"cosine run extended to {2 * n}: its floor from step {n}",
        ),
        Variant("wsd-extended", {"schedule": "wsd", **longer}, f"WSD run extended to {2 * n}: re-decayed at the end"),
    ]


def documents(base: TrainConfig) -> list[Variant]:
    """Training windows drawn anywhere, windows that start at documents, and those with attention kept inside each
    document packed into the window (validation windows are the same for all; the masked variant's model is
    evaluated masked too, the attention it was trained with).
    """
    return [
        Variant("uniform", {"windows": "uniform"}, "windows start at any token"),
        Variant("aligned", {"windows": "aligned"}, "windows start at an end-of-text token, short documents packed"),
        Variant(
            "aligned+masked",
            {"windows": "aligned", "doc_mask": True},
            "aligned windows, attention masked across the packed documents",
        ),
    ]


SUITES: dict[str, Callable[[TrainConfig], list[Variant]]] = {
    "ablations": ablations,
    "lr": lr,
    "batch": batch,
    "optimizer": optimizer,
    "schedule": schedule,
    "documents": documents,
}


def load_spec(path: str) -> tuple[str, list[Variant]]:
    """(suite name, variants) from a TOML or JSON spec file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"suite spec not found: {path}")
    if p.suffix == ".json":
        try:
            spec = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    elif p.suffix == ".toml":
        spec = read_toml(path)
    else:
        raise ValueError(f"suite spec must be a .toml or .json file, got {path}")
    raw = spec.get("variants")
    if not isinstance(raw, list) or not raw or not all(isinstance(v, dict) and "name" in v for v in raw):
        raise ValueError(f"{path}: needs a non-empty list of variants, each with a name")
    variants = []
    for v in raw:
        v = dict(v)
        name, note = str(v.pop("name")), str(v.pop("note", ""))
        if "force" in v:  # only a command line may let a run write among other files
            raise ValueError(f"{path}: variant {name} sets force, which a spec file cannot: pass --force instead")
        if "model" in v and isinstance(v["model"], dict):
            v["model_args"] = v.pop("model")
        variants.append(Variant(name, v, note))
    return str(spec.get("name", p.stem)), variants


def check_name(name: str, what: str):
    """Names become folders: letters, digits and ._=+- only, not starting with a dot (no ".", "..", "../x")."""
    if not re.fullmatch(r"[\w=+-][\w.=+-]*", name):
        raise ValueError(f"{what} {name!r} must be letters, digits and ._=+- only, not starting with a dot")


def resolve_suite(suite: str, base: TrainConfig) -> tuple[str, list[Variant]]:
    """A suite name from SUITES or a spec file path -> (name, variants), with the names checked."""
    if suite in SUITES:
        name, variants = suite, SUITES[suite](base)
    elif Path(suite).suffix in (".toml", ".json"):
        name, variants = load_spec(suite)
    else:
        raise ValueError(f"unknown suite {suite!r}: choose one of {sorted(SUITES)} or give a .toml/.json spec file")
    check_name(name, "suite name")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"suite {name}: variant names must be unique, got {names}")
    for v in variants:
        check_name(v.name, f"suite {name}: variant name")
        try:
            base_model(v.config(base, Path(v.name)))  # bad fields or values fail now, not hours into the suite
        except (ValueError, TypeError) as e:
            raise ValueError(f"suite {name}, variant {v.name}: {e}") from None
    return name, variants
