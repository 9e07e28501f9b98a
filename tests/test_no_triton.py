"""Without triton (macOS, Windows: no wheels) the project imports, and the eager path trains and samples on a CPU.

The check runs in a fresh interpreter whose import system refuses ``triton``, as a machine without it would.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, NoTriton())

    from smollm_stack import kernels, model, tokenizer, train  # noqa: F401
    from smollm_stack.train.config import make_config

    assert "triton" not in sys.modules and not kernels.triton_available()
    assert kernels.resolve_backend("auto", "cpu") == "eager" and kernels.resolve_backend("auto", "cuda") == "eager"
    for ask in (lambda: kernels.ops("triton"), lambda: kernels.resolve_backend("triton", "cpu")):
        try:
            ask()
            raise AssertionError("asking for Triton without triton must fail")
        except RuntimeError as e:
            assert "needs the triton package" in str(e), e
    cfg = make_config(train_data=sys.argv[1], val_data=sys.argv[2], vocab_size=64, context_length=16, batch_size=4,
                      steps=4, warmup_steps=1, eval_interval=4, eval_batches=1, log_interval=2, ckpt_interval=4,
                      sample_tokens=0, progress=False, device="cpu", threads=1, out_dir=sys.argv[3],
                      model_args=dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1))
    summary = train.run(cfg)
    assert summary["status"] == "finished" and "triton" not in sys.modules, summary
    print("ok", summary["final_val_loss"])
    """
)


def test_project_imports_and_trains_without_triton(tokens, tmp_path):
    env_script = [sys.executable, "-c", SCRIPT, tokens[0], tokens[1], str(tmp_path / "run")]
    result = subprocess.run(env_script, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("ok")
