"""Muon: Newton-Schulz against an SVD in fp64, the band its singular values land in, bf16 stability, the update rule,
the optimizer split, exact resume, and 1 vs 2 DDP processes."""

import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train_run import ROOT, TINY_FLAGS, tiny

from smollm_stack import model as model_pkg
from smollm_stack.train import run
from smollm_stack.train.cli import load_run_config
from smollm_stack.train.config import make_config
from smollm_stack.train.log import read_metrics
from smollm_stack.train.parallel.memory import bytes_per_gpu
from smollm_stack.train.optim.builder import Optimizers
from smollm_stack.train.optim import muon as muon_module
from smollm_stack.train.optim.muon import BAND, NS_COEFFICIENTS, NS_STEPS, Muon, orthogonalize
from smollm_stack.train.optim.adamw import AdamW
from smollm_stack.train.optim.builder import build_optimizer

SHAPES = [(6, 6), (7, 5), (5, 7), (1, 9), (33, 17), (17, 33)]  # square, tall, wide, a row, ragged


def quintic(s: np.ndarray, steps: int = NS_STEPS) -> np.ndarray:
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def conditioned(shape, seed: int, spread: float = 20.0) -> torch.Tensor:
    """A random matrix whose singular values span a factor ``spread`` (so each is >= 0.003 of the norm)."""
    g = torch.Generator().manual_seed(seed)
    p, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64))
    k = min(shape)
    s = torch.logspace(0, -math.log10(spread), k, dtype=torch.float64)
    return (p[:, :k] * s) @ q[:, :k].T


def test_the_band_holds_for_every_singular_value_above_0_003():
    assert NS_COEFFICIENTS == (3.4445, -4.7750, 2.0315)  # the Muon write-up's, whose band the docstring argues
    s = quintic(np.linspace(0.003, 1.0, 100_001))
    assert BAND[0] <= s.min() and s.max() <= BAND[1]
    assert quintic(np.array([0.001]))[0] < BAND[0]  # and below that it does not: the 0.003 is needed


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_is_the_quintic_on_each_singular_value(shape):
    u = conditioned(shape, seed=sum(shape))
    p, s, qt = torch.linalg.svd(u, full_matrices=False)
    want = (p * torch.from_numpy(quintic((s / s.norm()).numpy()))) @ qt  # same vectors, values through p^5
    got = orthogonalize(u.float())
    assert got.dtype == torch.float32 and got.shape == shape
    # Each iteration rounds three fp32 matmuls of inner size <= 33 (relative ~ 33 x 2^-24 = 2e-6); the quintic's
    # slope is at most 3.44 (at 0), so 5 iterations amplify an error at most 3.44^5 ~ 500x: ~ 1e-3 at worst.
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)
    sv = torch.linalg.svdvals(got.double())
    assert BAND[0] - 1e-3 <= sv.min() and sv.max() <= BAND[1] + 1e-3  # orthogonal up to the band


