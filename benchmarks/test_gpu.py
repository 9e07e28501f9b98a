"""GPU races, bf16, skipped without CUDA: each Triton kernel against the eager op and torch.compile of it at the
presets' shapes (bench/kernels.py's cases and byte counts), and our attention against SDPA's flash backend and the
eager path (bench/attention.py's preset shapes), forward and backward. Each entrant is timed by the bench scripts'
own ``time_ms`` (CUDA-graph replays, or events where the call syncs) inside one pedantic round; the median it measures
is what the ratio checks compare, and extra_info carries GB/s and TFLOP/s."""

import pytest
import torch
from conftest import MEDIANS, check_ratio

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available():  # (the bench modules import triton, and set what it reads, when loaded)
    from smollm_stack.bench import attention as bench_attention
    from smollm_stack.bench import kernels as bench_kernels

    DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
    CASES = {(s.name, c.op, c.dtype): (s, c)
             for s in bench_kernels.SHAPES for c in bench_kernels._cases(s, DTYPE, DEVICE)}  # fmt: skip
    ATTENTION = {s.name: s for s in bench_attention.shapes(dry_run=False) if s.name in bench_attention.MODEL_PRESETS}
else:
    CASES, ATTENTION = {}, {}


@pytest.mark.parametrize("provider", ["triton", "eager", "compile"])
@pytest.mark.parametrize("key", sorted(CASES), ids="-".join)
def test_kernel(race, key, provider):
    shape, case = CASES[key]
    fn = {"triton": case.triton, "eager": case.eager}.get(provider) or torch.compile(case.eager, dynamic=False)
    measured = {}

    def once():
        measured["timing"], measured["peak"] = bench_kernels._measure(case, fn, "fwd+bwd", DEVICE, dry_run=False)

    race(f"kernel-{'-'.join(key)}", provider, once, rounds=1, warmup=0)
    timing, nbytes, flops = measured["timing"], case.fwd_bytes + case.bwd_bytes, 3 * case.fwd_flops
    _record(race, f"kernel-{'-'.join(key)}", provider, timing.median, nbytes, flops, measured["peak"])


@pytest.mark.parametrize("provider", ["ours", "sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention(race, name, provider):
    shape, measured = ATTENTION[name], {}

    def once():
        measured["result"] = bench_attention._measure(shape, provider, "fwd+bwd", DTYPE, DEVICE, dry_run=False)

    race(f"attention-{name}", provider, once, rounds=1, warmup=0)
    if measured["result"] is None:
        pytest.skip(f"{provider} cannot run {name} here")
    timing, peak = measured["result"]
    _record(race, f"attention-{name}", provider, timing.median, 0, shape.flops("fwd+bwd"), peak)


def _record(race, group, provider, ms, nbytes, flops, peak):
    """The GPU's own median replaces the pedantic round's wall time (which holds warm-up and graph capture)."""
    MEDIANS[group, provider] = ms / 1e3
    race.benchmark.extra_info.update(ms=ms, gbs=nbytes / ms / 1e6 if nbytes else None,
                                     tflops=flops / ms / 1e9 if flops else None, peak_mib=peak)  # fmt: skip


# The earlier Hopper work's kernel targets, as floors: ours at least as fast as eager (and SDPA for attention).
@pytest.mark.parametrize("key", sorted(CASES), ids="-".join)
def test_kernel_ratio(key):
    check_ratio(f"kernel-{'-'.join(key)}", "triton", "eager", floor=1.0)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_ratio(name):
    check_ratio(f"attention-{name}", "ours", "sdpa", floor=0.8)
