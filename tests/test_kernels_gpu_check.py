"""The GPU check's dry run (tiny shapes on the CPU interpreter) must work, so the first lent GPU yields numbers: every
section written out as it finishes, sections that do not fit the budget skipped and named, a killed run's finished
sections kept."""

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from smollm_stack import kernels
from smollm_stack.bench.gpu_check import SECTIONS, main

OPS = ("rms_norm", "swiglu", "apply_rope", "cross_entropy", "fused_linear_cross_entropy", "flash_attention")


def _rows(out: Path) -> list[dict]:
    """The complete lines of rows.jsonl (a reader racing the writer may see the last one half written)."""
    lines = (out / "rows.jsonl").read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines]


def _status(rows: list[dict]) -> dict[str, str]:
    return {r["name"]: r["status"] for r in rows if r["section"] == "gpu_check"}


def test_gpu_check_dry_run(tmp_path, monkeypatch):
    if "out_dtype" not in inspect.signature(kernels.rms_norm).parameters:  # a stand-in until the fp32-in kernel lands
        rms_norm = kernels.rms_norm
        monkeypatch.setattr(kernels, "rms_norm", lambda x, weight, eps=1e-5, out_dtype=None: rms_norm(x, weight, eps)
                            .to(out_dtype or x.dtype))  # fmt: skip
    out = tmp_path / "run"
    assert main(["--dry-run", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for op in OPS:
        assert f"| {op} |" in report
    assert "**NO**" not in report and "**FAILED**" not in report  # every correctness row passed
    assert "| rms_norm (out float16) | out |" in report and "| rms_norm | fp32 -> fp16 |" in report
    rows = _rows(out)
    assert _status(rows) == dict.fromkeys(SECTIONS, "done")
    checks = [r for r in rows if r["section"] in ("check", "dtypes")]
    assert checks and all(r["ok"] for r in checks)
    assert {r["dtype"] for r in checks} == {"float32", "float16"}
    timed = [r for r in rows if r["section"] == "kernels"]
    assert {r["provider"] for r in timed} == {"triton", "eager"} and all(len(r["ms"]) == 3 for r in timed)
    assert [r["check_ok"] for r in rows if r["section"] == "attention"] == [True, True]  # checked before timed
    assert "### Targets (issue 10)" in report and f"correctness: {len(checks) + 1} of {len(checks) + 1}" in report


def test_gpu_check_budget_skips_and_bad_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--dry-run", "--budget-s", "1", "--only", "env,check,train", "--out", str(out)]) == 0
    assert _status(_rows(out)) == {"env": "done", "check": "skipped", "train": "skipped"}
    report = (out / "report.md").read_text()
    assert "_skipped: needs ~" in report and "### Targets" in report
    capsys.readouterr()
    for flags in (["--only", "env,nope"], ["--budget-s", "-1"], ["--out", str(out)]):  # out holds a report now
        assert main(["--dry-run", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and flags[0] in err


def test_gpu_check_killed_run_keeps_finished_sections(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "smollm_stack.bench.gpu_check", "--dry-run", "--out", str(out)]
    command += ["--only", "env,check,kernels"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "rows.jsonl").exists() and _status(_rows(out)).get("env") == "done"):
            assert proc.poll() is None and time.monotonic() < deadline, "gpu_check ended or stalled before env"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    report = (out / "report.md").read_text()
    assert "### Environment" in report and "Triton interpreter" in report
    assert "### Targets" not in report  # killed mid-run: the end never came, what was done is there
    assert _status(_rows(out)) == {"env": "done"}


def test_gpu_check_attention_that_fails_its_check_is_not_timed(tmp_path, monkeypatch):
    flash_attention = kernels.flash_attention
    monkeypatch.setattr(kernels, "flash_attention", lambda q, k, v: flash_attention(q, k, v) * 1.01)
    out = tmp_path / "run"
    assert main(["--dry-run", "--only", "attention", "--out", str(out)]) == 1  # a failed check fails the run
    rows = [r for r in _rows(out) if r["section"] == "attention"]
    assert rows and all(not r["check_ok"] and r["ours_ms"] is None and r["sdpa_ms"] for r in rows)
    assert "**FAILED**" in (out / "report.md").read_text()


def test_gpu_check_targets_screen_judges_each_row():
    from smollm_stack.bench import targets

    kernel = dict(section="kernels", provider="triton", shape="125m", dtype="bf16", mode="fwd+bwd")
    rows = [
        {**kernel, "op": "rms_norm", "pct_copy": 90.0, "x_compile": 0.9, "x_eager": 2.0},
        {**kernel, "op": "rms_norm", "provider": "eager", "pct_copy": 99.0, "x_compile": 9.0, "x_eager": 1.0},
        {**kernel, "op": "fused_linear_cross_entropy", "pct_eager_peak": 20.0, "x_eager": 0.95},
        dict(section="attention", shape="d128", head_dim=128, seq_len=4096, mode="fwd", x_sdpa=1.1, ours_tflops=300.0,
             check_ok=True),
        dict(section="attention", shape="d128", head_dim=128, seq_len=2048, mode="fwd", x_sdpa=0.5, ours_tflops=9.0,
             check_ok=True),
        dict(section="check", ok=True),
    ]  # fmt: skip
    screen = targets.render(rows, judged=True)  # as on a GPU
    assert "correctness: 3 of 3 checks pass; targets: 4 pass, 3 miss, 0 not measured" in screen
    assert "| 125m rms_norm bf16 fwd+bwd | copy 90% (>= 85%) pass; x compile 0.9 (>= 1) **MISS**; x eager 2 " in screen
    assert "| 125m FLCE fwd+bwd | peak 20% of eager (<= 25% of eager) pass; x eager 0.95 (>= 1) **MISS** |" in screen
    assert "| attention d128 T4096 fwd | x SDPA 1.1 (>= 1) pass; TFLOP/s 300 (>= 350) **MISS** |" in screen
    assert "T2048" not in screen and screen.count("\n") < 40  # only the rows the targets name, on one screen