def test_matrices_batched_by_shape_are_each_orthogonalized_alone():
    """The step stacks same-shape updates: each must still be scaled by its own norm and come back in its place.
    Matrices of one shape at scales 1e-3..1e3 apart: a norm shared by the stack would leave the small ones near 0.
    With no momentum or decay, a step from zero at lr 1 is -0.2 sqrt(max(m, n)) orthogonalize(G)."""
    shapes = [(7, 5), (5, 7), (7, 5), (4, 4), (7, 5), (5, 7)]
    updates = [conditioned(s, seed=i).float() * 10.0 ** (3 - 2 * i) for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = Muon(params, lr=1.0, momentum=0.0)
    for _ in range(2):  # the second step reuses the first's buffers
        for p, u in zip(params, updates, strict=True):
            p.grad = u
            p.data.zero_()
        opt.step()
    for u, p in zip(updates, params, strict=True):
        g = -p.detach() / (0.2 * math.sqrt(max(u.shape)))
        # The same iteration with another matmul kernel (bmm): the bound of the SVD test above, 1e-3.
        torch.testing.assert_close(g, orthogonalize(u), atol=1e-3, rtol=0)
        sv = torch.linalg.svdvals(g.double())
        assert BAND[0] - 1e-3 <= sv.min() and sv.max() <= BAND[1] + 1e-3


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_bf16_iteration_stays_in_the_band(scale):
    """bf16 rounds each matmul to 2^-9 relative; the band attracts, so errors do not add up over the iterations:
    the result is within the band widened by a few bf16 roundings of the last iteration (0.05)."""
    for shape in SHAPES:
        u = (conditioned(shape, seed=3) * scale).to(torch.bfloat16)
        got = orthogonalize(u, dtype=torch.bfloat16)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        sv = torch.linalg.svdvals(got.double())
        assert BAND[0] - 0.05 <= sv.min() and sv.max() <= BAND[1] + 0.05, (shape, sv)
        wide = orthogonalize(u.float(), dtype=torch.bfloat16)  # the same iteration, its last product kept in fp32
        assert wide.dtype == torch.float32  # got is that product rounded once to bf16: 2^-9 relative, 2^-8 allowed
        torch.testing.assert_close(wide.bfloat16(), got, atol=0, rtol=2**-8)
    assert orthogonalize(torch.zeros(4, 3, dtype=torch.bfloat16)).abs().max() == 0  # no 0/0
    rank_one = torch.outer(torch.arange(1.0, 6.0), torch.ones(3))  # one direction: it gets one unit singular value
    assert torch.linalg.svdvals(orthogonalize(rank_one)).tolist() == pytest.approx([1.0, 0, 0], abs=0.35)


@pytest.mark.parametrize("multiplies_bf16", [False, True])
def test_the_cpu_iteration_is_bf16_only_for_wide_matrices_on_a_cpu_that_multiplies_it(monkeypatch, multiplies_bf16):
    from smollm_stack.train.optim import muon

    monkeypatch.setattr(muon, "cpu_multiplies_bf16", lambda: multiplies_bf16)
    k = muon.BF16_CPU_MIN_K  # the smaller side decides: a tall stack is (..., K, k)
    matrices = torch.zeros(k - 1, 300), torch.zeros(k, 300), torch.zeros(3, 300, k)
    native = torch.bfloat16 if multiplies_bf16 else torch.float32
    for value, want in ((None, (torch.float32, native, native)), ("auto", (torch.float32, native, native)),
                        ("float32", (torch.float32,) * 3), ("bfloat16", (torch.bfloat16,) * 3)):  # fmt: skip
        if value is None:
            monkeypatch.delenv("SMOLLM_MUON_CPU_DTYPE", raising=False)
        else:
            monkeypatch.setenv("SMOLLM_MUON_CPU_DTYPE", value)
        assert tuple(muon.iteration_dtype(u) for u in matrices) == want, value
    monkeypatch.setenv("SMOLLM_MUON_CPU_DTYPE", "fp16")
    with pytest.raises(ValueError, match="SMOLLM_MUON_CPU_DTYPE"):
        muon.iteration_dtype(matrices[0])


def test_the_bf16_probe_agrees_with_the_cpu_flags():
    from smollm_stack.train.optim import muon

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = set(re.findall(r"^flags\s*:(.*)$", cpuinfo.read_text(), flags=re.M)[0].split())
    assert muon.cpu_multiplies_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_muon_step_is_the_documented_update():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(7, 5))
    start, lr, mu, wd = w.detach().clone(), 0.01, 0.9, 0.1
    opt = Muon([w], lr=lr, momentum=mu, weight_decay=wd)
    g1, g2 = torch.randn(7, 5), torch.randn(7, 5)
    w.grad = g1.clone()
    opt.step()
    m = (1 - mu) * g1
    want = start * (1 - lr * wd) - lr * 0.2 * math.sqrt(7) * orthogonalize((1 - mu) * g1 + mu * m)
    torch.testing.assert_close(w.detach(), want)
    w.grad = g2.clone()
    opt.step()
    m = mu * m + (1 - mu) * g2
    want = want * (1 - lr * wd) - lr * 0.2 * math.sqrt(7) * orthogonalize((1 - mu) * g2 + mu * m)
    torch.testing.assert_close(w.detach(), want)
    torch.testing.assert_close(w.grad, (1 - mu) * g2 + mu * m)  # the step leaves the look-ahead in the gradient
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="weight_decay 0 or >= 1e-30"):  # the folded decay divides by it
        Muon([w], weight_decay=1e-40)


