"""Whole runs of the trainer on tiny models: outputs, exact resume after SIGKILL, DDP equality, and bad inputs."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smollm_stack import model as model_pkg
import smollm_stack.train.loop
from conftest import TINY, as_flags
from smollm_stack.kernels import cpu_blas
from smollm_stack.train import TrainConfig, loop, run
from smollm_stack.train.__main__ import main
from smollm_stack.train.config import make_config
from smollm_stack.train.log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RUN = {**TINY, "steps": 20, "eval_interval": 10, "log_interval": 5, "ckpt_interval": 10}
TINY_FLAGS = as_flags(RUN)  # the same as command-line flags, for the subprocess runs


def tiny(tokens, out_dir, **overrides) -> TrainConfig:
    return make_config(RUN, **{"train_data": tokens[0], "val_data": tokens[1], "out_dir": str(out_dir), **overrides})


def test_run_writes_metrics_plots_checkpoints_and_summary(tokens, tmp_path, capsys):
    summary = run(tiny(tokens, tmp_path / "r", keep_ckpts=1))
    out = capsys.readouterr().out
    assert "tiny preset (d_model=32, num_layers=2, num_heads=2), 0.03M parameters" in out  # the model that runs
    assert " tok/s " in out and "mfu" not in out  # a CPU has no peak to compare to: no mfu column
    run_dir = tmp_path / "r"
    assert summary["status"] == "finished" and not summary["diverged"] and summary["steps"] == 20
    assert json.loads((run_dir / "summary.json").read_text())["final_val_loss"] == summary["final_val_loss"]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 16, 20]  # 16: the wsd decay's start, checkpointed and logged
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.3  # it learns
    assert {"tokens", "time_s", "train_loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= rows[-1].keys()
    assert rows[-1]["mfu"] is None  # null, not left out: one set of columns whatever the device
    assert rows[-1]["tokens"] == 20 * 4 * 16 and rows[-1]["val_ppl"] == pytest.approx(math.exp(rows[-1]["val_loss"]))
    assert [p.name for p in run_dir.glob("ckpt_*.pt")] == ["ckpt_000020.pt"]  # keep_ckpts=1
    assert [p.name for p in run_dir.glob("predecay_*.pt")] == ["predecay_000016.pt"]  # what an extension re-decays from
    assert (run_dir / "loss_steps.png").stat().st_size > 1000 and (run_dir / "loss_time.png").stat().st_size > 1000
    loaded = model_pkg.load_model(run_dir / "ckpt_000020.pt")  # the model package reads our checkpoints
    assert loaded.config.d_model == 32
    with pytest.raises(ValueError, match="already holds a run"):
        run(tiny(tokens, run_dir))


def test_evals_between_score_a_subset_and_best_val_only_whole_splits(tokens, tmp_path, monkeypatch):
    """A 1-batch subset at every eval but the last, which scores the whole split (16 windows of 4 batches)."""
    real = loop.evaluate
    low = lambda model, data, starts, *args: 0.01 if len(starts) < 16 else real(model, data, starts, *args)
    monkeypatch.setattr(loop, "evaluate", low)  # subsets that look better than any whole split
    summary = run(tiny(tokens, tmp_path / "r", eval_interval=5, eval_batches=4, eval_subset_batches=1))
    rows = [r for r in read_metrics(tmp_path / "r") if "val_loss" in r]
    assert [(r["step"], r["val_windows"]) for r in rows] == [(0, 4), (5, 4), (10, 4), (15, 4), (20, 16)]
    assert [r["val_loss"] for r in rows[:-1]] == [0.01] * 4
    assert summary["best_val_loss"] == summary["final_val_loss"] == rows[-1]["val_loss"]
    assert TrainConfig().training.steps // TrainConfig().eval.interval + 1 >= 5  # the default run: at least five points


def _losses(run_dir) -> list[tuple]:
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(run_dir)]


def _train_cli(*args) -> list[str]:
    return [sys.executable, "-m", "smollm_stack.train", *TINY_FLAGS, *args]


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tokens, tmp_path):
    """On the OpenBLAS route where numpy has it (kernels.cpu_blas; test_faults resumes on torch's BLAS)."""
    data = ["--train-data", tokens[0], "--val-data", tokens[1], "--ckpt-interval", "10"]
    data += ["--schedule", "cosine", "--cosine-steps", "40"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if cpu_blas._openblas():
        env["SMOLLM_CPU_BLAS"] = "openblas"
    ref = subprocess.run(_train_cli(*data, "--steps", "40", "--out-dir", str(tmp_path / "ref")), env=env, check=False)
    assert ref.returncode == 0
    # The same run, set to go on far longer (the schedule is the same: flat after --cosine-steps), killed mid-way.
    killed_dir = tmp_path / "killed"
    cmd = _train_cli(*data, "--steps", "100000", "--keep-ckpts", "100", "--out-dir", str(killed_dir))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "ckpt_000020.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = sorted(killed_dir.glob("ckpt_*.pt"))[-1]
    assert "ckpt_000020.pt" <= last.name < "ckpt_000040.pt"
    resumed = subprocess.run(_train_cli("--resume", str(killed_dir), "--steps", "40"), env=env, check=False)
    assert resumed.returncode == 0
    assert _losses(killed_dir) == _losses(tmp_path / "ref")  # bitwise: floats compared with ==


def test_ddp_two_gloo_processes_match_one_process(tokens, tmp_path):
    data = ["--train-data", tokens[0], "--val-data", tokens[1], "--steps", "10", "--ckpt-interval", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = _train_cli(*data, "--batch-size", "8", "--out-dir", str(tmp_path / "one"))
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp += ["-m", "smollm_stack.train"]
    ddp += [*TINY_FLAGS, *data, "--batch-size", "4", "--out-dir", str(tmp_path / "two")]
    assert subprocess.run(single, env=env, check=False).returncode == 0
    assert subprocess.run(ddp, env=env, check=False, cwd=ROOT).returncode == 0
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 5, 8, 10]  # 8: the decay starts
    assert two[-1]["tokens"] == one[-1]["tokens"]
    for key in ("train_loss", "val_loss", "grad_norm"):
        got = [r.get(key) for r in two if r.get(key) is not None]
        want = [r.get(key) for r in one if r.get(key) is not None]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tokens, tmp_path, monkeypatch, capsys):
    forward = model_pkg.TransformerLM.forward
    calls = []

    def nan_after_twelve_steps(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) > 12:
                return out * float("nan")
        return out

    monkeypatch.setattr(model_pkg.TransformerLM, "forward", nan_after_twelve_steps)
    run_dir = tmp_path / "nan"
    summary = run(tiny(tokens, run_dir))
    assert summary["diverged"] and summary["status"] == "diverged" and "diverged at step 15" in summary["message"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    assert [p.name for p in run_dir.glob("ckpt_*.pt")] == ["ckpt_000010.pt"]
    assert main(["--resume", str(run_dir)]) == 1  # the CLI exits non-zero, with the message
    assert "error: diverged at step" in capsys.readouterr().err


def test_loss_above_threshold_counts_as_diverged(tokens, tmp_path):
    summary = run(tiny(tokens, tmp_path / "d", diverge_loss=1.0))
    assert summary["diverged"] and "limit 1" in summary["message"]


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(train_data="/nonexistent/train.npy"), FileNotFoundError, "data file not found"),
        (dict(vocab_size=32), ValueError, "holds token id .* but the vocabulary has 32"),
        (dict(context_length=500), ValueError, "too few for one sequence of context_length 500"),
        (dict(model="huge"), ValueError, "unknown preset 'huge'"),
        (dict(tokenizer="/nonexistent/tok"), FileNotFoundError, "has no vocab.json"),
        (dict(device="cuda:3"), ValueError, "CUDA is not available"),
        (dict(doc_mask=True), ValueError, "--doc-mask needs to know where documents end: a tokenizer"),
    ],
)
def test_bad_inputs_give_clear_errors(tokens, tmp_path, overrides, error, message):
    if "device" in overrides and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(error, match=message):
        run(tiny(tokens, tmp_path / "bad", **overrides))


