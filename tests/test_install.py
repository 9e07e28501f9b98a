"""We live in other people's environments: one top-level import name of our own, beside transformers and Hugging
Face's `kernels`, and the installed `smollm` command working from any directory.

Each test fails on the layout before `smollm_stack` (top-level kernels/, model/, tokenizer/, train/, bench/): from a
clone's root our `kernels/` hid Hugging Face's from transformers, the distribution installed five generic names, and
there was no command outside the clone.
"""

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import TINY, as_flags, assert_close
from smollm_stack.__main__ import COMMANDS
from smollm_stack.__main__ import main as smollm

ROOT = Path(__file__).resolve().parents[1]

# Transformers imports Hugging Face's `kernels`, we export a run with `smollm lm export-hf`, transformers loads it, and
# both compute logits, in one process.
SHARED_PROCESS = textwrap.dedent(
    """
    import dataclasses, importlib.metadata, sys
    from pathlib import Path

    import torch
    import transformers
    import kernels  # Hugging Face's: transformers requires it

    from smollm_stack.model import ModelConfig, TransformerLM, load_model
    from smollm_stack.tokenizer import Tokenizer
    from smollm_stack.train.lm import main as lm

    theirs = {str(f.locate().resolve()) for f in importlib.metadata.distribution("kernels").files}
    assert str(Path(kernels.__file__).resolve()) in theirs, f"`import kernels` found {kernels.__file__}"
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    eot = "<|endoftext|>"
    Tokenizer({i: bytes([i]) for i in range(256)} | {256: eot.encode()}, [], [eot]).save(run / "tokenizer")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=257, context_length=32, d_model=32, num_layers=2, num_heads=4, backend="eager")
    checkpoint = {"model": TransformerLM(config).state_dict(), "model_config": dataclasses.asdict(config)}
    torch.save({**checkpoint, "iteration": 1}, run / "ckpt_000001.pt")
    assert lm(["export-hf", "--run", str(run), "--out", str(run / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 257, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"theirs": hf(ids).logits, "ours": load_model(run / "ckpt_000001.pt")(ids)}, out)
    """
)


@pytest.mark.parametrize("where", ["clone root", "elsewhere"])
def test_transformers_and_hugging_face_kernels_share_a_process_with_us(tmp_path, where):
    """At a clone's root a top-level folder of ours would come first on sys.path; elsewhere, what is installed."""
    (tmp_path / "run").mkdir()
    out = tmp_path / "logits.pt"
    cmd = [sys.executable, "-c", SHARED_PROCESS, str(tmp_path / "run"), str(out)]
    cwd = ROOT if where == "clone root" else tmp_path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.load(out, weights_only=True)
    # The same fp32 math in another order (HF's rotate-half RoPE on permuted weights, SDPA, its own norms): a few
    # roundings for each of the ~8 ops on the path through two layers.
    assert_close(logits["theirs"], logits["ours"], torch.float32, roundings=8)


def top_level_names(dist: metadata.Distribution) -> set[str]:
    """The import names a distribution puts at the top of site-packages: its files' first parts and top_level.txt."""
    names = set((dist.read_text("top_level.txt") or "").split())
    for file in dist.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".pth")) or first.startswith("__editable__"):
            continue  # console scripts, caches, metadata and the editable install's own machinery: no import names
        names.add(first.removesuffix(".py"))
    return names


def test_the_distribution_installs_one_top_level_name_nobody_else_owns():
    # What is installed here (packages_distributions() would also read the egg-info an editable install leaves in
    # the clone, when the tests run from its root).
    installed = list(metadata.distributions(path=sorted({sysconfig.get_path(p) for p in ("purelib", "platlib")})))
    ours = [d for d in installed if d.metadata["Name"] == "smollm-stack"]
    assert len(ours) == 1 and top_level_names(ours[0]) == {"smollm_stack"}
    owners = {name: d.metadata["Name"] for d in installed if d is not ours[0] for name in top_level_names(d)}
    assert "smollm_stack" not in owners
    assert owners["kernels"] == "kernels"  # Hugging Face's, which transformers requires, beside ours


def test_the_installed_command_trains_from_an_empty_directory(tokens, tmp_path):
    command = Path(sysconfig.get_path("scripts")) / ("smollm.exe" if os.name == "nt" else "smollm")
    assert command.is_file(), f"{command} is missing: install the project (README: pip install -e '.[dev]')"
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    flags = as_flags({**TINY, "steps": 3, "eval_interval": 3, "log_interval": 1, "ckpt_interval": 3})
    cmd = [str(command), "train", *flags, "--train-data", tokens[0], "--val-data", tokens[1], "--out-dir", "run"]
    result = subprocess.run(cmd, cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((empty / "run/summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3
    assert (empty / "run/ckpt_000003.pt").is_file()


def test_python_dash_m_train_works_at_the_root_of_a_clone(tokens, tmp_path):
    """The card's command, through the root's train.py, which the distribution does not install."""
    flags = as_flags({**TINY, "steps": 2, "eval_interval": 2, "log_interval": 1, "ckpt_interval": 2})
    cmd = [sys.executable, "-m", "train", *flags, "--train-data", tokens[0], "--val-data", tokens[1]]
    result = subprocess.run([*cmd, "--out-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run/summary.json").read_text())["steps"] == 2


def test_the_command_dispatches_to_each_tool(capsys):
    for name, (module, _) in COMMANDS.items():
        with pytest.raises(SystemExit) as exit_:
            smollm([name, "--help"])
        assert exit_.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: smollm {name}"), module
    assert smollm(["--version"]) == 0 and capsys.readouterr().out.startswith("smollm-stack ")
    assert smollm(["trian"]) == 2
    assert capsys.readouterr().err == f"error: unknown command 'trian': choose one of {', '.join(COMMANDS)}\n"
    assert smollm([]) == 2 and "commands:" in capsys.readouterr().err
