"""The training configuration: one dataclass, built from defaults < an optional TOML file < command-line flags.

Every field is a flag (``batch_size`` -> ``--batch-size``); booleans get ``--x`` / ``--no-x``. The model is a
preset of ``model.ModelConfig`` plus overrides: every ModelConfig field is a flag too (``--d-model 256``), kept in
``TrainConfig.model_args``; a TOML file gives them in a ``[model_args]`` table. ``--resume RUN_DIR`` starts from the
run's saved config, and flags given alongside it override that (e.g. more ``--steps``); ``--resume auto`` does the
same with the run in ``--out-dir`` if there is one.
"""

import argparse
import dataclasses
import math
import re
import types
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from smollm_stack.model import ModelConfig
from smollm_stack.train.eval import parse_tasks
from smollm_stack.train.loggers import parse_loggers
from smollm_stack.train.precision import DTYPES
from smollm_stack.train.rundir import RunDir, read_json

# Fields of ModelConfig that come from elsewhere: the tokenizer fixes the vocabulary, TrainConfig the context.
_MODEL_FIELDS_SET_BY_TRAINER = ("vocab_size", "context_length")


def opt(default, help: str):
    """A dataclass field with its --help text (the text doubles as the field's comment)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the embedded default run (``smollm train``): the tiny preset on
    the shipped TinyStories excerpt, sized to about 4 minutes on a quiet 2-core Intel Xeon (longer on slower CPUs:
    bench/RESULTS.md)."""

    # data
    train_data: str | None = opt(None, "training tokens (.npy, shard dir) or text (.txt .jsonl .parquet dir glob hf:)")
    val_data: str | None = opt(None, "validation tokens or text, as --train-data; none: the embedded validation split")
    text_field: str = opt("text", "the jsonl field or parquet column that holds each document of text data")
    tokenizer: str | None = opt(None, "tokenizer dir (Tokenizer.save); none: train BPE on the training text (cached)")
    vocab_size: int | None = opt(None, "BPE vocabulary to train, and the model's vocab_size; none: the preset's")
    # model
    model: str = opt("tiny", "ModelConfig preset: tiny, tinystories-17m, 125m")
    model_args: dict = opt({}, "ModelConfig overrides (on the command line: --d-model 256, --norm post, ...)")
    context_length: int | None = opt(None, "tokens per training sequence; none: the preset's context_length")
    # batch and length
    batch_size: int = opt(16, "sequences per micro-batch on each process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)")
    # 1200 Muon steps (2.46M tokens, ~4.3 passes), evaluated at the start and the end, in less wall time than
    # the 900 AdamW steps of the 2026-11-28 default on a 2-core Intel Xeon (fresh clones, back to back; not measured
    # on the AMD EPYC); 1000 / 1250 / 1350 steps reach 3.052 / 2.995 / 2.988 (bench/RESULTS.md, recipes round six).
    # More tokens beat a wider model (d_model 192: 0.54x the tokens/s) and a shallower one ties.
    steps: int = opt(1200, "optimizer steps")
    tokens: int | None = opt(None, "token budget: steps = tokens / tokens per step (a --steps flag wins over a file's)")
    # optimizer and schedule: the default run's best recipe found (bench/RESULTS.md, "Recipes", rounds four and five)
    max_lr: float = opt(1e-2, "peak learning rate, reached after warmup")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine cycle and after it")
    warmup_steps: int = opt(30, "linear warmup from 0 to max_lr")
    cosine_steps: int | None = opt(None, "--schedule cosine: step at which it reaches min_lr; none: the last step")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    # 0.3: the default run's validation loss by decay 0 / 0.1 / 0.3 / 0.6 / 1.0 was 3.211 / 3.182 / 3.160 / 3.184 /
    # 3.248 (it sees its corpus 4.3 times; bench/RESULTS.md). Single-pass recipes keep the usual 0.1 (webtext.py).
    weight_decay: float = opt(0.3, "decoupled weight decay, on matrices and embeddings only (not on norm gains)")
    grad_clip: float = opt(1.0, "clip the global gradient L2 norm to this (0: off)")
    # schedule shape, optimizer choice and window placement (docs/train.md, "Recipes")
    # wsd: 3.182 against cosine's 3.230 on the default run, and it extends; decaying over the last 0.4 of the steps
    # rather than 0.2: Muon 3.128 -> 3.105 (0.6: 3.114), AdamW 3.160 -> 3.151, at 1060 Muon or 1200 AdamW steps; 0.5
    # and 0.4 tie within one seed's spread (0.02). Muon's lr 1e-2 beat 8e-3 and 1.3e-2 by 0.015-0.04 in two rounds.
    schedule: Literal["cosine", "wsd"] = opt("wsd", "lr schedule: warmup-stable-decay (extends cleanly), or cosine")
    decay_fraction: float = opt(0.5, "wsd: the last fraction of the steps, decaying from max_lr to min_lr")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = opt("1-sqrt", "wsd: shape of the decay")
    optimizer: Literal["torch", "ours", "muon"] = opt(
        "muon", "torch: torch's fused AdamW and clipping; ours: train/optim.py's; muon: Muon on hidden matrices"
    )
    muon_momentum: float = opt(0.95, "Muon's Nesterov momentum (the AdamW part keeps --beta1, --beta2)")
    windows: Literal["uniform", "aligned"] = opt("uniform", "training windows start anywhere, or at document starts")
    doc_mask: bool = opt(False, "attention stays inside documents: each <|endoftext|> opens one (train and eval)")
    # evaluation, logging, checkpoints
    eval_interval: int = opt(240, "evaluate every N steps (and at the start and the end)")
    eval_batches: int = opt(0, "validation batches (global), the same each eval, spread over the split (0: all of it)")
    # Every eval but the last scores a fixed subset: the default run's validation curve has six points, and its
    # wall time drops, since its whole-split eval at step 0 (1724 windows) cost as much as 13 subsets (128).
    eval_subset_batches: int = opt(8, "validation batches of every eval but the last (0 or >= eval_batches: the same)")
    log_interval: int = opt(10, "metrics row and console line every N steps")
    eval_tasks: str = opt("", "downstream tasks scored at each eval, comma-separated: hellaswag, arc_easy, ...")
    eval_task_docs: int = opt(100, "documents of each --eval-tasks task scored (0: all)")
    ckpt_interval: int = opt(200, "checkpoint every N steps (and at the end)")
    keep_ckpts: int = opt(2, "keep the last K checkpoints")
    out_dir: str | None = opt(None, "run directory; none: runs/<preset>-<date-time>")
    resume: str | None = opt(None, "continue the run in this directory from its last checkpoint (auto: --out-dir's)")
    force: bool = opt(False, "write the run into an --out-dir that holds other files")
    diverge_loss: float | None = opt(None, "stop as diverged when the train loss passes this; none: 2 ln(vocab)")
    # sampling at the end
    sample_prompt: str = opt("Once upon a time", "prompt of the story sampled at the end")
    sample_tokens: int = opt(200, "tokens to sample at the end (0: no sample)")
    # parallelism and memory (see train/fsdp.py and train/memory.py)
    parallel: Literal["ddp", "fsdp"] = opt(
        "ddp",
        "under torchrun: ddp (replicate the model) or fsdp (shard parameters, gradients and optimizer state; with "
        "muon each rank also gathers every hidden matrix's update to orthogonalize it, see train/muon.py)",
    )
    activation_checkpointing: bool = opt(False, "keep only each block's input for backward and recompute the rest")
    # system
    seed: int = opt(1337, "seed of the initialization and of the batch sampler")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "auto (bfloat16 autocast on a GPU of capability >= 8.0, float16 autocast with loss "
                     "scaling below it, float32 on a CPU), bfloat16, float16, float32 (see train/precision.py)")
    # Off by default: on the 2-core CPU compiling the tiny model took 225 s (loaded machine) for 1.2x steps after.
    compile: bool = opt(False, "torch.compile the model")
    preflight: bool = opt(True, "check the Triton kernels against eager PyTorch on the run's shapes before training")
    threads: int = opt(0, "CPU threads for torch (0: torch's default, $OMP_NUM_THREADS or the cores)")
    progress: bool = opt(True, "show a progress bar")
    wandb_project: str | None = opt(None, "log to this Weights & Biases project (as --logger jsonl,wandb)")
    logger: str = opt("jsonl", "comma-separated: jsonl (metrics.jsonl and plots, always), tensorboard, trackio, wandb")
    logger_project: str | None = opt(None, "the trackio or wandb project (default: --wandb-project, or smollm-stack)")

    def __post_init__(self):
        check_types(self)
        for f in dataclasses.fields(self):  # NaN and inf pass every comparison below the wrong way, or train garbage
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        for name in ("context_length", "tokens", "vocab_size", "cosine_steps"):  # None: the default; 0 is not
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive int (or left out for the default), got {value!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        positive = ("batch_size", "grad_accum", "steps", "eval_interval", "log_interval", "ckpt_interval", "keep_ckpts")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "eval_batches", "eval_subset_batches", "sample_tokens", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={self.min_lr}, max_lr={self.max_lr}")
        for name in ("grad_clip", "weight_decay"):  # negative: gradient ascent, growing weights
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise ValueError(f"need 0 <= beta1, beta2 < 1 and eps > 0, got {self.beta1}, {self.beta2}, {self.eps}")
        if self.diverge_loss is not None and not self.diverge_loss > 0:
            raise ValueError(f"diverge_loss must be positive, got {self.diverge_loss!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        for name in ("schedule", "decay_shape", "optimizer", "windows"):
            choices = typing.get_args(typing.get_type_hints(TrainConfig)[name])
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not 0 < self.decay_fraction <= 1 or not 0 <= self.muon_momentum < 1:
            raise ValueError(
                f"need 0 < decay_fraction <= 1 and 0 <= muon_momentum < 1, got {self.decay_fraction}, "
                f"{self.muon_momentum}"
            )
        if self.cosine_steps is not None and self.schedule != "cosine":
            raise ValueError(f"cosine_steps ({self.cosine_steps}) shapes only --schedule cosine, not {self.schedule}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        unknown = set(self.model_args) - model_arg_names()
        if unknown:
            raise ValueError(f"unknown model args {sorted(unknown)}; ModelConfig's are {sorted(model_arg_names())}")
        try:  # the model's own checks, now rather than after the run directory is claimed
            ModelConfig.preset(self.model, **self.model_args)
        except TypeError as e:
            raise ValueError(f"model args: {e}") from None
        self.dashboards()  # a dashboard whose package is missing: an error now, not after the run is claimed
        parse_tasks(self.eval_tasks)
        if self.eval_task_docs < 0:
            raise ValueError(f"eval_task_docs must be >= 0 (0: all), got {self.eval_task_docs}")

    def dashboards(self) -> list[str]:
        """--logger's dashboards (train/loggers.py), wandb too under --wandb-project."""
        return parse_loggers(self.logger + (",wandb" if self.wandb_project else ""))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_types(cfg: "TrainConfig"):
    """Every field holds its annotated type (an int is a fine float): a TOML ``max_lr = "0.01"`` fails here, by name."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, annotation = getattr(cfg, f.name), hints[f.name]
        optional = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
        kind, _ = _scalar_type(annotation)
        if value is None and optional:
            continue
        number = kind is float and isinstance(value, int)
        if isinstance(value, bool) != (kind is bool) or not (isinstance(value, kind) or number):
            raise ValueError(f"{f.name} must be {'a' if kind is not int else 'an'} {kind.__name__}, got {value!r}")


def model_arg_names() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig)} - set(_MODEL_FIELDS_SET_BY_TRAINER)


def _scalar_type(annotation):
    """int | None -> int; Literal["a", "b"] -> (str, ("a", "b")); plain types pass through."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def _add_field(parser, name: str, annotation, help: str, dest: str):
    kind, choices = _scalar_type(annotation)
    flag = "--" + name.replace("_", "-")
    if choices:
        help = f"{help} ({', '.join(map(str, choices))})"
    if kind is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help)
    else:
        parser.add_argument(flag, dest=dest, type=kind, choices=choices, help=help, metavar=name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smollm train",
        description="Train a language model. With no arguments: the embedded TinyStories run (tiny preset).",
        argument_default=argparse.SUPPRESS,  # only flags actually given reach the namespace (they override)
    )
    parser.add_argument("--config", dest="config_file", help="TOML file of TrainConfig fields ([model_args] table)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model_args":
            _add_field(parser, f.name, hints[f.name], f.metadata["help"], dest=f.name)
    group = parser.add_argument_group("model overrides (ModelConfig fields, on top of the --model preset)")
    model_hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _MODEL_FIELDS_SET_BY_TRAINER:
            _add_field(group, f.name, model_hints[f.name], f"ModelConfig.{f.name}", dest="model." + f.name)
    return parser


def read_toml(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8: byte {e.object[e.start]:#04x} at offset {e.start}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None


# Fields whose default changed, with the value a run saved before the field existed was trained with.
EARLIER_DEFAULTS = {"schedule": "cosine", "optimizer": "torch"}


def complete_saved(saved: dict) -> dict:
    """A saved config with the fields added since it was written: each as that run had it (its default then)."""
    return {**TrainConfig().to_dict(), **EARLIER_DEFAULTS, **saved}


def load_run_config(run_dir: str) -> dict:
    """The TrainConfig fields saved in a run directory (what --resume starts from)."""
    run = RunDir(run_dir)
    if run.path.exists() and not run.path.is_dir():
        raise ValueError(f"--resume {run_dir}: that is a file; --resume takes a run directory (or auto)")
    saved = read_json(run.config)
    if saved is None:
        raise FileNotFoundError(f"cannot resume: {run.config} not found (is {run_dir!r} a run directory?)")
    return complete_saved(saved)


def make_config(base: dict | None = None, **overrides) -> TrainConfig:
    """A TrainConfig from a dict of fields plus overrides; model_args are merged, not replaced."""
    values = dict(base or {})
    model_args = {**values.pop("model_args", {}), **overrides.pop("model_args", {})}
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    return TrainConfig(**values, model_args=model_args)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line: defaults < --resume's saved config < --config TOML < explicit flags."""
    given = vars(build_parser().parse_args(argv))
    model_args = {k.removeprefix("model."): given.pop(k) for k in list(given) if k.startswith("model.")}
    config_file = given.pop("config_file", None)
    base = {}
    if given.get("resume") == "auto":  # the saved config of the run in --out-dir, if it has started
        if given.get("out_dir") is not None and RunDir(given["out_dir"]).config.is_file():
            base = load_run_config(given["out_dir"])
    elif given.get("resume") is not None:
        base = load_run_config(given["resume"])
        base["out_dir"] = given["resume"]
    if config_file is not None:
        toml = read_toml(config_file)
        if "force" in toml:
            raise ValueError(f"{config_file}: force cannot be set in a config file, only as --force on a command line")
        base = _overlay(base, toml, f"{config_file}: steps and tokens")
        try:
            make_config(base)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{config_file}: {e}") from None
    base.pop("force", None)  # only the command line can let a run write among other files, never a file
    return make_config(_overlay(base, given, "--steps and --tokens"), model_args=model_args)


def _overlay(base: dict, layer: dict, both: str) -> dict:
    """base with layer's fields on top. steps and tokens both set the length: a layer's steps drops an earlier
    layer's token budget (which would otherwise win silently), and one layer giving both is refused, naming them."""
    if "steps" in layer and layer.get("tokens") is not None:
        raise ValueError(f"{both} both set the run's length: give one")
    return {**base, **({"tokens": None} if "steps" in layer else {}), **layer}
