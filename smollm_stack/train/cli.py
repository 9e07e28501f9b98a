"""The command line of ``smollm train``: flags over an optional TOML file over ``--resume``'s saved config over the
defaults, made into a TrainConfig (config.py)."""

import argparse
import dataclasses
import tomllib
import typing
from pathlib import Path

from smollm_stack.model import ModelConfig
from smollm_stack.model.config import RENAMED_FIELDS
from smollm_stack.train.config import (
    FLAT,
    MODEL_FIELDS_SET_BY_TRAINER,
    TrainConfig,
    complete_saved,
    flatten,
    make_config,
)
from smollm_stack.train.config import scalar_type, sections
from smollm_stack.train.store.rundir import RunDir, read_json


def _add_field(parser, name: str, annotation, help: str, dest: str, old_names: tuple[str, ...] = ()):
    kind, choices = scalar_type(annotation)
    flags = ["--" + n.replace("_", "-") for n in (name, *old_names)]
    if choices:
        help = f"{help} ({', '.join(map(str, choices))})"
    if old_names:
        help = f"{help}; also {', '.join(flags[1:])}, its old name"
    if kind is bool:
        parser.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, help=help)
    else:
        parser.add_argument(*flags, dest=dest, type=kind, choices=choices, help=help, metavar=name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smollm train",
        description="Train a language model. With no arguments: the embedded TinyStories run (tiny preset).",
        argument_default=argparse.SUPPRESS,  # only flags actually given reach the namespace (they override)
    )
    parser.add_argument(
        "--config",
        dest="config_file",
        help="TOML file of TrainConfig fields, in [sections] or flat ([model.args] or [model_args] table)",
    )
    for name, (section, key) in FLAT.items():
        cls = sections()[section]
        if name != "model_args":
            help = next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == key)
            _add_field(parser, name, typing.get_type_hints(cls)[key], help, dest=name)
    group = parser.add_argument_group("model overrides (ModelConfig fields, on top of the --model preset)")
    model_hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in MODEL_FIELDS_SET_BY_TRAINER:
            old = tuple(o for o, new in RENAMED_FIELDS.items() if new == f.name)  # --kernels: --backend's old name
            _add_field(
                group, f.name, model_hints[f.name], f"ModelConfig.{f.name}", dest="model." + f.name, old_names=old
            )
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


def load_run_config(run_dir: str) -> dict:
    """The TrainConfig fields saved in a run directory (what --resume starts from)."""
    run = RunDir(run_dir)
    if run.path.exists() and not run.path.is_dir():
        raise ValueError(f"--resume {run_dir}: that is a file; --resume takes a run directory (or auto)")
    saved = read_json(run.config)
    if saved is None:
        raise FileNotFoundError(f"cannot resume: {run.config} not found (is {run_dir!r} a run directory?)")
    return complete_saved(saved)


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
        toml = flatten(read_toml(config_file), config_file)
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
