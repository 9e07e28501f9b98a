"""The `python -m model` command line: HF export/import through checkpoints, sampling, and its errors."""

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

from model import ModelConfig, TransformerLM, generate, load_model
from model.__main__ import main


def save_checkpoint(path, **overrides) -> TransformerLM:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=300, context_length=32, d_model=32, num_layers=1, num_heads=4, kernels="eager")
    model = TransformerLM(ModelConfig(**{**kwargs, **overrides}))
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "iteration": 1}, path)
    return model


def test_export_then_import_gives_the_same_model(tmp_path, capsys):
    model = save_checkpoint(tmp_path / "a.pt", num_kv_heads=2)
    main(["export-hf", "--checkpoint", str(tmp_path / "a.pt"), "--out", str(tmp_path / "hf")])
    main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "b.pt")])
    back = load_model(tmp_path / "b.pt")
    ids = torch.randint(0, 300, (1, 9))
    torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export-hf", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    assert "error: no checkpoint file at" in capsys.readouterr().err
    save_checkpoint(tmp_path / "post.pt", norm="post")
    with pytest.raises(SystemExit):
        main(["export-hf", "--checkpoint", str(tmp_path / "post.pt"), "--out", str(tmp_path / "hf")])
    assert "error: only Llama blocks export" in capsys.readouterr().err


def make_tokenizer(out_dir):
    from tokenizer import Tokenizer

    vocab = {i: bytes([i]) for i in range(256)} | {256: b"th", 257: b"the", 258: b" the", 259: b"<|endoftext|>"}
    merges = [(b"t", b"h"), (b"th", b"e"), (b" ", b"the")]
    tokenizer = Tokenizer(vocab, merges, ["<|endoftext|>"])
    tokenizer.save(out_dir)
    return tokenizer


def test_sample_prints_the_greedy_continuation_and_tokens_per_second(tmp_path, capsys):
    tokenizer = make_tokenizer(tmp_path / "tok")
    model = save_checkpoint(tmp_path / "ckpt.pt", vocab_size=len(tokenizer))
    prompt = "the cat and the dog"
    eos_id = tokenizer.special_token_id("<|endoftext|>")
    new_ids = generate(model, tokenizer.encode(prompt), 6, temperature=0, eos_id=eos_id)
    args = ["--checkpoint", str(tmp_path / "ckpt.pt"), "--tokenizer", str(tmp_path / "tok"), "--prompt", prompt]
    cli = [sys.executable, "-m", "model", "sample", *args, "--max-new-tokens", "6", "--temperature", "0"]
    result = subprocess.run(cli, capture_output=True, text=True, check=True)
    assert result.stdout == prompt + tokenizer.decode(new_ids) + "\n"
    assert re.fullmatch(r"\d+ tokens in [\d.]+ s: [\d.]+ tokens/s on cpu\n", result.stderr), result.stderr
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", *args[:-1], "the" + " the" * 39])  # 40 prompt tokens, context 32
    assert exit_info.value.code == 2
    assert "error: 40 prompt + 0 new tokens must fit the context length 32" in capsys.readouterr().err
