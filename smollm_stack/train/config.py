"""The training configuration: a TrainConfig of sections (model, data, training, optimizer, schedule, eval,
checkpoint, parallel, system, logging), each a dataclass that checks itself, so each phase of a run takes the
section it needs.

Every field has one flat name, unique across sections, which is its flag (``max_lr`` -> ``--max-lr``; booleans get
``--x`` / ``--no-x``) and its key in a flat TOML file or a config saved before sections (``[schedule] max_lr`` and
a top-level ``max_lr`` are the same field). A field's flat name is its own unless the section's owner names it
(``schedule.kind`` is ``--schedule``, ``checkpoint.interval`` is ``--ckpt-interval``). The model is a preset of
``model.ModelConfig`` plus overrides: every ModelConfig field is a flag too (``--d-model 256``), kept in
``model.args`` (flat name ``model_args``; ``[model.args]`` or ``[model_args]`` in a TOML file). cli.py reads the
command line.
"""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from smollm_stack.model import ModelConfig, current_names
from smollm_stack.train.loggers import parse_loggers
from smollm_stack.train.precision import DTYPES

# Fields of ModelConfig that come from elsewhere: the tokenizer fixes the vocabulary, TrainConfig the context.
MODEL_FIELDS_SET_BY_TRAINER = ("vocab_size", "context_length")


