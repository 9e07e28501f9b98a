"""Fault injection on the real command lines: kills, damaged files, full disks, races and bad input (issue 12).

Each test names the hole of issue 12 it guards (#1 ... #14). Runs are tiny (d_model 32, 2 layers, a 16-token
context, a handful of steps), mostly in-process through each CLI's ``main(argv)``; subprocesses only where a real
process must die or race.
"""

import errno
import fcntl
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from smollm_stack import model as model_pkg
from conftest import TINY, as_flags
from smollm_stack.files import TMP_MARK, atomic_file, open_append, write_atomic
from smollm_stack.tokenizer import Tokenizer
from smollm_stack.tokenizer.__main__ import main as tokenizer_main
from smollm_stack.train.__main__ import main as train_main
from smollm_stack.train.store.consolidate import main as consolidate_main
from smollm_stack.train.cs336 import run_load_checkpoint
from smollm_stack.train.lm import main as lm_main
from smollm_stack.train.experiments.__main__ import main as experiments_main
from smollm_stack.train.log import RunLogger, read_metrics
from smollm_stack.train.loop import Interrupted, StopRequest
from smollm_stack.train.data.prepare import main as prepare_main

FLAGS = as_flags(  # conftest's tiny run as command-line flags; a cosine run extends with its schedule unchanged
    {**TINY, "eval_interval": 5, "log_interval": 5, "ckpt_interval": 5, "keep_ckpts": 4}
    | {"schedule": "cosine", "cosine_steps": 40}
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def data_flags(tokens) -> list[str]:
    return ["--train-data", tokens[0], "--val-data", tokens[1]]


def train(tokens, out_dir, *flags) -> int:
    return train_main([*FLAGS, *data_flags(tokens), "--out-dir", str(out_dir), *flags])


def train_cli(tokens, out_dir, *flags) -> list[str]:
    return [sys.executable, "-m", "smollm_stack.train", *FLAGS, *data_flags(tokens), "--out-dir", str(out_dir), *flags]


def one_error(capsys, *needles) -> str:
    """The single ``error:`` line printed, checked to contain each needle and to come with no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def losses(run_dir) -> list[tuple]:
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(run_dir)]


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, "the process ended (or hung) before the fault point"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def finished(tokens, tmp_path_factory) -> Path:
    """A finished 20-step run: checkpoints at 5, 10, 15, 20 (cosine over 40 steps, so a longer run continues it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train(tokens, run_dir, "--steps", "20") == 0
    return run_dir


@pytest.fixture
def copy_of(finished, tmp_path):
    def copy(drop=()) -> Path:
        out = tmp_path / "copy"
        shutil.copytree(finished, out)
        for name in drop:
            (out / name).unlink()
        return out

    return copy


@pytest.fixture(scope="module")
def byte_tokenizers(tmp_path_factory) -> tuple[str, str]:
    """Two tokenizers of the same size (256 bytes + one special) that differ: A's special is <|a|>, B's <|b|>."""
    root = tmp_path_factory.mktemp("toks")
    for name in ("a", "b"):
        Tokenizer({i: bytes([i]) for i in range(256)}, [], [f"<|{name}|>"]).save(root / name)
    return str(root / "a"), str(root / "b")


# ---- data loss --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [".", ".."])
def test_1_variant_names_cannot_reach_outside_the_suite(tokens, tmp_path, variant, capsys):
    keep = tmp_path / "suites" / "other" / "results.json"
    keep.parent.mkdir(parents=True)
    keep.write_text("another suite's results")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "s", "variants": [{"name": variant}]}))
    argv = ["run", str(spec), "--out", str(tmp_path / "suites" / "s"), *FLAGS, *data_flags(tokens), "--steps", "2"]
    assert experiments_main(argv) == 2
    one_error(capsys, "variant name")
    assert keep.read_text() == "another suite's results"


def test_1_suite_name_cannot_climb_out_of_runs(tokens, tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "../../x", "variants": [{"name": "a"}]}))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert experiments_main(["run", str(spec), *FLAGS, *data_flags(tokens), "--steps", "2", "--no-report"]) == 2
    one_error(capsys, "suite name")
    assert not (tmp_path / "cwd" / "x").exists()


def test_2_webtext_never_deletes_an_unrelated_out_dir(tokens, tmp_path, capsys):
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "notes.txt").write_text("mine")
    assert experiments_main(["webtext", "--smoke", "--out-dir", str(mydata), *data_flags(tokens)]) == 2
    one_error(capsys, str(mydata), "not a run's")
    assert (mydata / "notes.txt").read_text() == "mine" and sorted(os.listdir(mydata)) == ["notes.txt"]


