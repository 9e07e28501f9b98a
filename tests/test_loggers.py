"""--logger: each dashboard gets every scalar of every metrics.jsonl row at its step (TensorBoard read back with its
own event reader; trackio through a stand-in module), and a missing backend package is one error line up front."""

import importlib.machinery
import importlib.util
import sys
import types

import pytest
from conftest import TINY

from smollm_stack.train import run
from smollm_stack.train.__main__ import main
from smollm_stack.train.config import TrainConfig
from smollm_stack.train.log import RunLogger, read_metrics
from smollm_stack.train.loggers import parse_loggers, scalars
from smollm_stack.train.store.rundir import RunDir

ROWS = [
    {"step": 0, "tokens": 0, "time_s": 0.0, "val_loss": 4.5, "val_ppl": 90.0, "val_bpb": None},
    {"step": 2, "tokens": 128, "train_loss": 4.25, "lr": 0.01, "grad_norm": 1.5, "mfu": None, "hellaswag_acc": 0.25},
]


@pytest.fixture
def fake_trackio(monkeypatch):
    """A stand-in trackio (its init / log / finish), importable and found by find_spec."""
    calls = []
    module = types.ModuleType("trackio")
    module.__spec__ = importlib.machinery.ModuleSpec("trackio", None)
    module.init = lambda **kwargs: calls.append(("init", kwargs))
    module.log = lambda values, step: calls.append(("log", values, step))
    module.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", module)
    return calls


def test_scalars_are_the_numbers_of_a_row():
    assert scalars(ROWS[1]) == {"tokens": 128, "train_loss": 4.25, "lr": 0.01, "grad_norm": 1.5, "hellaswag_acc": 0.25}


def test_the_trainer_sends_each_row_to_the_dashboards(tokens, tmp_path, fake_trackio):
    config = dict(TINY, steps=4, eval_interval=2, log_interval=1, train_data=tokens[0], val_data=tokens[1])
    run(TrainConfig(**config, out_dir=str(tmp_path / "r"), logger="jsonl,trackio", logger_project="p"))
    rows = read_metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert fake_trackio[0] == ("init", {"project": "p", "name": "r", "config": fake_trackio[0][1]["config"],
                                        "resume": "allow"})  # fmt: skip
    assert fake_trackio[1:] == [("log", scalars(r), r["step"]) for r in rows] + [("finish",)]


def test_tensorboard_events_hold_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = RunDir(tmp_path)
    logger = RunLogger(run_dir, {}, dashboards=["tensorboard"])
    for row in ROWS:
        logger.log(row)
    logger.close()
    events = EventAccumulator(str(run_dir.tensorboard))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted({k for r in ROWS for k in scalars(r)})
    for key in ("train_loss", "val_loss", "tokens"):
        want = [(r["step"], r[key]) for r in ROWS if key in r]
        assert [(e.step, e.value) for e in events.Scalars(key)] == want  # float32 holds these exactly


def test_unknown_or_missing_backends_are_one_error_line(monkeypatch, capsys):
    assert parse_loggers("jsonl") == [] and parse_loggers("jsonl,jsonl") == []
    with pytest.raises(ValueError, match="unknown 'neptune'; choose among jsonl, tensorboard, trackio, wandb"):
        parse_loggers("jsonl,neptune")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for flags in (["--logger", "wandb"], ["--wandb-project", "x"]):
        assert main([*flags, "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err == "error: --logger wandb needs the wandb package: pip install 'smollm-stack[wandb]'\n"


def test_trackio_local_store_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "store"))  # read when trackio is first imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    rows = [{**r, "val_ppl": 90.0} for r in ROWS]  # (the printed row shows a perplexity beside a val loss)
    logger = RunLogger(RunDir(tmp_path), {}, dashboards=["trackio"], project=f"test-{tmp_path.name}")
    for row in rows:
        logger.log(row)
    logger.close()
    logged = SQLiteStorage.get_logs(f"test-{tmp_path.name}", tmp_path.name)
    assert [{k: v for k, v in r.items() if k != "timestamp"} for r in logged] == [
        {**scalars(r), "step": r["step"]} for r in rows
    ]