def opt(default, help: str, flat: str | None = None):
    """A section's field with its --help text (the text doubles as the field's comment) and its flat name."""
    metadata = {"help": help, "flat": flat}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def require(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


class Section:
    """A section of TrainConfig: its fields hold their annotated types (checked first), then its own ``check``."""

    def __post_init__(self):
        check_types(self)
        self.check()

    def check(self):
        pass


@dataclass
class ModelSection(Section):
    preset: str = opt("tiny", "ModelConfig preset: tiny, tinystories-17m, 125m", flat="model")
    args: dict = opt({}, "ModelConfig overrides (on the command line: --d-model 256, --norm post, ...)",
                     flat="model_args")  # fmt: skip
    context_length: int | None = opt(None, "tokens per training sequence; none: the preset's context_length")

    def check(self):
        self.args = current_names(self.args)  # a field's old name (kernels) as today's (backend)
        require(self.context_length is None or self.context_length >= 1,
                f"context_length must be a positive int (or left out for the default), got {self.context_length!r}")
        unknown = set(self.args) - model_arg_names()
        require(not unknown, f"unknown model args {sorted(unknown)}; ModelConfig's are {sorted(model_arg_names())}")
        try:  # the model's own checks, now rather than after the run directory is claimed
            ModelConfig.preset(self.preset, **self.args)
        except TypeError as e:
            raise ValueError(f"model args: {e}") from None


@dataclass
class DataSection(Section):
    train_data: str | None = opt(None, "training tokens (.npy, shard dir) or text (.txt .jsonl .parquet dir glob hf:)")
    val_data: str | None = opt(None, "validation tokens or text, as --train-data; none: the embedded validation split")
    text_field: str = opt("text", "the jsonl field or parquet column that holds each document of text data")
    tokenizer: str | None = opt(None, "tokenizer dir (Tokenizer.save); none: train BPE on the training text (cached)")
    vocab_size: int | None = opt(None, "BPE vocabulary to train, and the model's vocab_size; none: the preset's")
    windows: Literal["uniform", "aligned"] = opt("uniform", "training windows start anywhere, or at document starts")
    doc_mask: bool = opt(False, "attention stays inside documents: each <|endoftext|> opens one (train and eval)")

    def check(self):
        require(self.vocab_size is None or self.vocab_size >= 1,
                f"vocab_size must be a positive int (or left out for the default), got {self.vocab_size!r}")


@dataclass
class TrainingSection(Section):
    """The run's length and batch. The default length: bench/records/2026-12-02-recipes-step-count."""

    steps: int = opt(1200, "optimizer steps")
    tokens: int | None = opt(None, "token budget: steps = tokens / tokens per step (a --steps flag wins over a file's)")
    batch_size: int = opt(16, "sequences per micro-batch on each process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)")
    seed: int = opt(1337, "seed of the initialization and of the batch sampler")
    diverge_loss: float | None = opt(None, "stop as diverged when the train loss passes this; none: 2 ln(vocab)")

    def check(self):
        positive(self, "steps", "batch_size", "grad_accum")
        require(self.tokens is None or self.tokens >= 1,
                f"tokens must be a positive int (or left out for the default), got {self.tokens!r}")
        require(0 <= self.seed < 2**63, f"seed must be an int in [0, 2**63), got {self.seed!r}")
        require(self.diverge_loss is None or self.diverge_loss > 0,
                f"diverge_loss must be positive, got {self.diverge_loss!r}")


@dataclass
class OptimizerSection(Section):
    """The default run's best recipe found: bench/records/2026-12-01-recipes-decay-length."""

    name: Literal["torch", "ours", "muon"] = opt(
        "muon", "torch: torch's fused AdamW and clipping; ours: train/optim/adamw.py's; muon: Muon on hidden matrices",
        flat="optimizer",
    )
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    # 0.3, not the usual 0.1: the default run sees its corpus 4.3 times (bench/records/2026-12-01-recipes-weight-decay).
    weight_decay: float = opt(0.3, "decoupled weight decay, on matrices and embeddings only (not on norm gains)")
    grad_clip: float = opt(1.0, "clip the global gradient L2 norm to this (0: off)")
    muon_momentum: float = opt(0.95, "Muon's Nesterov momentum (the AdamW part keeps --beta1, --beta2)")

    def check(self):
        for name in ("grad_clip", "weight_decay"):  # negative: gradient ascent, growing weights
            require(getattr(self, name) >= 0, f"{name} must be >= 0 (0: off), got {getattr(self, name)!r}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0,
                f"need 0 <= beta1, beta2 < 1 and eps > 0, got {self.beta1}, {self.beta2}, {self.eps}")
        require(0 <= self.muon_momentum < 1, f"need 0 <= muon_momentum < 1, got {self.muon_momentum}")
        choice(self, "name")


@dataclass
class ScheduleSection(Section):
    """Warmup-stable-decay over the last half, 1-sqrt, by default: bench/records/2026-12-01-recipes-decay-length."""

    kind: Literal["cosine", "wsd"] = opt(
        "wsd", "lr schedule: warmup-stable-decay (extends cleanly), or cosine", flat="schedule"
    )
    max_lr: float = opt(1e-2, "peak learning rate, reached after warmup")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine cycle and after it")
    warmup_steps: int = opt(30, "linear warmup from 0 to max_lr")
    cosine_steps: int | None = opt(None, "--schedule cosine: step at which it reaches min_lr; none: the last step")
    decay_fraction: float = opt(0.5, "wsd: the last fraction of the steps, decaying from max_lr to min_lr")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = opt("1-sqrt", "wsd: shape of the decay")

    def check(self):
        require(0 <= self.min_lr <= self.max_lr,
                f"need 0 <= min_lr <= max_lr, got min_lr={self.min_lr}, max_lr={self.max_lr}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        require(self.cosine_steps is None or self.cosine_steps >= 1,
                f"cosine_steps must be a positive int (or left out for the default), got {self.cosine_steps!r}")
        require(0 < self.decay_fraction <= 1, f"need 0 < decay_fraction <= 1, got {self.decay_fraction}")
        choice(self, "kind")
        choice(self, "decay_shape")
        require(self.cosine_steps is None or self.kind == "cosine",
                f"cosine_steps ({self.cosine_steps}) shapes only --schedule cosine, not {self.kind}")


@dataclass
class EvalSection(Section):
    interval: int = opt(240, "evaluate every N steps (and at the start and the end)", flat="eval_interval")
    batches: int = opt(0, "validation batches (global), the same each eval, spread over the split (0: all of it)",
                       flat="eval_batches")  # fmt: skip
    # A fixed subset but for the last eval: the whole split at every eval cost as much as the training.
    subset_batches: int = opt(8, "validation batches of every eval but the last (0 or >= eval_batches: the same)",
                              flat="eval_subset_batches")  # fmt: skip
    tasks: str = opt("", "downstream tasks scored at each eval, comma-separated: hellaswag, arc_easy, ...",
                     flat="eval_tasks")  # fmt: skip
    task_docs: int = opt(100, "documents of each --eval-tasks task scored (0: all)", flat="eval_task_docs")
    sample_prompt: str = opt("Once upon a time", "prompt of the story sampled at the end")
    sample_tokens: int = opt(200, "tokens to sample at the end (0: no sample)")

    def check(self):
        positive(self, "interval")
        for name in ("batches", "subset_batches", "sample_tokens"):
            require(getattr(self, name) >= 0, f"{flat_name(self, name)} must be >= 0, got {getattr(self, name)!r}")
        require(self.task_docs >= 0, f"eval_task_docs must be >= 0 (0: all), got {self.task_docs}")

    def between_batches(self) -> int:
        """Validation batches of the evals between the first and the last: the subset, never more than the whole."""
        if self.subset_batches == 0 or 0 < self.batches <= self.subset_batches:
            return self.batches
        return self.subset_batches


@dataclass
class CheckpointSection(Section):
    interval: int = opt(200, "checkpoint every N steps (and at the end)", flat="ckpt_interval")
    keep: int = opt(2, "keep the last K checkpoints", flat="keep_ckpts")
    out_dir: str | None = opt(None, "run directory; none: runs/<preset>-<date-time>")
    resume: str | None = opt(None, "continue the run in this directory from its last checkpoint (auto: --out-dir's)")
    force: bool = opt(False, "write the run into an --out-dir that holds other files")

    def check(self):
        positive(self, "interval", "keep")


@dataclass
class ParallelSection(Section):
    kind: Literal["ddp", "fsdp"] = opt(
        "ddp",
        "under torchrun: ddp (replicate the model) or fsdp (shard parameters, gradients and optimizer state; with "
        "muon each rank also gathers every hidden matrix's update to orthogonalize it, see train/optim/muon.py)",
        flat="parallel",
    )
    activation_checkpointing: bool = opt(False, "keep only each block's input for backward and recompute the rest")

    def check(self):
        choice(self, "kind")


@dataclass
class SystemSection(Section):
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "auto (bfloat16 autocast on a GPU of capability >= 8.0, float16 autocast with loss "
                     "scaling below it, float32 on a CPU), bfloat16, float16, float32 (see train/precision.py)")
    # Off by default: on a 2-core CPU compiling takes minutes, more than the default run saves with it.
    compile: bool = opt(False, "torch.compile the model")
    preflight: bool = opt(True, "check the Triton kernels against eager PyTorch on the run's shapes before training")
    threads: int = opt(0, "CPU threads for torch (0: torch's default, $OMP_NUM_THREADS or the cores)")

    def check(self):
        require(bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device)),
                f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(self.threads >= 0, f"threads must be >= 0, got {self.threads!r}")