def test_3_runs_started_in_the_same_second_get_their_own_directories(tokens, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = datetime.now()
    others = [tmp_path / "runs" / f"tiny-{now + timedelta(seconds=s):%Y%m%d-%H%M%S}" for s in range(4)]
    for other in others:  # runs that started this second (and the next few: the clock may tick meanwhile)
        other.mkdir(parents=True)
        (other / "config.json").write_text('{"seed": 0}')
    assert train_main([*FLAGS, *data_flags(tokens), "--steps", "2"]) == 0
    for other in others:
        assert sorted(p.name for p in other.iterdir()) == ["config.json"]
    mine = [p for p in (tmp_path / "runs").iterdir() if p not in others]
    assert len(mine) == 1 and mine[0].name.rsplit("-", 1)[-1] == "2" and (mine[0] / "summary.json").is_file()


def test_3_two_processes_racing_for_one_run_dir(tokens, tmp_path):
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen(train_cli(tokens, run_dir, "--steps", "10", "--seed", str(seed)), env=ENV, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        for seed in (1, 2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = [seed for seed, (code, _) in zip((1, 2), results) if code == 0][0]
    loser_err = next(err for code, err in results if code == 2)
    assert "in use by another run" in loser_err or "already holds a run" in loser_err
    assert json.loads((run_dir / "config.json").read_text())["training"]["seed"] == winner
    checkpoint = torch.load(run_dir / "ckpt_000010.pt", weights_only=True)
    assert checkpoint["train_config"]["training"]["seed"] == winner
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 5, 10]  # one run's rows, not two interleaved


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("Once upon a time there was a tiny model.\n" * 2000)
    return path


def test_4_encode_refuses_to_write_over_its_input(byte_tokenizers, text_file, capsys):
    before = text_file.read_bytes()
    for extra in ([], ["--force"]):
        assert tokenizer_main(["encode", str(text_file), "--tokenizer", byte_tokenizers[0], "--out", str(text_file),
                               "--workers", "1", *extra]) == 2  # fmt: skip
        one_error(capsys, str(text_file))
        assert text_file.read_bytes() == before


def test_5_6_failed_encode_leaves_the_previous_output_alone(byte_tokenizers, text_file, tmp_path, capsys):
    good = tmp_path / "good.npy"
    np.save(good, np.arange(10, dtype=np.uint16))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine so far \xff not UTF-8")
    argv = ["encode", str(bad), "--tokenizer", byte_tokenizers[0], "--out", str(good), "--workers", "1"]
    assert tokenizer_main(argv) == 2  # #6: an existing output needs --force
    one_error(capsys, "already exists", "--force")
    assert tokenizer_main([*argv, "--force"]) == 2  # #5: the encode fails; the good file must survive it
    one_error(capsys, "UTF-8")
    assert np.load(good).tolist() == list(range(10)) and sorted(os.listdir(tmp_path)) == ["bad.txt", "good.npy"]
    argv = ["encode", str(text_file), "--tokenizer", byte_tokenizers[0], "--out", str(good), "--workers", "1"]
    assert tokenizer_main([*argv, "--force"]) == 0
    assert len(np.load(good)) == text_file.stat().st_size  # one id per byte with this tokenizer


def test_5_sigkill_during_encode_leaves_no_output(byte_tokenizers, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("a tiny corpus line, repeated until it fills a few chunks.\n" * 300_000)  # 17 MB: 5 chunks
    out = tmp_path / "out" / "big.npy"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "smollm_stack.tokenizer", "encode", str(big), "--tokenizer", byte_tokenizers[0],
           "--out", str(out), "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(p.stat().st_size > 1 << 20 for p in out.parent.iterdir()), proc)  # mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only a temporary file, never a short or empty big.npy that np.load would accept
    assert [p.name.startswith("big.npy.tmp-") for p in out.parent.iterdir()] == [True]
    small = tmp_path / "small.txt"
    small.write_text("the next encode to the same name removes the killed one's temporary file\n")
    assert tokenizer_main(["encode", str(small), *cmd[5:]]) == 0  # issue 28 [exit]
    assert [p.name for p in out.parent.iterdir()] == ["big.npy"]


def test_6_tokenizer_train_does_not_overwrite_a_tokenizer(byte_tokenizers, text_file, capsys):
    vocab = (Path(byte_tokenizers[0]) / "vocab.json").read_bytes()
    argv = ["train", str(text_file), "--vocab-size", "260", "--out", byte_tokenizers[0], "--workers", "1"]
    assert tokenizer_main(argv) == 2
    one_error(capsys, "vocab.json", "--force")
    assert (Path(byte_tokenizers[0]) / "vocab.json").read_bytes() == vocab


def test_6_train_out_dir_over_other_files_needs_force(tokens, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    (folder / "sample.txt").write_text("my story\n")
    assert train(tokens, folder, "--steps", "2") == 2
    one_error(capsys, str(folder), "--force")
    assert (folder / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    assert (folder / "sample.txt").read_text() == "my story\n"
    assert sorted(os.listdir(folder)) == ["metrics.jsonl", "sample.txt"]
    assert train(tokens, folder, "--steps", "2", "--force") == 2  # issue 28: --force never writes over them either
    one_error(capsys, "metrics.jsonl, sample.txt", "never over them")
    assert (folder / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    (folder / "metrics.jsonl").rename(folder / "my_metrics.jsonl")
    (folder / "sample.txt").rename(folder / "my_story.txt")
    assert train(tokens, folder, "--steps", "2", "--force") == 0  # among other names: written, theirs untouched
    assert (folder / "my_metrics.jsonl").read_text() == '{"mine": 1}\n'
    assert (folder / "my_story.txt").read_text() == "my story\n"


# ---- silent wrong results ---------------------------------------------------------------------------------------


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


class _Payload:
    def __reduce__(self):
        return os.system, (f"touch {Path(os.environ.get('PYTEST_PAYLOAD', '/nonexistent'))}",)


@pytest.mark.parametrize("damage", ["flipped", "truncated", "empty", "malicious"])
def test_7_14_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(finished, copy_of, damage, tmp_path,
                                                                            monkeypatch, capsys):  # fmt: skip
    run_dir = copy_of()
    newest = run_dir / "ckpt_000020.pt"
    if damage == "flipped":
        _flip(newest)
    elif damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "empty":
        newest.write_bytes(b"")
    else:  # a pickle that runs a command when unpickled, in place of the checkpoint and its checksum
        payload = tmp_path / "pwned"
        monkeypatch.setenv("PYTEST_PAYLOAD", str(payload))
        newest.write_bytes(pickle.dumps({"model": _Payload(), "optimizer": {}, "iteration": 20}))
        (run_dir / "ckpt_000020.pt.sha256").unlink()
    assert train_main(["--resume", str(run_dir), "--steps", "25"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "ckpt_000020.pt" in err and "resuming from ckpt_000015.pt" in err, err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert (run_dir / "ckpt_000020.pt.corrupt").is_file()  # set aside, not deleted
    if damage == "malicious":
        assert not payload.exists()
    redone = {r["step"]: r for r in read_metrics(run_dir)}
    original = {r["step"]: r for r in read_metrics(finished)}
    assert redone[20]["train_loss"] == original[20]["train_loss"]  # steps 16..20 redone from intact weights, exactly
    assert redone[20]["val_loss"] == original[20]["val_loss"] and 25 in redone


def test_7_no_intact_checkpoint_is_one_error_naming_each(copy_of, capsys):
    run_dir = copy_of(drop=["summary.json"])
    for path in run_dir.glob("ckpt_*.pt"):
        _flip(path)
    assert train_main(["--resume", str(run_dir)]) == 2
    one_error(capsys, "no intact checkpoint", "ckpt_000005.pt", "ckpt_000020.pt")


@pytest.mark.parametrize("flag", ["--grad-clip", "--weight-decay"])
def test_8_negative_clip_and_decay_are_refused(tokens, tmp_path, flag, capsys):
    assert train(tokens, tmp_path / "r", "--steps", "1", flag, "-1") == 2
    one_error(capsys, flag.removeprefix("--").replace("-", "_"), ">= 0")


def test_9_resume_with_another_tokenizer_is_refused(tokens, byte_tokenizers, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert train(tokens, run_dir, "--steps", "5", "--vocab-size", "300", "--tokenizer", byte_tokenizers[0]) == 0
    assert train_main(["--resume", str(run_dir), "--steps", "10", "--tokenizer", byte_tokenizers[1]]) == 2
    one_error(capsys, byte_tokenizers[1], "differs from the one this run trained with")
    assert train_main(["--resume", str(run_dir), "--steps", "10"]) == 0  # its own tokenizer: fine


def test_10_prepare_into_an_existing_dir_needs_force_and_then_replaces_the_tokenizer(text_file, tmp_path, capsys):
    out = tmp_path / "prepared"
    argv = ["--train", str(text_file), "--val", str(text_file), "--out", str(out)]
    assert prepare_main([*argv, "--vocab-size", "260"]) == 0
    assert prepare_main([*argv, "--vocab-size", "270"]) == 2
    one_error(capsys, str(out / "tokenizer"), "--force")
    assert prepare_main([*argv, "--vocab-size", "270", "--force"]) == 0
    assert Tokenizer.load(out / "tokenizer").vocab_size == 270
    assert np.load(out / "train.npy").max() >= 260  # encoded with the new tokenizer's merges


def test_10_a_prepare_stopped_after_its_tokenizer_resumes_with_the_same_command(text_file, tmp_path, capsys):
    from smollm_stack.train.data import prepare

    out = tmp_path / "prepared"
    argv = ["--train", str(text_file), "--val", str(text_file), "--out", str(out), "--vocab-size", "260"]
    with pytest.MonkeyPatch.context() as m:  # killed after the tokenizer is saved, before any split is written
        m.setattr(prepare, "encode_text", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            prepare_main(argv)
    assert (out / "tokenizer").is_dir() and (out / prepare.REQUEST).is_file()
    assert prepare_main([*argv[:-1], "270"]) == 2  # another request: the outputs are not its own to resume
    one_error(capsys, str(out / "tokenizer"), "--force")
    assert prepare_main(argv) == 0 and "training a 260-token" not in capsys.readouterr().out  # the same: resumes
    assert (out / "train.npy").is_file() and not (out / prepare.REQUEST).exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / prepare.REQUEST).write_text("my notes")
    assert prepare_main([*argv[:4], "--out", str(tmp_path / "other")]) == 2
    one_error(capsys, "prepare.json", "not a request")
    assert (tmp_path / "other" / prepare.REQUEST).read_text() == "my notes"


def test_11_negative_token_ids_are_refused_before_training(tokens, tmp_path, capsys):
    ids = np.load(tokens[0]).astype(np.int64)
    ids[-1] = -1
    np.save(tmp_path / "neg.npy", ids)
    argv = [*FLAGS, "--train-data", str(tmp_path / "neg.npy"), "--val-data", tokens[1]]
    argv += ["--out-dir", str(tmp_path / "r")]
    assert train_main([*argv, "--steps", "2"]) == 2
    one_error(capsys, "neg.npy", "negative token id")


def test_12_a_bad_sample_prompt_fails_before_the_first_step(tokens, byte_tokenizers, tmp_path, capsys):
    run_dir = tmp_path / "r"
    flags = ["--vocab-size", "300", "--tokenizer", byte_tokenizers[0], "--sample-tokens", "5"]
    assert train(tokens, run_dir, *flags, "--steps", "10", "--sample-prompt", "x" * 40) == 2
    one_error(capsys, "--sample-prompt", "40 tokens")
    assert not run_dir.exists()  # nothing trained, nothing left: the same command, fixed, just works
    assert train(tokens, run_dir, *flags, "--steps", "5", "--sample-prompt", "Once") == 0
    assert (run_dir / "sample.txt").read_text().startswith("Once")


# ---- dead ends and tracebacks -----------------------------------------------------------------------------------


def test_13_a_run_that_died_before_its_first_checkpoint_starts_over(tokens, tmp_path, monkeypatch, capsys):
    forward = model_pkg.TransformerLM.forward

    def killed_at_the_first_training_step(self, *args, **kwargs):
        if self.training:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model_pkg.TransformerLM, "forward", killed_at_the_first_training_step)
    run_dir = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(tokens, run_dir, "--steps", "10")
    monkeypatch.undo()
    assert (run_dir / "config.json").is_file() and not list(run_dir.glob("ckpt_*"))
    assert train(tokens, run_dir, "--steps", "10") == 0  # issue 28: the same command starts it over
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 5, 10]


def test_13_sigkill_during_a_checkpoint_write_then_resume_cleans_up(tokens, tmp_path):
    run_dir = tmp_path / "r"
    stall_at_ten = (
        "import sys, time, torch\n"
        "save = torch.save\n"
        "def stalled(obj, f):\n"
        "    if obj['iteration'] == 10:\n"
        "        f.write(b'half a checkpoint' * 1000); f.flush(); time.sleep(600)\n"
        "    save(obj, f)\n"
        "torch.save = stalled\n"
        "from smollm_stack.train.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", stall_at_ten, *train_cli(tokens, run_dir, "--steps", "15")[3:]]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(p.stat().st_size > 1000 for p in run_dir.glob("ckpt_000010.pt.tmp-*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in run_dir.glob("ckpt_*.pt")] == ["ckpt_000005.pt"]
    assert train_main(["--resume", "auto", "--out-dir", str(run_dir)]) == 0  # the same command line, as torchrun would
    assert not list(run_dir.glob("*.tmp-*"))
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 5, 10, 15]


def test_13_resuming_a_finished_run_leaves_its_summary_alone(copy_of, capsys):
    run_dir = copy_of()
    before = (run_dir / "summary.json").read_bytes()
    assert train_main(["--resume", str(run_dir)]) == 0
    assert (run_dir / "summary.json").read_bytes() == before
    assert "nothing to do" in capsys.readouterr().out


def test_13_a_torn_last_metrics_line_does_not_block_resume(copy_of, finished, capsys):
    run_dir = copy_of(drop=["summary.json", "ckpt_000020.pt"])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "train_lo')  # killed mid-write
    assert train_main(["--resume", str(run_dir), "--backend", "eager"]) == 0  # a runtime choice: no mismatch
    assert losses(run_dir) == losses(finished)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], "{torn", *lines[1:]]) + "\n")
    (run_dir / "summary.json").unlink()
    assert train_main(["--resume", str(run_dir), "--steps", "25"]) == 2  # damage mid-file: say where
    one_error(capsys, "metrics.jsonl, line 2")


def test_13_a_model_mismatch_on_resume_names_the_field(copy_of, capsys):
    run_dir = copy_of(drop=["summary.json"])
    assert train_main(["--resume", str(run_dir), "--steps", "25", "--num-layers", "3"]) == 2
    one_error(capsys, "num_layers (2 in the checkpoint, 3 now)")


@pytest.mark.parametrize(
    "exception",
    [
        RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: "
                     "file write failed"),  # fmt: skip
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_14_a_full_disk_during_a_checkpoint_is_one_error_line(tokens, tmp_path, monkeypatch, exception, capsys):
    save = torch.save

    def disk_full_at_ten(obj, f):
        if obj["iteration"] == 10:
            f.write(b"part of a checkpoint")
            raise exception
        save(obj, f)

    monkeypatch.setattr(torch, "save", disk_full_at_ten)
    run_dir = tmp_path / "r"
    assert train(tokens, run_dir, "--steps", "15") == 2
    one_error(capsys, "cannot write checkpoint", "ckpt_000010.pt", "MiB free", "the previous checkpoint is intact")
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == ["ckpt_000005.pt", "ckpt_000005.pt.sha256"]


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--device", "mps"], ["--device mps needs Apple silicon"]),  # where torch has no MPS (tests/test_platforms.py)
        (["--device", "meta"], ["device", "'meta'"]),
        (["--backend", "triton"], ["--backend triton", "TRITON_INTERPRET=1"]),
        (["--resume", "auto"], ["--resume auto needs --out-dir"]),
    ],
)
def test_14_unusable_device_kernels_or_resume_are_one_error_line(tokens, tmp_path, monkeypatch, flags, needles,
                                                                 capsys):  # fmt: skip
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = [*FLAGS, *data_flags(tokens), "--steps", "2", *flags]
    if "--resume" not in flags:
        argv += ["--out-dir", str(tmp_path / "r")]
    assert train_main(argv) == 2
    one_error(capsys, *needles)
    assert not (tmp_path / "r").exists()


def test_14_out_dir_or_resume_naming_a_file(tokens, tmp_path, capsys):
    a_file = tmp_path / "file.pt"
    a_file.write_bytes(b"not a directory")
    assert train(tokens, a_file, "--steps", "2") == 2
    one_error(capsys, str(a_file), "is a file")
    assert train_main(["--resume", str(a_file)]) == 2
    one_error(capsys, str(a_file), "run directory")
    assert a_file.read_bytes() == b"not a directory"


@pytest.mark.parametrize(
    "where, content, needles",
    [
        ("c.toml", b"steps = = 3\n", ["c.toml", "not valid TOML"]),
        ("c.toml", b'steps = 3\nsample_prompt = "\xff"\n', ["c.toml", "UTF-8"]),
        ("c.toml", b'max_lr = "0.01"\n', ["c.toml", "max_lr must be a float", "'0.01'"]),
        ("c.toml", b"steps = 3\ntokens = 640\n", ["c.toml", "steps and tokens both set the run's length"]),
        ("config.json", b'{"steps": 3,', ["config.json", "not valid JSON"]),
        ("config.json", b'{"steps": "\xff"}', ["config.json", "UTF-8"]),
    ],
)
def test_14_bad_config_files_are_named(tokens, tmp_path, where, content, needles, capsys):
    run_dir = tmp_path / "r"
    if where == "c.toml":
        (tmp_path / where).write_bytes(content)
        argv = [*FLAGS, *data_flags(tokens), "--config", str(tmp_path / where), "--out-dir", str(run_dir)]
    else:
        run_dir.mkdir()
        (run_dir / where).write_bytes(content)
        argv = ["--resume", str(run_dir)]
    assert train_main(argv) == 2
    one_error(capsys, *needles)


def test_3_13_sigkill_at_random_points_then_auto_resume_reproduces_the_uninterrupted_run(tokens, tmp_path, capsys):
    """torchrun --max-restarts in miniature: the same command, killed at random moments, run until it finishes.

    While the first one runs, a --resume of its directory is refused (#3); after each SIGKILL the next one takes the
    lock the dead one held (#13), and cleans up what it left half-written.
    """
    steps = ["--steps", "40", "--keep-ckpts", "2"]
    assert train(tokens, tmp_path / "ref", *steps) == 0
    run_dir = tmp_path / "killed"
    cmd = train_cli(tokens, run_dir, *steps, "--resume", "auto")
    rng = random.Random(12)
    metrics = run_dir / "metrics.jsonl"
    for round in range(3):
        launched = time.time()
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda t=launched: metrics.exists() and metrics.stat().st_mtime >= t, proc)  # it is training
        if round == 0:
            assert train_main(["--resume", str(run_dir)]) == 2
            one_error(capsys, "in use by another run", f"pid {proc.pid}")
        time.sleep(rng.uniform(0.0, 0.8))  # a step, an eval or a checkpoint write: wherever it falls
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert train_main(cmd[3:]) == 0
    assert losses(run_dir) == losses(tmp_path / "ref")  # bitwise: floats compared with ==
    assert not list(run_dir.glob("*.tmp-*"))
    assert sorted(p.name for p in run_dir.glob("ckpt_*.pt")) == ["ckpt_000035.pt", "ckpt_000040.pt"]


# ---- issue 28: untrusted run directories ------------------------------------------------------------------------
# Each test names the class of issue 28 it guards: [exec] code execution, [link] writes through links, [force] what
# --force may touch, [excl] exclusive outputs, [exit] clean exits and checks before the run directory is claimed.


@pytest.fixture(scope="module")
def sharded(tokens, tmp_path_factory) -> Path:
    """A 5-step run with sharded checkpoints (--parallel fsdp in one process: DCP's format, no torchrun)."""
    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    assert train(tokens, run_dir, "--steps", "5", "--parallel", "fsdp") == 0
    return run_dir


def _reseal(step_dir: Path):
    """Rewrite the manifest to match the files, as whoever planted a payload can: it proves integrity, not origin."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((step_dir / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _plant_in_shards(step_dir: Path):
    """Rewrite the shards with a payload as one non-tensor entry (an optimizer hyperparameter), DCP's own way."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from smollm_stack.model import ModelConfig, TransformerLM
    from smollm_stack.train.config import make_config
    from smollm_stack.train.store.sharded import read_meta, torch_optimizers
    from smollm_stack.train.optim.builder import build_optimizer

    meta = read_meta(step_dir)
    model = TransformerLM(ModelConfig(**meta["model_config"]))
    saved = make_config(meta["train_config"])
    optimizer = build_optimizer(saved.optimizer, model, torch.device("cpu"), saved.schedule.max_lr)
    model_state, optimizer_state = get_state_dict(model, torch_optimizers(optimizer))
    optimizer_state["param_groups"][0]["lr"] = _Payload()
    for shard in step_dir.glob("*.distcp"):
        shard.unlink()
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=step_dir, no_dist=True)


@pytest.mark.parametrize("where", [".metadata", "shards"])
def test_28_exec_a_planted_sharded_checkpoint_runs_nothing(sharded, where, tmp_path, monkeypatch, capsys):
    """[exec] DCP unpickles .metadata and non-tensor entries; ours reads both without running what they name."""
    payload = tmp_path / "pwned"
    monkeypatch.setenv("PYTEST_PAYLOAD", str(payload))
    run_dir = tmp_path / "run"
    shutil.copytree(sharded, run_dir)
    (run_dir / "summary.json").unlink()  # resumable
    step_dir = run_dir / "ckpt_000005.dcp"
    if where == ".metadata":
        (step_dir / ".metadata").write_bytes(pickle.dumps(_Payload()))
    else:
        _plant_in_shards(step_dir)
    _reseal(step_dir)
    assert consolidate_main([str(step_dir), "--out", str(tmp_path / "x.pt")]) == 2
    one_error(capsys, "posix.system" if where == ".metadata" else "objects other than data")
    assert train_main(["--resume", str(run_dir), "--parallel", "fsdp"]) == 2
    one_error(capsys, str(step_dir))
    assert not payload.exists() and not (tmp_path / "x.pt").exists()


def test_28_excl_consolidate_never_overwrites_what_it_did_not_write(sharded, tmp_path, capsys):
    """[excl][force] consolidate's --out is created exclusively; --force replaces only a checkpoint of ours."""
    step_dir, out = str(sharded / "ckpt_000005.dcp"), tmp_path / "mine.pt"
    out.write_text("the user's file")
    for extra in ([], ["--force"]):
        assert consolidate_main([step_dir, "--out", str(out), *extra]) == 2
        one_error(capsys, str(out))
        assert out.read_text() == "the user's file"
    out.unlink()
    assert consolidate_main([step_dir, "--out", str(out)]) == 0
    assert consolidate_main([step_dir, "--out", str(out)]) == 2  # exists now: needs --force
    one_error(capsys, "exists", "--force")
    assert consolidate_main([step_dir, "--out", str(out), "--force"]) == 0  # ours: replaced


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "loss_steps.png", "sample.txt", "checkpoints.json"])
def test_28_link_a_planted_link_is_refused_and_its_target_untouched(copy_of, tmp_path, name, capsys):
    """[link] A link at any name the run writes, in a run that is resumed, is refused before anything is written."""
    run_dir = copy_of(drop=["summary.json"])
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run_dir / name).unlink(missing_ok=True)
    (run_dir / name).symlink_to(victim)
    assert train_main(["--resume", str(run_dir), "--steps", "25", "--sample-tokens", "4"]) == 2
    one_error(capsys, str(run_dir / name), "symbolic link")
    assert victim.read_text() == "precious\n"