@pytest.mark.skipif(muon_module.nesterov is None, reason="needs triton (its interpreter here)")
def test_the_look_ahead_kernel_steps_as_the_foreach_path(monkeypatch):
    """CUDA's path (kernels/nesterov.py: momentum, look-ahead and norm in one launch a stack, under the interpreter
    here) against the CPU's foreach path, two steps with momentum and decay, a stack holding wide and tall matrices
    and a zero gradient. The momenta differ by the lerps' orders: 6 fp32 roundings of |M| + |G| a step
    (tests/test_nesterov.py), from M = 0: 6 u |G1| after one step, then mu times that plus 6 u (|M1| + |G2|),
    at most 12 u (|G1| + |G2|). X_0 by a few fp32 roundings (one fp64 norm against a division by the largest entry and
    the fp32 norm), which 5 iterations amplify at most 3.44^5 ~ 500x: O within 1e-3, as orthogonalize's bound, so
    each step moves W within lr 0.2 sqrt(7) 1e-3 of the other path. The kernel's path leaves G in the gradient."""
    shapes = [(7, 5), (5, 7), (7, 5), (4, 4), (5, 7), (7, 5)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    grads = [[torch.randn(s, generator=torch.Generator().manual_seed(10 * k + i)) for i, s in enumerate(shapes)]
             for k in (1, 2)]  # fmt: skip
    grads[0][4].zero_()  # a zero look-ahead: its update is 0, not NaN
    lr, results = 0.01, []
    for kernel in (False, True):
        monkeypatch.setattr(muon_module, "triton_device", lambda device, kernel=kernel: kernel)
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = Muon(params, lr=lr, momentum=0.9, weight_decay=0.1)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append(([p.detach() for p in params], [opt.state[p]["momentum"] for p in params],
                        [p.grad for p in params]))  # fmt: skip
    (w_foreach, m_foreach, _), (w_kernel, m_kernel, g_kernel) = results
    for a, b, g1, g2 in zip(m_kernel, m_foreach, *grads, strict=True):
        assert ((a - b).abs() <= 12 * 2.0**-24 * (g1.abs() + g2.abs())).all()
    for a, b in zip(w_kernel, w_foreach, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2 * lr * 0.2 * math.sqrt(7) * 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(g_kernel, grads[1], strict=True))


def test_build_optimizer_splits_hidden_matrices_from_the_rest():
    model = model_pkg.TransformerLM(model_pkg.ModelConfig.preset("tiny", d_model=32, num_heads=2, vocab_size=64))
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(make_config(optimizer="muon").optimizer, model, torch.device("cpu"), lr=0.01)
    muon, adamw = opt.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    shapes = dict(model.named_parameters())
    assert in_muon == {n for n, p in shapes.items() if n.startswith("layers.") and p.dim() == 2}
    embeddings = {"token_embeddings.weight", "lm_head.weight"} | {f"value_embeddings.{i}.weight" for i in range(4)}
    assert embeddings | {n for n, p in shapes.items() if p.dim() == 1} == in_adamw
    assert in_muon.isdisjoint(in_adamw) and len(in_muon | in_adamw) == len(names)
    ours = build_optimizer(make_config(optimizer="ours").optimizer, model, torch.device("cpu"), lr=0.01)
    assert isinstance(ours, AdamW)  # AdamW on everything


@pytest.mark.parametrize("optimizer", ["torch", "muon"])
def test_memory_estimate_counts_the_optimizer_state_it_holds(optimizer):
    """memory.py's optimizer bytes are what the optimizer keeps after a step (Muon: one momentum per matrix)."""
    config = model_pkg.ModelConfig.preset("tiny", d_model=32, num_heads=2, vocab_size=64, num_kv_heads=1)
    model = model_pkg.TransformerLM(config)
    opt = build_optimizer(make_config(optimizer=optimizer).optimizer, model, torch.device("cpu"), lr=0.01)
    model(torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))).backward()
    opt.step()
    inner = opt.optimizers if isinstance(opt, Optimizers) else [opt]
    held = sum(t.nbytes for o in inner for st in o.state.values() for t in st.values() if t.dim() > 0)
    assert held == bytes_per_gpu(config, 2, torch.float32, optimizer=optimizer).optimizer


def test_muon_run_resumes_bitwise(tokens, tmp_path):
    muon = dict(optimizer="muon", max_lr=0.02, min_lr=0.002, schedule="cosine")  # a cosine extends unchanged
    ref = run(tiny(tokens, tmp_path / "ref", **muon))
    part = tiny(tokens, tmp_path / "part", **muon, steps=10, cosine_steps=20)
    run(part)
    resumed = run(make_config(load_run_config(tmp_path / "part"), resume=str(tmp_path / "part"), steps=20))
    assert ref["status"] == resumed["status"] == "finished"
    keys = ("step", "train_loss", "val_loss", "grad_norm", "lr")
    rows = [[tuple(r.get(k) for k in keys) for r in read_metrics(tmp_path / d)] for d in ("ref", "part")]
    assert rows[0] == rows[1]  # floats compared with ==
    state = torch.load(tmp_path / "part" / "ckpt_000020.pt", weights_only=True)["optimizer"]
    assert len(state["optimizers"]) == 2 and state["optimizers"][0]["state"]  # Muon's momenta were saved
    with pytest.raises(ValueError, match="not this optimizer"):
        Optimizers(AdamW([torch.nn.Parameter(torch.ones(1))])).load_state_dict({"state": {}, "param_groups": []})


def test_muon_ddp_two_gloo_processes_match_one_process(tokens, tmp_path):
    flags = [*TINY_FLAGS, "--train-data", tokens[0], "--val-data", tokens[1], "--steps", "10", "--optimizer", "muon"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "smollm_stack.train"]
    single = [*train, *flags, "--batch-size", "8", "--out-dir", str(tmp_path / "one")]
    ddp = [*train[:2], "torch.distributed.run", "--standalone", "--nproc_per_node=2", *train[1:], *flags]
    ddp += ["--batch-size", "4", "--out-dir", str(tmp_path / "two")]
    assert subprocess.run(single, env=env, check=False).returncode == 0
    assert subprocess.run(ddp, env=env, check=False, cwd=ROOT).returncode == 0
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 5, 8, 10]  # 8: the decay starts
    for key in ("train_loss", "val_loss", "grad_norm"):
        got = [r[key] for r in two if r.get(key) is not None]
        want = [r[key] for r in one if r.get(key) is not None]
        # Two ranks sum their gradients in another order than one process: fp32 reassociation, ~1e-7 relative,
        # through 10 steps of a 2-layer model; as in test_train_run's AdamW DDP test.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
