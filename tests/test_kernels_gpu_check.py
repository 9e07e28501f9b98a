"""The GPU check's dry run (tiny shapes on the CPU interpreter) must work, so the first lent GPU yields numbers."""

from bench.gpu_check import main


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "report.md"
    assert main(["--dry-run", "--out", str(out)]) == 0
    report = out.read_text()
    for op in ("rms_norm", "swiglu", "apply_rope", "cross_entropy", "fused_linear_cross_entropy", "flash_attention"):
        assert f"| {op} |" in report
    assert "**NO**" not in report  # every correctness row passed
