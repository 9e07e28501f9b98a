"""TrainConfig in sections keeps every name of the flat config it replaced: each old flag, a flat TOML file, and a run
saved flat (config.json, a checkpoint's train_config) load as before, for at least one release."""

import json

import pytest

from smollm_stack.train.cli import build_parser, load_run_config, parse_args
from smollm_stack.train.config import FLAT, TrainConfig, make_config
from smollm_stack.train.store.rundir import RunDir

# Every field of the flat TrainConfig (the last release before sections) with a value other than its default.
OLD_FIELDS = {
    "train_data": "a.txt", "val_data": "b.txt", "text_field": "content", "tokenizer": "tok", "vocab_size": 512,
    "model": "tinystories-17m", "context_length": 64, "batch_size": 3, "grad_accum": 2, "steps": 7,
    "tokens": None, "max_lr": 3e-3, "min_lr": 3e-5, "warmup_steps": 2, "cosine_steps": 5, "beta1": 0.8,
    "beta2": 0.9, "eps": 1e-6, "weight_decay": 0.05, "grad_clip": 0.5, "schedule": "cosine", "decay_fraction": 0.3,
    "decay_shape": "linear", "optimizer": "ours", "muon_momentum": 0.9, "windows": "aligned", "doc_mask": True,
    "eval_interval": 3, "eval_batches": 2, "eval_subset_batches": 1, "log_interval": 2, "eval_tasks": "hellaswag",
    "eval_task_docs": 5, "ckpt_interval": 4, "keep_ckpts": 3, "out_dir": "runs/x", "resume": None, "force": True,
    "diverge_loss": 9.5, "sample_prompt": "Hi", "sample_tokens": 3, "parallel": "fsdp",
    "activation_checkpointing": True, "seed": 7, "device": "cpu", "dtype": "float32", "compile": True,
    "preflight": False, "threads": 1, "progress": False, "wandb_project": None, "logger": "jsonl",
    "logger_project": "p",
}  # fmt: skip
OLD_MODEL_ARGS = {"d_model": 64, "norm": "post"}


def flags(fields: dict) -> list[str]:
    """The command line that sets ``fields`` by their flat flags."""
    argv = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def test_the_old_fields_are_every_flat_name():
    assert set(OLD_FIELDS) | {"model_args"} == set(FLAT)


def test_every_old_flag_sets_its_field():
    cfg = parse_args(flags(OLD_FIELDS) + ["--d-model", "64", "--norm", "post"])
    assert cfg.flat() == {**OLD_FIELDS, "model_args": OLD_MODEL_ARGS}
    assert cfg.schedule.kind == "cosine" and cfg.optimizer.name == "ours" and cfg.model.preset == "tinystories-17m"
    assert cfg.checkpoint.interval == 4 and cfg.eval.interval == 3 and cfg.parallel.kind == "fsdp"
    documented = {a.dest for a in build_parser()._actions}
    assert set(FLAT) - {"model_args"} <= documented  # every flat name is a flag


def test_a_flat_toml_and_a_sectioned_one_are_the_same_config(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('steps = 9\nmax_lr = 2e-3\nschedule = "cosine"\nmodel = "tiny"\n[model_args]\nd_model = 64\n')
    sectioned = tmp_path / "sections.toml"
    sectioned.write_text(
        '[training]\nsteps = 9\n[schedule]\nmax_lr = 2e-3\nkind = "cosine"\n[model]\npreset = "tiny"\n'
        "[model.args]\nd_model = 64\n"
    )
    a, b = parse_args(["--config", str(flat)]), parse_args(["--config", str(sectioned)])
    assert a == b and a.training.steps == 9 and a.model.args == {"d_model": 64}
    (tmp_path / "bad.toml").write_text("[schedule]\nlr = 1e-3\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown fields schedule.lr"):
        parse_args(["--config", str(tmp_path / "bad.toml")])


def test_a_run_saved_flat_resumes_with_its_fields(tmp_path):
    run = RunDir(tmp_path / "old")
    run.path.mkdir()
    saved = {**OLD_FIELDS, "model_args": OLD_MODEL_ARGS, "force": False}
    run.config.write_text(json.dumps(saved))  # config.json as the flat trainer wrote it
    cfg = make_config(load_run_config(str(run.path)))
    assert cfg.flat() == saved
    assert parse_args(["--resume", str(run.path), "--steps", "20"]).training.steps == 20


def test_the_saved_config_is_in_sections_and_round_trips():
    cfg = make_config({**OLD_FIELDS, "force": False}, model_args=OLD_MODEL_ARGS)
    saved = cfg.to_dict()
    assert set(saved) == {"model", "data", "training", "optimizer", "schedule", "eval", "checkpoint", "parallel",
                          "system", "logging"}  # fmt: skip
    assert saved["schedule"]["kind"] == "cosine" and saved["model"]["args"] == OLD_MODEL_ARGS
    assert make_config(json.loads(json.dumps(saved))) == cfg
    assert TrainConfig(**saved) == cfg == TrainConfig(**cfg.flat())


def test_the_old_name_of_the_backend_still_loads(tmp_path):
    """ModelConfig.kernels is ModelConfig.backend now: the flag, a saved run's model_args and a checkpoint's model
    config under the old name all load."""
    assert parse_args(["--kernels", "eager"]).model.args == {"backend": "eager"}
    assert make_config(model_args={"kernels": "eager"}).model.args == {"backend": "eager"}
    run = RunDir(tmp_path / "old")
    run.path.mkdir()
    run.config.write_text(json.dumps({**OLD_FIELDS, "model_args": {"kernels": "eager"}}))
    assert make_config(load_run_config(str(run.path))).model.args == {"backend": "eager"}
    with pytest.raises(ValueError, match="kernels is backend's old name"):
        make_config(model_args={"kernels": "eager", "backend": "triton"})
