"""Issue 10's targets, judged on the rows ``bench.gpu_check`` measured: one screen, pass or miss per row.

Memory-bound kernels (RMSNorm, SwiGLU, RoPE, cross-entropy): >= 85% of the measured copy bandwidth, >= 1.0x
torch.compile of the same op and >= 1.5x eager. Causal attention at d = 128, T >= 4096: forward >= 1.0x SDPA flash and
>= 350 TFLOP/s, forward+backward >= 0.9x SDPA. The fused linear cross-entropy at V = 50257: peak memory <= 25% of
eager's, time <= eager's, eager there being the unchunked loss (bench.kernels). A dry run's CPU timings are shown,
never judged.
"""

import functools

from smollm_stack.bench import kernels as bench_kernels

COPY_SHARE = 85.0  # memory-bound kernels: >= 85% of measured copy bandwidth
OVER_COMPILE, OVER_EAGER = 1.0, 1.5  # ... and >= 1.0x torch.compile of the same op, >= 1.5x eager
OVER_SDPA_FWD, ATTENTION_TFLOPS, OVER_SDPA_BWD = 1.0, 350.0, 0.9  # causal attention at d = 128, T >= 4096
FLCE_PEAK_SHARE, FLCE_VOCAB = 25.0, 50257  # FLCE peak memory <= 25% of eager at V = 50257, time <= eager
MEMORY_BOUND = ("rms_norm", "swiglu", "apply_rope", "cross_entropy")


def _judge(name: str, value, goal: float, judged: bool, at_least=True, unit="") -> tuple[str, bool | None]:
    """A cell like "copy 91% (>= 85%) pass", and whether it passed (None when not measured, or not on a GPU)."""
    if value is None:
        return f"{name} n/a", None
    if not judged:  # CPU timings say nothing about speed: a dry run shows its ratios, judges none
        return f"{name} {value:.3g}{unit} (CPU: not judged)", None
    ok = value >= goal if at_least else value <= goal
    cell = f"{name} {value:.3g}{unit} ({'>=' if at_least else '<='} {goal:g}{unit}) {'pass' if ok else '**MISS**'}"
    return cell, ok


def target_lines(rows: list[dict], judged: bool) -> tuple[list[tuple[str, list[tuple[str, bool | None]]]], str]:
    """(label, verdict cells) per checked row, and the correctness line."""
    verdict = functools.partial(_judge, judged=judged)
    out = []
    for r in rows:
        if r["section"] == "kernels" and r["provider"] == "triton" and r["op"] in MEMORY_BOUND:
            out.append((f"{r['shape']} {r['op']} {r['dtype']} {r['mode']}",
                        [verdict("copy", r["pct_copy"], COPY_SHARE, unit="%"),
                         verdict("x compile", r["x_compile"], OVER_COMPILE),
                         verdict("x eager", r["x_eager"], OVER_EAGER)]))  # fmt: skip
        elif r["section"] == "attention" and r["head_dim"] == 128 and r["seq_len"] >= 4096 and r["shape"] == "d128":
            goal = OVER_SDPA_FWD if r["mode"] == "fwd" else OVER_SDPA_BWD
            cells = [verdict("x SDPA", r["x_sdpa"], goal)]
            if r["mode"] == "fwd":
                cells.append(verdict("TFLOP/s", r["ours_tflops"], ATTENTION_TFLOPS))
            out.append((f"attention d128 T{r['seq_len']} {r['mode']}", cells))
        elif r["section"] == "kernels" and r["provider"] == "triton" and r["op"] == "fused_linear_cross_entropy":
            if r["shape"] in {s.name for s in bench_kernels.SHAPES if s.vocab == FLCE_VOCAB} or r["shape"] == "dry-run":
                out.append((f"{r['shape']} FLCE {r['mode']}",
                            [verdict("peak", r["pct_eager_peak"], FLCE_PEAK_SHARE, at_least=False, unit="% of eager"),
                             verdict("x eager", r["x_eager"], 1.0)]))  # fmt: skip
    checks = [r["ok"] for r in rows if r["section"] in ("check", "dtypes")]
    checks += [r["check_ok"] for r in rows if r["section"] == "attention" and r["mode"] == "fwd"]
    correct = f"correctness: {sum(checks)} of {len(checks)} checks pass" + ("" if all(checks) else " (**FAILURES**)")
    return out, correct


def render(rows: list[dict], judged: bool) -> str:
    lines, correct = target_lines(rows, judged)
    verdicts = [ok for _, cells in lines for _, ok in cells]
    counts = f"{verdicts.count(True)} pass, {verdicts.count(False)} miss, {verdicts.count(None)} not measured"
    table = ["| row | targets |", "|---|---|"]
    table += [f"| {label} | " + "; ".join(cell for cell, _ in cells) + " |" for label, cells in lines]
    return "\n".join([f"{correct}; targets: {counts}", "", *table])