def test_28_link_a_lock_link_in_a_new_out_dir_and_a_hard_linked_metrics_file(tokens, tmp_path, capsys):
    """[link] The issue's first reproduction (ln -s VICTIM RUN/.lock), and hard links, which O_NOFOLLOW misses."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    assert train(tokens, run_dir, "--steps", "2") == 2
    one_error(capsys, ".lock", "symbolic link")
    (run_dir / ".lock").unlink()
    assert train(tokens, run_dir, "--steps", "5") == 0
    (run_dir / "metrics.jsonl").unlink()
    os.link(victim, run_dir / "metrics.jsonl")
    assert train_main(["--resume", str(run_dir), "--steps", "10"]) == 0  # rewritten beside the link, not into it
    assert victim.read_text() == "precious\n" and (run_dir / "metrics.jsonl").stat().st_nlink == 1
    os.link(run_dir / "metrics.jsonl", tmp_path / "twin")
    with pytest.raises(ValueError, match="hard link"):  # what appends to it refuses the twin it would write too
        open_append(run_dir / "metrics.jsonl")


def test_28_force_keeps_the_users_checkpoints_and_a_config_file_cannot_force(tokens, tmp_path, capsys):
    """[force] The issue's reproduction: a folder of the user's ckpt_*.pt, and force = true in a TOML config."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in (1, 2, 3):
        (folder / f"ckpt_{i:06d}.pt").write_text(f"user checkpoint {i}")
    assert train(tokens, folder, "--steps", "10", "--force") == 2
    one_error(capsys, "ckpt_000001.pt", "never over them")
    toml = tmp_path / "c.toml"
    toml.write_text("force = true\n")
    assert train(tokens, folder, "--steps", "10", "--config", str(toml)) == 2
    one_error(capsys, "c.toml", "force cannot be set in a config file")
    assert sorted(p.read_text() for p in folder.iterdir()) == [f"user checkpoint {i}" for i in (1, 2, 3)]


