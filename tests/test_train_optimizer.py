"""The two optimizer-step implementations (TrainConfig.optimizer): torch's fused AdamW and clip_grad_norm_, ours.

Both run the same update in fp32 with the same operations in a different order (fused: one pass per parameter;
ours: one foreach call per line of the update), so they agree to a few ulps per step. Over 300 steps of Adam,
whose update is bounded by lr per step and whose m / (sqrt(v) + eps) is smooth in its inputs, those ulps stay
at the level of 1e-6 of parameters of size ~1, far below the 3e-3 a single step moves them.
"""

import math

import pytest
import torch

import smollm_stack.train.loop
from smollm_stack.train.config import make_config
from smollm_stack.train.optim.adamw import AdamW, clip_gradients, make_adamw


def _groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 4, 2))]
    groups = [{"params": [params[0], params[2]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]
    return params, groups


def test_torch_adamw_is_fused_on_cpu_and_ours_is_ours():
    params, groups = _groups()
    assert make_adamw("torch", groups, torch.device("cpu"), lr=1e-3).defaults["fused"]
    assert isinstance(make_adamw("ours", _groups()[1], torch.device("cpu"), lr=1e-3), AdamW)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_adamw("sgd", groups, torch.device("cpu"), lr=1e-3)


def test_torch_and_ours_take_the_same_steps():
    """Both implementations from make_adamw and clip_gradients, with decay groups, clipping and skipped gradients."""
    (ours, groups_ours), (theirs, groups_theirs) = _groups(), _groups()
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt_ours = make_adamw("ours", groups_ours, torch.device("cpu"), **hyper)
    opt_theirs = make_adamw("torch", groups_theirs, torch.device("cpu"), **hyper)
    g = torch.Generator().manual_seed(1)
    for step in range(300):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            grad = torch.randn(p.shape, generator=g) * 3  # norms of ~10: clipping to 2 is active
            p.grad, q.grad = grad.clone(), grad.clone()
            if i == 1 and step % 7 == 0:  # a parameter that sometimes gets no gradient falls behind in t
                p.grad = q.grad = None
        norm_ours, norm_theirs = clip_gradients("ours", ours, 2.0), clip_gradients("torch", theirs, 2.0)
        torch.testing.assert_close(norm_ours, norm_theirs, rtol=1e-6, atol=0)
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert not torch.equal(ours[0], _groups()[0][0])  # it did move


def test_runs_with_either_optimizer_agree(tokens, tmp_path):
    """The trainer's wiring: the same 10 steps with torch's and with ours land on the same losses."""
    common = dict(train_data=tokens[0], val_data=tokens[1], vocab_size=64, context_length=16, batch_size=4, steps=10,
                  warmup_steps=2, eval_interval=10, eval_batches=2, log_interval=5, ckpt_interval=10, sample_tokens=0,
                  progress=False, device="cpu", threads=1,
                  model_args=dict(d_model=32, num_layers=1, num_heads=2))  # fmt: skip
    losses = []
    for name in ("torch", "ours"):
        summary = smollm_stack.train.loop.run(make_config(common, optimizer=name, out_dir=str(tmp_path / name)))
        losses.append(summary["final_val_loss"])
    assert math.isclose(losses[0], losses[1], rel_tol=1e-4), losses


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_config(optimizer="adam")


@pytest.mark.parametrize("fused", [True, False])
def test_the_per_step_weight_copy_follows_every_optimizer_step(fused):
    """kernels.weight_cache keeps the weights' low-precision copy; a fused AdamW step leaves the weight's version
    counter as it was, so only the optimizer post-step hook keeps the copy from going stale."""
    from smollm_stack.kernels.weight_cache import stacked_weight

    def cast_weight(w, dtype):
        return stacked_weight((w,), dtype)

    w = torch.nn.Parameter(torch.randn(16, 8))
    optimizer = torch.optim.AdamW([w], lr=0.1, fused=fused)
    before = cast_weight(w, torch.bfloat16)
    w.grad = torch.randn_like(w)
    optimizer.step()
    assert not torch.equal(cast_weight(w, torch.bfloat16), before)
    torch.testing.assert_close(cast_weight(w, torch.bfloat16), w.detach().to(torch.bfloat16), rtol=0, atol=0)