def test_cli_prints_error_and_exits_2(tmp_path, capsys):
    assert main(["--train-data", str(tmp_path / "a.txt"), "--val-data", str(tmp_path / "b.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data file not found") and "Traceback" not in err


def test_batch_that_does_not_fit_names_the_fix(tokens, tmp_path, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(model_pkg.TransformerLM, "forward", out_of_memory)
    with pytest.raises(ValueError, match="does not fit in cpu memory: lower --batch-size"):
        run(tiny(tokens, tmp_path / "oom", steps=2, eval_interval=100))


def test_kernel_preflight_aborts_with_a_table(monkeypatch):
    from types import SimpleNamespace

    rows = [
        SimpleNamespace(op="rms_norm", quantity="dx", ok=False),
        SimpleNamespace(op="swiglu", quantity="y", ok=True),
    ]
    table = "| op | ... |\n| rms_norm | dx | FAIL |"
    fake = SimpleNamespace(check_kernels=lambda **shapes: rows, format_check_table=lambda results: table)
    monkeypatch.setitem(sys.modules, "smollm_stack.kernels.check", fake)
    tuned = []  # attention's tuning pass: (q, k, v) as the model would pass them

    def attention(q, k, v):
        tuned.append([(tuple(t.shape), t.transpose(1, 2).is_contiguous()) for t in (q, k, v)])
        return q.clone()

    monkeypatch.setattr(loop.kernels, "ops", lambda backend, device: SimpleNamespace(flash_attention=attention))
    config = model_pkg.ModelConfig.preset("tiny")
    failed = r"(?s)kernel preflight failed.*\| rms_norm \| dx \| FAIL \|"
    with pytest.raises(smollm_stack.train.loop.PreflightError, match=failed):
        smollm_stack.train.loop.preflight(config, 128, torch.bfloat16, torch.device("cpu"), 0, batch_size=8)
    assert not tuned
    rows[0].ok = True
    smollm_stack.train.loop.preflight(config, 128, torch.bfloat16, torch.device("cpu"), 0, batch_size=8)  # no error
    # then attention ran at the training batch, q, k, v (B, H, T, d) views of (B, T, H, d) projections
    H, Hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    assert tuned == [[((8, H, 128, d), True), ((8, Hkv, 128, d), True), ((8, Hkv, 128, d), True)]]


def test_default_run_shortened(tmp_path, monkeypatch, capsys):
    """`smollm train` as shipped, shortened: the embedded corpus (an excerpt), a small vocab, 30 steps."""
    import smollm_stack.train.data.tokens

    train_txt, valid_txt = smollm_stack.train.data.tokens.default_corpus()
    assert train_txt.stat().st_size > 2_000_000 and valid_txt.stat().st_size > 700_000
    assert "CDLA-Sharing-1.0" in (train_txt.parent / "LICENSE.md").read_text()
    excerpt = []
    for path, size in ((train_txt, 60_000), (valid_txt, 30_000)):
        text = path.read_text()[:size]
        (tmp_path / path.name).write_text(text)
        excerpt.append(tmp_path / path.name)
    monkeypatch.setattr(smollm_stack.train.data.tokens, "default_corpus", lambda: tuple(excerpt))
    monkeypatch.setenv("SMOLLM_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    flags = "--vocab-size 300 --steps 30 --eval-interval 15 --eval-batches 2 --batch-size 8 --context-length 64"
    flags += " --d-model 64 --num-layers 2 --log-interval 10 --sample-tokens 20 --threads 1 --no-progress"
    assert main([*flags.split(), "--out-dir", str(run_dir)]) == 0
    for name in ("config.json", "metrics.jsonl", "loss_steps.png", "loss_time.png", "ckpt_000030.pt", "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final_val_loss"] < math.log(300)
    story = (run_dir / "sample.txt").read_text()
    assert story.startswith("Once upon a time") and len(story) > len("Once upon a time")
    assert story in capsys.readouterr().out
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 3 and cached[-1].startswith("tok-")  # the tokenizer and both encoded splits, reused next time

    # The tokenizer is cached; a model with a smaller vocabulary than it is refused with a clear message.
    tok_dir = tmp_path / "cache" / cached[-1]
    with pytest.raises(ValueError, match="vocabulary/model mismatch: the tokenizer .* has 300 tokens"):
        run(make_config(tokenizer=str(tok_dir), vocab_size=256, out_dir=str(tmp_path / "mismatch"), device="cpu"))


def test_kernel_preflight_passes_on_our_kernels():
    """The real check (Triton on its interpreter here, fp32) accepts our kernels on a small run's shapes."""
    shapes = dict(vocab_size=96, context_length=16, d_model=32, num_layers=1, num_heads=2)
    config = model_pkg.ModelConfig.preset("tiny", **shapes)
    smollm_stack.train.loop.preflight(config, 16, torch.float32, torch.device("cpu"), 0, batch_size=3)


def test_the_compiled_triton_step_is_one_graph_and_trains_like_the_uncompiled(tokens, tmp_path):
    """--compile with the Triton kernels: Inductor takes the model's forward and backward whole, our custom ops
    inside (no graph break), and the losses are the uncompiled run's up to fp32 reassociation: Inductor's fused
    glue sums in another order (relative error ~1e-7 a sum), which one AdamW step (sign-like updates of 1e-3 at
    warmup) carries into the next loss at about that size; 1e-5 leaves a hundredfold margin."""
    from torch._dynamo.utils import counters

    losses = {}
    for compile_ in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model_args = {**TINY["model_args"], "backend": "triton"}
        cfg = tiny(tokens, tmp_path / str(compile_), steps=3, eval_interval=3, log_interval=1, model_args=model_args,
                   compile=compile_)  # fmt: skip
        run(cfg)
        losses[compile_] = [r["train_loss"] for r in read_metrics(tmp_path / str(compile_)) if "train_loss" in r]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(losses[True]) == 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