def test_28_force_prunes_only_the_runs_own_checkpoints(tokens, tmp_path):
    """[force] A checkpoint that is not in checkpoints.json survives pruning, whatever its name."""
    run_dir = tmp_path / "r"
    assert train(tokens, run_dir, "--steps", "5") == 0
    (run_dir / "ckpt_000001.pt").write_text("dropped in by hand")
    assert train_main(["--resume", str(run_dir), "--steps", "20", "--keep-ckpts", "1"]) == 0
    assert sorted(p.name for p in run_dir.glob("ckpt_*.pt")) == ["ckpt_000001.pt", "ckpt_000020.pt"]
    assert json.loads((run_dir / "checkpoints.json").read_text()) == {"written": ["ckpt_000020.pt"]}


def test_28_excl_two_writers_of_one_name_never_both_succeed_and_stale_temporaries_go(tmp_path):
    """[excl] The publish is a link(2): the loser of a race gets FileExistsError, not a silent replacement (two
    encodes to one --out both reported success before). A killed writer's temporary file (unlocked) is removed by
    the next writer of the name; a live writer's (locked) is kept."""
    out = tmp_path / "ids.npy"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_file(out, exclusive=True) as first:
            first.write(b"first")
            with atomic_file(out, exclusive=True) as second:  # starts later, finishes first
                second.write(b"second")
    assert out.read_bytes() == b"second" and sorted(os.listdir(tmp_path)) == ["ids.npy"]
    stale, live = tmp_path / f"ids.npy{TMP_MARK}dead", tmp_path / f"ids.npy{TMP_MARK}live"
    stale.write_bytes(b"40 MB of a killed encode")
    fd = os.open(live, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        write_atomic(out, b"third")
    finally:
        os.close(fd)
    assert not stale.exists() and live.exists() and out.read_bytes() == b"third"


def test_28_exit_bad_numbers_and_impossible_runs_fail_before_the_run_directory_is_claimed(tokens, tmp_path, capsys):
    """[exit] NaN/inf, values silently replaced today, and checks that used to run after the claim."""
    cases = [
        (["--eps", "inf"], "eps"), (["--max-lr", "nan"], "max_lr"), (["--norm-eps", "inf"], "norm_eps"),
        (["--rope-theta", "nan"], "rope_theta"), (["--context-length", "0"], "context_length"),
        (["--tokens", "-5"], "tokens"), (["--seed", "-1"], "seed"),
        (["--windows", "aligned"], "--windows aligned"), (["--context-length", "5000"], "too few"),
    ]  # fmt: skip
    for flags, needle in cases:
        run_dir = tmp_path / "r"
        assert train(tokens, run_dir, "--steps", "3", *flags) == 2, flags
        one_error(capsys, needle)
        assert not run_dir.exists(), flags


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_28_exit_a_signal_finishes_the_step_saves_and_says_how_to_resume(tokens, tmp_path, sig):
    """[exit] Ctrl-C or SIGTERM mid-run: no traceback, a checkpoint of the step it was on, exit 128 + signum, one
    line saying how to go on; the resumed run continues from that step."""
    run_dir = tmp_path / "r"
    far = ["--steps", "100000", "--ckpt-interval", "100000", "--eval-interval", "100000", "--cosine-steps", "100000"]
    proc = subprocess.Popen(train_cli(tokens, run_dir, *far), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)  # past step 10
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert last.startswith(f"stopped by {sig.name} after step ") and f"--resume {run_dir}" in last, last
    step = int(last.split("after step ")[1].split(",")[0])
    assert step >= 10 and (run_dir / f"ckpt_{step:06d}.pt").is_file() and not (run_dir / "summary.json").exists()
    assert train_main(["--resume", str(run_dir), "--steps", str(step + 3), "--cosine-steps", "100000"]) == 0


def test_28_exit_a_second_signal_stops_at_once():
    """[exit] The first signal inside the loop is noted; a second (or one before the loop) raises at once."""
    stop = StopRequest()
    with pytest.raises(Interrupted, match="stopped by SIGINT"):
        stop(signal.SIGINT, None)  # before the loop: nothing to save yet
    stop.armed = True
    stop(signal.SIGTERM, None)
    assert stop.signum == signal.SIGTERM
    with pytest.raises(Interrupted):
        stop(signal.SIGINT, None)


def test_28_exit_a_run_whose_directory_is_replaced_stops_with_an_error(tokens, tmp_path, monkeypatch, capsys):
    """[exit] The folder deleted and made again mid-run: the run stops with an error instead of writing a run with
    half its files into the new folder and saying "done"."""
    run_dir = tmp_path / "r"
    log = RunLogger.log

    def replace_the_folder(self, row):
        log(self, row)
        if row["step"] == 5:
            shutil.rmtree(run_dir)
            run_dir.mkdir()

    monkeypatch.setattr(RunLogger, "log", replace_the_folder)
    assert train(tokens, run_dir, "--steps", "10", "--eval-interval", "10") == 2
    one_error(capsys, str(run_dir), "deleted or moved")


def test_28_exit_a_foreign_file_named_like_a_checkpoint_is_set_aside(copy_of, capsys):
    """[exit] A text file called ckpt_000099.pt used to end resume in a KeyError from torch.load's unpickler."""
    run_dir = copy_of(drop=["summary.json"])
    (run_dir / "ckpt_000099.pt").write_text("hello\n")
    assert train_main(["--resume", str(run_dir), "--steps", "25"]) == 0
    assert "ckpt_000099.pt is not a readable checkpoint" in capsys.readouterr().err
    assert (run_dir / "ckpt_000099.pt.corrupt").is_file()


def _pickle_payload(path: Path):
    path.write_bytes(pickle.dumps({"model": _Payload(), "optimizer": {}, "iteration": 1}))


@pytest.mark.parametrize("command", ["sample", "export-hf", "cs336", "meta.pt", "train-data"])
def test_28_exec_a_payload_in_any_file_we_read_never_runs(command, sharded, tokens, byte_tokenizers, tmp_path,
                                                           monkeypatch, capsys):  # fmt: skip
    """[exec] A pickle that runs a command, in each kind of file a command loads with pickle's help: checkpoints
    (sample, export-hf, the CS336 loader; the trainer's resume is test_7_14), a sharded checkpoint's meta.pt, token
    .npy files. (JSON files, config.json, metrics.jsonl, manifests and tokenizers, cannot name code at all.)"""
    payload = tmp_path / "pwned"
    monkeypatch.setenv("PYTEST_PAYLOAD", str(payload))
    evil = tmp_path / "evil.pt"
    _pickle_payload(evil)
    if command in ("sample", "export-hf"):
        argv = [command, "--checkpoint", str(evil), "--tokenizer", byte_tokenizers[0]]
        argv += ["--prompt", "Once"] if command == "sample" else ["--out", str(tmp_path / "hf")]
        assert lm_main(argv) == 2
        one_error(capsys, str(evil))
    elif command == "cs336":
        model = model_pkg.TransformerLM(model_pkg.ModelConfig(vocab_size=64, context_length=16, d_model=32,
                                                              num_layers=1, num_heads=2))  # fmt: skip
        with pytest.raises(ValueError, match="evil.pt"):
            run_load_checkpoint(evil, model, torch.optim.AdamW(model.parameters()))
    elif command == "meta.pt":
        step_dir = tmp_path / "ckpt_000005.dcp"
        shutil.copytree(sharded / "ckpt_000005.dcp", step_dir)
        _pickle_payload(step_dir / "meta.pt")
        _reseal(step_dir)
        assert consolidate_main([str(step_dir), "--out", str(tmp_path / "x.pt")]) == 2
        one_error(capsys, "meta.pt")
    else:
        np.save(tmp_path / "evil.npy", np.array([_Payload()], dtype=object), allow_pickle=True)
        argv = [*FLAGS, "--train-data", str(tmp_path / "evil.npy"), "--val-data", tokens[1]]
        assert train_main([*argv, "--out-dir", str(tmp_path / "r"), "--steps", "2"]) == 2
        one_error(capsys, "evil.npy")
    assert not payload.exists()


def test_28_exit_prepare_on_an_unusable_out_is_one_error_line(text_file, tmp_path, capsys):
    """[exit] An --out that cannot be made (here under a file; a read-only or full disk alike) used to traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = ["--train", str(text_file), "--val", str(text_file), "--out", str(blocker / "out"), "--vocab-size", "260"]
    assert prepare_main(argv) == 2
    one_error(capsys, str(blocker))
