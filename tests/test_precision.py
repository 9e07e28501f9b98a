"""Precision by capability (train/precision.py): the dtype --dtype auto picks, fp16's loss scaling in the trainer, and
its state carried bitwise through a resume."""

import math

import pytest
import torch

from conftest import TINY
from smollm_stack.train import precision, run
from smollm_stack.train.__main__ import main
from smollm_stack.train.config import make_config
from smollm_stack.train.log import read_metrics

CUDA = torch.device("cuda")


@pytest.fixture
def card(monkeypatch):
    """Fake a CUDA card of the given capability (no GPU needed: only the capability and the name are asked)."""

    def fake(capability: tuple[int, int], name: str):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return fake


CARDS = [((7, 5), "Tesla T4", torch.float16), ((8, 0), "NVIDIA A100-SXM4-80GB", torch.bfloat16),
         ((8, 9), "NVIDIA L4", torch.bfloat16), ((9, 0), "NVIDIA H100 80GB HBM3", torch.bfloat16)]


@pytest.mark.parametrize(("capability", "name", "auto"), CARDS)
def test_auto_dtype_follows_the_capability(card, capability, name, auto):
    card(capability, name)
    assert precision.resolve_dtype("auto", CUDA) == auto
    assert precision.resolve_dtype("float16", CUDA) == torch.float16
    assert precision.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert precision.grad_scaler(torch.device("cpu"), auto).is_enabled() == (auto == torch.float16)


def test_a_dtype_the_card_cannot_run_is_one_error_line(card):
    card((7, 5), "Tesla T4")
    with pytest.raises(ValueError, match=r"^--dtype bfloat16: Tesla T4 \(capability 7.5\) has no bf16") as e:
        precision.resolve_dtype("bfloat16", CUDA)
    assert "\n" not in str(e.value) and "float16" in str(e.value)
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float16, float32"):
        make_config(dtype="float8")


# fp16 on the CPU, with a scale so large that the first steps overflow (and are skipped) and a growth interval so
# short that the scale also grows within 16 steps: both of the scaler's moves happen, and its state matters on resume.
def aggressive_scaler(device, dtype):
    return torch.amp.GradScaler(device.type, init_scale=2.0**24, growth_interval=3, enabled=dtype == torch.float16)


def fp16_run(tokens, out_dir, **overrides):
    fields = dict(TINY, steps=16, log_interval=1, eval_interval=8, ckpt_interval=8, keep_ckpts=3, dtype="float16")
    return make_config(fields, train_data=tokens[0], val_data=tokens[1], out_dir=str(out_dir), **overrides)


def test_fp16_skips_overflowing_steps_and_grows_the_scale(tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "grad_scaler", aggressive_scaler)
    summary = run(fp16_run(tokens, tmp_path / "run"))
    assert summary["status"] == "finished"  # an overflowing step is skipped, not a divergence
    rows = [r for r in read_metrics(tmp_path / "run") if "loss_scale" in r]
    scales, skipped = [2.0**24] + [r["loss_scale"] for r in rows], [not math.isfinite(r["grad_norm"]) for r in rows]
    assert any(skipped) and not all(skipped)
    for before, after, skip in zip(scales, scales[1:], skipped):
        assert after == before / 2 if skip else after in (before, 2 * before)  # halves exactly on a skipped step
    assert any(after == 2 * before for before, after in zip(scales, scales[1:]))  # and grew after clean steps
    assert all(math.isfinite(r["train_loss"]) for r in rows)  # the loss itself stayed finite
    # clipping and the log see the true gradients (norm ~1 here), not the scaled ones (times 2^17 or more)
    assert all(r["grad_norm"] < 100 for r, skip in zip(rows, skipped) if not skip) and min(scales) >= 2**17


def test_fp16_resume_continues_bitwise(tokens, tmp_path, monkeypatch):
    """Resumed from step 8, the steps after it (losses, scales, gradient norms) equal the uninterrupted run's."""
    monkeypatch.setattr(precision, "grad_scaler", aggressive_scaler)
    run_dir = tmp_path / "run"
    run(fp16_run(tokens, run_dir))
    whole = read_metrics(run_dir)
    (run_dir / "summary.json").unlink()
    for later in [p for p in run_dir.glob("*.pt") if int(p.stem.split("_")[-1]) > 8]:
        later.unlink()
    assert main(["--resume", str(run_dir)]) == 0
    kept = ("step", "train_loss", "val_loss", "grad_norm", "loss_scale", "lr")  # all but the timings
    resumed = read_metrics(run_dir)
    assert [{k: r.get(k) for k in kept} for r in resumed] == [{k: r.get(k) for k in kept} for r in whole]  # ==
    assert len({r["loss_scale"] for r in whole if r["step"] > 8}) > 1  # the scale still moved after the resume
