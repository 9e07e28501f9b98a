"""The GPU check's dry run (tiny shapes on the CPU interpreter) must work, so the first lent GPU yields numbers: every
section written out as it finishes, sections that do not fit the budget skipped and named, a killed run's finished
sections kept."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from smollm_stack import kernels
from smollm_stack.bench import gpu_check
from smollm_stack.bench.gpu_check import SECTIONS, main

OPS = ("rms_norm", "swiglu", "apply_rope", "cross_entropy", "fused_linear_cross_entropy", "flash_attention")


def _rows(out: Path) -> list[dict]:
    """The complete lines of rows.jsonl (a reader racing the writer may see the last one half written)."""
    lines = (out / "rows.jsonl").read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines]


def _status(rows: list[dict]) -> dict[str, str]:
    return {r["name"]: r["status"] for r in rows if r["section"] == "gpu_check"}


# Makes the packages a bare GPU image may lack unimportable, as on a machine without them.
BLOCKER = """
import sys
for name in ("tqdm", "matplotlib", "numba", "regex", "safetensors"):
    sys.modules[name] = None
"""


def test_gpu_check_dry_run_on_a_bare_machine(tmp_path):
    """The whole dry run in a process where tqdm, matplotlib, numba, regex and safetensors cannot be imported."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'blocker'}{os.pathsep}{Path(__file__).parents[1]}"}
    command = [sys.executable, "-m", "smollm_stack.bench.gpu_check", "--dry-run", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "no loss plots: matplotlib is not installed" in result.stdout  # the trainer ran without it
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
    assert [r["provider"] for r in rows if r["section"] == "train"][:2] == ["eager", "triton"]  # a row a provider
    assert "### Targets (issue 10)" in report and f"correctness: {len(checks) + 1} of {len(checks) + 1}" in report


def test_gpu_check_device_report(tmp_path):
    out = tmp_path / "run"
    assert main(["--dry-run", "--device-report", "--out", str(out)]) == 0
    rows = _rows(out)
    assert _status(rows) == {"device": "done"}
    card, *kept = [r for r in rows if r["section"] == "device"]
    assert card["autocast"] == "float32" and "Triton interpreter" in card["card"]
    assert len(kept) == 3 * 3 * 2 and all(len(r["configs"]) == 1 for r in kept)  # the interpreter's one config
    assert "configs the autotuner keeps" in (out / "report.md").read_text()


def test_gpu_check_skips_a_section_whose_package_is_missing(tmp_path, monkeypatch, capsys):
    def missing(plan):
        raise ModuleNotFoundError("No module named 'tqdm'", name="tqdm")

    monkeypatch.setattr(gpu_check, "_train_setup", missing)
    out = tmp_path / "run"
    assert main(["--dry-run", "--only", "env,train", "--out", str(out)]) == 0
    assert _status(_rows(out)) == {"env": "done", "train": "skipped"}
    line = "skipped: needs the tqdm package, which is not installed"
    assert f"gpu_check: train {line}" in capsys.readouterr().err and line in (out / "report.md").read_text()


def test_gpu_check_train_section_checks_the_deadline_after_each_row(tmp_path, monkeypatch):
    """A spent budget stops the train section after its first row (one provider, one trainer run), written out as it
    came."""
    from smollm_stack.bench import train as bench_train

    runs, measure_trainer = [], bench_train.measure_trainer
    monkeypatch.setattr(bench_train, "measure_trainer", lambda *args: runs.append(args) or measure_trainer(*args))
    plan = gpu_check.Plan(True, torch.device("cpu"), False, gpu_check.DRY_RUN_COSTS)
    report = gpu_check.Report(tmp_path, "header")
    rows, ended = gpu_check._run_section(gpu_check.ALL_SECTIONS["train"], plan, report, lambda: True)
    os.close(report.rows_fd)
    assert ended.startswith("stopped after this row") and [r["provider"] for r in rows] == ["eager"]
    assert [r["provider"] for r in _rows(tmp_path)] == ["eager"] and len(runs) == 1


def test_gpu_check_plan_prints_the_codes_estimates(capsys):
    """--plan, with no GPU: the cost table of today's counts at GPU_COSTS, and what the budget runs, decided as a run
    decides it (each section's estimate summed independently here)."""
    assert main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert gpu_check.cost_table() in out and [line.split()[0] for line in gpu_check.cost_table().splitlines()] == list(
        SECTIONS
    )
    for compile_ in (True, False):
        runs = gpu_check.budget_plan(420.0, compile_)
        plan = gpu_check.Plan(False, torch.device("cuda"), compile_, gpu_check.GPU_COSTS)
        spent = gpu_check.STARTUP_S
        for name in SECTIONS:
            how = runs[name][0]
            plan.compile = compile_ and how == "as planned"
            cost = gpu_check.seconds(plan.costs, gpu_check.ALL_SECTIONS[name].counts(plan))
            if how == "skipped":
                assert spent + cost > 420.0, name  # it would not have fit even without torch.compile
            else:
                spent += cost
                plan.done.add(name)
            assert abs(runs[name][1] - spent) < 1e-9 and spent <= 420.0, name
        if compile_:  # today's counts: the default budget trades train's compiles for time and leaves dtypes out
            assert [how for how, _ in runs.values()] == ["as planned"] * 5 + ["without torch.compile", "skipped"]
            assert f"    train      without torch.compile  done at ~{runs['train'][1]:.0f} s" in out
        else:
            assert {how for how, _ in runs.values()} == {"as planned"}
    assert list(gpu_check.budget_plan(420.0, True, ["train", "env"])) == ["env", "train"]  # run order, not flag order


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


def test_gpu_check_checks_in_the_dtype_the_card_trains_in():
    """bf16 first where the card has it; on a T4 (fp16 by --dtype auto) fp16 first and fp32 after, never bf16."""
    for trains, checks in ((torch.bfloat16, (torch.bfloat16, (torch.float16, torch.float32))),
                           (torch.float16, (torch.float16, (torch.float32,)))):  # fmt: skip
        plan = gpu_check.Plan(False, torch.device("cuda"), True, gpu_check.GPU_COSTS, dtype=trains)
        assert gpu_check._check_dtypes(plan) == checks
