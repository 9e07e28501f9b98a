"""`smollm lm`: sampling (streamed and batched), Hugging Face export with the tokenizer and import back,
refusals to overwrite, one-line errors on foreign files; and the model package importing no tokenizer."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from smollm_stack.model import ModelConfig, TransformerLM, generate, load_model
from smollm_stack.train.lm import main

EOT = "<|endoftext|>"


def save_checkpoint(path, **overrides) -> TransformerLM:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=300, context_length=32, d_model=32, num_layers=1, num_heads=4, backend="eager")
    model = TransformerLM(ModelConfig(**{**kwargs, **overrides}))
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "iteration": 1}, path)
    return model


def make_tokenizer(out_dir):
    from smollm_stack.tokenizer import Tokenizer

    vocab = {i: bytes([i]) for i in range(256)} | {256: b"th", 257: b"the", 258: b" the", 259: EOT.encode()}
    merges = [(b"t", b"h"), (b"th", b"e"), (b" ", b"the")]
    tokenizer = Tokenizer(vocab, merges, [EOT])
    tokenizer.save(out_dir)
    return tokenizer


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as the trainer leaves it: checkpoints and a copy of the tokenizer."""
    tokenizer = make_tokenizer(tmp_path / "run/tokenizer")
    save_checkpoint(tmp_path / "run/ckpt_000001.pt", vocab_size=len(tokenizer), num_layers=2)
    save_checkpoint(tmp_path / "run/ckpt_000002.pt", vocab_size=len(tokenizer), num_kv_heads=2)  # the newest
    return tmp_path / "run"


def error_of(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_export_then_import_gives_the_same_model_and_tokenizer(run_dir, tmp_path, capsys):
    from smollm_stack.tokenizer import Tokenizer

    assert main(["export-hf", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "back/ckpt.pt")]) == 0
    model, back = load_model(run_dir / "ckpt_000002.pt"), load_model(tmp_path / "back/ckpt.pt")
    ids = torch.randint(0, 260, (1, 9))
    torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)
    tokenizer, imported = Tokenizer.load(run_dir / "tokenizer"), Tokenizer.load(tmp_path / "back/tokenizer")
    assert (imported.vocab, imported.merges, imported.special_tokens) == (tokenizer.vocab, tokenizer.merges, [EOT])