@dataclass
class LoggingSection(Section):
    interval: int = opt(10, "metrics row and console line every N steps", flat="log_interval")
    progress: bool = opt(True, "show a progress bar")
    logger: str = opt("jsonl", "comma-separated: jsonl (metrics.jsonl and plots, always), tensorboard, trackio, wandb")
    logger_project: str | None = opt(None, "the trackio or wandb project (default: --wandb-project, or smollm-stack)")
    wandb_project: str | None = opt(None, "log to this Weights & Biases project (as --logger jsonl,wandb)")

    def check(self):
        positive(self, "interval")
        self.dashboards()  # a dashboard whose package is missing: an error now, not after the run is claimed

    def dashboards(self) -> list[str]:
        """--logger's dashboards (train/loggers.py), wandb too under --wandb-project."""
        return parse_loggers(self.logger + (",wandb" if self.wandb_project else ""))

    def project(self) -> str | None:
        return self.logger_project or self.wandb_project


@dataclass(init=False)
class TrainConfig:
    """Everything a run needs. The defaults are the embedded default run (``smollm train``): the tiny preset on
    the shipped TinyStories excerpt, a few minutes on a 2-core CPU (bench/RESULTS.md, Default run)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    system: SystemSection = field(default_factory=SystemSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __init__(self, **values):
        """Sections (dataclasses or dicts) and flat names alike: ``TrainConfig(steps=100)`` is
        ``TrainConfig(training=TrainingSection(steps=100))``; what is not given is the default."""
        grouped = {name: {} for name in sections()}
        for name, value in flatten(values).items():
            section, key = FLAT[name]
            grouped[section][key] = value
        for name, cls in sections().items():
            setattr(self, name, cls(**grouped[name]))

    def to_dict(self) -> dict:
        """The config as sections of fields: what a run directory and its checkpoints save."""
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """The config as one dict keyed by flat names (the flags' spelling)."""
        return {name: getattr(getattr(self, s), f) for name, (s, f) in FLAT.items()}


def sections() -> dict[str, type]:
    """Section name -> its dataclass, in TrainConfig's order."""
    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


def flat_name(section, name: str) -> str:
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    return f.metadata["flat"] or f.name


# flat name -> (section, field): every field's one flat name, the flags' and a flat TOML's spelling.
FLAT = {
    flat_name(cls, f.name): (section, f.name) for section, cls in sections().items() for f in dataclasses.fields(cls)
}


def positive(section, *names: str):
    for name in names:
        value = getattr(section, name)
        require(not isinstance(value, bool) and isinstance(value, int) and value >= 1,
                f"{flat_name(section, name)} must be a positive int, got {value!r}")


def choice(section, name: str):
    choices = typing.get_args(typing.get_type_hints(type(section))[name])
    value = getattr(section, name)
    require(value in choices, f"{flat_name(section, name)} must be one of {', '.join(choices)}, got {value!r}")


def check_types(section):
    """Every field holds its annotated type (an int is a fine float): a TOML ``max_lr = "0.01"`` fails here, by name."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, annotation = getattr(section, f.name), hints[f.name]
        optional = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
        kind, _ = scalar_type(annotation)
        if value is None and optional:
            continue
        number = kind is float and isinstance(value, int)
        name = flat_name(section, f.name)
        if isinstance(value, bool) != (kind is bool) or not (isinstance(value, kind) or number):
            raise ValueError(f"{name} must be {'a' if kind is not int else 'an'} {kind.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # NaN and inf pass every check the wrong way
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def model_arg_names() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig)} - set(MODEL_FIELDS_SET_BY_TRAINER)


def scalar_type(annotation):
    """int | None -> int; Literal["a", "b"] -> (str, ("a", "b")); plain types pass through."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def flatten(values: dict, where: str | None = None) -> dict:
    """Sections of fields, flat names, or both (a config saved before sections, an old TOML) -> flat names.
    A section name holding a dict is a section; holding anything else, the flat field of that name (``model``,
    ``schedule``, ``optimizer`` and ``parallel`` were flat fields before they were sections)."""
    flat, known = {}, sections()
    for key, value in values.items():
        if isinstance(value, Section):
            value = dataclasses.asdict(value)
        if key in known and isinstance(value, dict):
            names = {f.name: flat_name(known[key], f.name) for f in dataclasses.fields(known[key])}
            unknown = sorted(set(value) - set(names))
            require(not unknown, f"{where or 'config'}: unknown fields {', '.join(f'{key}.{k}' for k in unknown)}")
            flat.update({names[k]: v for k, v in value.items()})
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(FLAT))
    require(not unknown, f"{where + ': ' if where else ''}unknown config fields {unknown}")
    return flat


# Fields whose default changed, with the value a run saved before the field existed was trained with.
EARLIER_DEFAULTS = {"schedule": "cosine", "optimizer": "torch"}


def complete_saved(saved: dict) -> dict:
    """A saved config (flat or in sections) as flat names, with the fields added since it was written: each as that
    run had it (its default then). A config saved in sections already has them all."""
    return {**TrainConfig().flat(), **EARLIER_DEFAULTS, **flatten(saved, "saved config")}


def make_config(base: dict | None = None, **overrides) -> TrainConfig:
    """A TrainConfig from a dict of fields (flat names or sections) plus flat overrides; model_args are merged."""
    values = flatten(dict(base or {}))
    overrides = flatten(overrides)
    model_args = {**values.pop("model_args", {}), **overrides.pop("model_args", {})}
    values.update(overrides, model_args=model_args)
    return TrainConfig(**values)