def test_the_export_runs_in_transformers_alone(run_dir, tmp_path):
    """AutoModelForCausalLM + AutoTokenizer load it; HF's greedy generate() equals our greedy sample."""
    transformers = pytest.importorskip("transformers")
    from smollm_stack.tokenizer import Tokenizer

    assert main(["export-hf", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours, tokenizer = load_model(run_dir / "ckpt_000002.pt"), Tokenizer.load(run_dir / "tokenizer")
    eot = tokenizer.special_token_id(EOT)
    assert hf_model.generation_config.eos_token_id == hf_tok.eos_token_id == hf_tok.pad_token_id == eot
    for prompt in ["the cat and the dog", "thé cät, the dög"]:
        ids = tokenizer.encode(prompt)
        assert hf_tok(prompt)["input_ids"] == ids
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
        assert theirs == generate(ours, ids, 12, temperature=0) and eot not in theirs  # the tiny model says no eot
        ended = transformers.GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=theirs[4])
        cut = hf_model.generate(torch.tensor([ids]), generation_config=ended)[0, len(ids) :].tolist()
        assert cut[:-1] == generate(ours, ids, 12, temperature=0, eos_id=theirs[4]) and cut[-1] == theirs[4]
    assert transformers.AutoTokenizer.from_pretrained(run_dir / "tokenizer")("the")["input_ids"] == [257]


def test_sample_streams_the_greedy_continuation_and_reports_tokens_per_second(run_dir):
    from smollm_stack.tokenizer import Tokenizer

    tokenizer, model = Tokenizer.load(run_dir / "tokenizer"), load_model(run_dir / "ckpt_000002.pt")
    prompt = "the cat and the dog"
    new_ids = generate(model, tokenizer.encode(prompt), 6, temperature=0, eos_id=tokenizer.special_token_id(EOT))
    cli = [sys.executable, "-m", "smollm_stack.train.lm", "sample", "--run", str(run_dir), "--prompt", prompt]
    cli += ["--max-new-tokens", "6", "--temperature", "0", "--threads", "1"]
    result = subprocess.run(cli, capture_output=True, text=True, check=True)
    assert result.stdout == prompt + tokenizer.decode(new_ids) + "\n"
    assert re.fullmatch(r"\d+ tokens in [\d.]+ s: [\d.]+ tokens/s on cpu\n", result.stderr), result.stderr


def test_streamed_text_holds_back_half_characters(run_dir):
    from smollm_stack.tokenizer import Tokenizer
    from smollm_stack.train.lm import texts

    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    ids = tokenizer.encode("thé 日本 the") + [0xE6, 0xFF]  # then half a character and a byte that starts none
    pieces = list(texts(tokenizer, ids))
    assert pieces[:3] == ["th", "", "é"] and "".join(pieces) == tokenizer.decode(ids)


def test_sample_of_a_batch_and_its_errors(run_dir, capsys):
    from smollm_stack.tokenizer import Tokenizer

    tokenizer, model = Tokenizer.load(run_dir / "tokenizer"), load_model(run_dir / "ckpt_000002.pt")
    prompts, args = ["the cat", "a dog and the bird"], ["sample", "--run", str(run_dir), "--temperature", "0"]
    assert main([*args, "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "5", "--top-k", "3"]) == 0
    new = [generate(model, tokenizer.encode(p), 5, temperature=0, eos_id=259) for p in prompts]
    expected = [p + tokenizer.decode(ids) for p, ids in zip(prompts, new)]
    assert capsys.readouterr().out == "\n\n".join(expected) + "\n"
    err = error_of([*args, "--prompt", "the" * 40], capsys)
    assert "40 prompt + 0 new tokens must fit the context length 32" in err
    assert "--threads must be at least 1" in error_of([*args, "--prompt", "a", "--threads", "0"], capsys)
    assert "give --run RUNDIR, or both" in error_of(["sample", "--prompt", "a"], capsys)


def test_outputs_are_never_overwritten_without_force(run_dir, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/notes.txt").write_text("mine")
    assert "--out" in error_of(["export-hf", "--run", str(run_dir), "--out", str(tmp_path / "hf")], capsys)
    assert main(["export-hf", "--run", str(run_dir), "--out", str(tmp_path / "hf"), "--force"]) == 0
    assert (tmp_path / "hf/notes.txt").read_text() == "mine" and (tmp_path / "hf/config.json").is_file()
    trainer_checkpoint = (run_dir / "ckpt_000001.pt").read_bytes()
    argv = ["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(run_dir / "ckpt_000001.pt")]
    assert "add --force" in error_of(argv, capsys)
    new = ["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(run_dir / "new.pt")]
    assert f"--tokenizer-out {run_dir / 'tokenizer'} exists" in error_of(new, capsys)  # the default: beside --out
    assert (run_dir / "ckpt_000001.pt").read_bytes() == trainer_checkpoint
    assert main([*argv, "--force"]) == 0 and load_model(run_dir / "ckpt_000001.pt").config.num_kv_heads == 2


def test_foreign_checkpoints_give_one_error_line(run_dir, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    torch.save({"model": Evil(), "model_config": {}}, tmp_path / "evil.pt")
    (tmp_path / "text.pt").write_text("hello")
    good = (run_dir / "ckpt_000002.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    tok = ["--tokenizer", str(run_dir / "tokenizer")]
    for name, message in [("evil", "refused"), ("text", "not a torch.save file"), ("cut", "cut short")]:
        for argv in (["export-hf", "--out", str(tmp_path / "hf")], ["sample", "--prompt", "a"]):
            err = error_of([*argv, "--checkpoint", str(tmp_path / f"{name}.pt"), *tok], capsys)
            assert message in err and "weights_only" not in err
    save_checkpoint(tmp_path / "post.pt", norm="post", vocab_size=260)
    argv = ["export-hf", "--checkpoint", str(tmp_path / "post.pt"), *tok, "--out", str(tmp_path / "hf")]
    assert "only Llama blocks export" in error_of(argv, capsys) and not (tmp_path / "hf").exists()


def test_import_of_broken_directories_gives_one_error_line(run_dir, tmp_path, capsys):
    assert main(["export-hf", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    hf, argv = tmp_path / "hf", ["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "o.pt")]
    config = (hf / "config.json").read_text()
    (hf / "config.json").write_text(config[:50])
    assert "config.json is not valid JSON" in error_of(argv, capsys)
    (hf / "config.json").write_text(json.dumps({**json.loads(config), "hidden_size": "32"}))
    assert "needs hidden_size as positive integers" in error_of(argv, capsys)
    (hf / "config.json").write_text(config)
    weights = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "model.safetensors is not a readable safetensors file" in error_of(argv, capsys)
    (hf / "model.safetensors").unlink()
    (tmp_path / "outside.safetensors").write_bytes(weights)
    index = {"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "names the shard '../outside.safetensors', which is not a file in" in error_of(argv, capsys)
    assert not (tmp_path / "o.pt").exists()


def test_the_model_package_imports_no_tokenizer():
    code = "import sys; import smollm_stack.model, smollm_stack.model.hf, smollm_stack.model.generate; "
    code += "print(sorted(m for m in sys.modules if m.startswith('smollm_stack.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "smollm_stack.model.hf" in result.stdout and "smollm_stack.tokenizer" not in result.stdout
