"""Hugging Face interop: our export loads in transformers' LlamaForCausalLM with equal logits, and imports back;
a model with value embeddings loads through its own modeling file (trust_remote_code) and generates as ours."""

import ast
import dataclasses
import json

import pytest
import torch

from smollm_stack.model import ModelConfig, TransformerLM
from smollm_stack.model.generate import generate
from smollm_stack.model.hf import REMOTE_CODE, export_hf, import_hf

transformers = pytest.importorskip("transformers")


def make_model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=67, context_length=32, d_model=32, num_layers=2, num_heads=4, rope_theta=500.0)
    model = TransformerLM(ModelConfig(**{**kwargs, **overrides}, backend="eager"))
    with torch.no_grad():  # gains other than 1, so a misplaced norm shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("overrides", [{}, dict(num_kv_heads=2), dict(num_kv_heads=1, tie_embeddings=True)])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, overrides):
    model = make_model(**overrides, norm_eps=1e-6)
    export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == model.config.num_kv_heads
    ids = torch.randint(0, 67, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def test_import_export_round_trip(tmp_path):
    model = make_model(num_kv_heads=2)
    export_hf(model, tmp_path / "a")
    back = import_hf(tmp_path / "a", backend="eager")
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    export_hf(back, tmp_path / "b")
    assert json.loads((tmp_path / "a/config.json").read_text()) == json.loads((tmp_path / "b/config.json").read_text())
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_import_of_a_transformers_model(tmp_path):
    """A checkpoint written by transformers itself (not by us) imports with equal logits."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=67,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rope_theta=500.0,
        tie_word_embeddings=True,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    model = import_hf(tmp_path, backend="eager")
    assert model.config.tie_embeddings and model.config.norm_eps == config.rms_norm_eps
    ids = torch.randint(0, 67, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def perturbed_preset(vocab_size: int) -> TransformerLM:
    """The default preset's model (value embeddings, zero-initialized residual matrices) with every weight moved,
    so that each block, and each value embedding, changes the logits."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.preset("tiny", vocab_size=vocab_size, context_length=48, backend="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for table in model.value_embeddings:
            table.weight.mul_(0.2)  # std 0.2: values of the size v_proj gives, so the order of a few logits turns
    return model


def load_remote(path, monkeypatch):
    """transformers' AutoModelForCausalLM for an export with its own code, that code cached under path."""
    modules = transformers.dynamic_module_utils
    monkeypatch.setattr(modules, "HF_MODULES_CACHE", str(path / "modules"))  # not ~/.cache
    monkeypatch.syspath_prepend(path / "modules")
    auto = transformers.AutoModelForCausalLM
    return auto.from_pretrained(path / "hf", trust_remote_code=True, dtype=torch.float32).eval()


def test_value_embeddings_export_generates_as_ours(tmp_path, monkeypatch):
    """The default preset's model: transformers' greedy generate (KV cache, one new token a forward) draws our
    greedy tokens, and each step's logits equal our full forward's on the same sequence."""
    model = perturbed_preset(vocab_size=97)
    export_hf(model, tmp_path / "hf", {"eos_token_id": 0})
    assert (tmp_path / "hf" / REMOTE_CODE).is_file()
    hf = load_remote(tmp_path, monkeypatch)
    assert type(hf).__name__ == "SmolLMStackForCausalLM" and len(hf.model.value_embeddings) == 4
    prompt = [5, 17, 33, 2, 90]
    ours = generate(model, prompt, 24, temperature=0)  # no eos_id: every step
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                      output_logits=True, return_dict_in_generate=True)  # fmt: skip
    assert out.sequences[0, len(prompt) :].tolist() == ours
    assert len(set(ours)) > 3  # not a constant (a model the value embeddings don't reach would hardly vary)
    with torch.no_grad():
        full = model(out.sequences[:, :-1])[0, len(prompt) - 1 :]  # (24, V): the logits before each new token
    # fp32 sums of a few hundred terms of size ~1 in a different order: ~1e-6 apart
    torch.testing.assert_close(torch.cat(out.logits), full, atol=1e-4, rtol=1e-4)


def test_value_embeddings_round_trip_and_plain_llama_unchanged(tmp_path):
    model = perturbed_preset(vocab_size=61)
    export_hf(model, tmp_path / "ve")
    back = import_hf(tmp_path / "ve", backend="eager")
    assert back.config == dataclasses.replace(model.config, zero_init_residual=False)  # an init, not in the weights
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    config = json.loads((tmp_path / "ve/config.json").read_text())
    assert config["model_type"] == "smollm_stack" and config["auto_map"]["AutoModelForCausalLM"].endswith("LM")
    export_hf(make_model(), tmp_path / "llama")  # no value embeddings: Llama's directory, no code of ours
    assert sorted(p.name for p in (tmp_path / "llama").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]  # fmt: skip
    assert json.loads((tmp_path / "llama/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_remote_code_imports_only_torch_and_transformers():
    """The exported modeling file must run where smollm_stack is not installed."""
    from smollm_stack.model import hf

    tree = ast.parse((hf.Path(hf.__file__).with_name("hf_modeling.py")).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} == {"torch", "transformers"}


def test_bad_exports_and_imports_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="only Llama blocks export, and this model has norm='post': .* norm='pre'"):
        export_hf(make_model(norm="post"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf(tmp_path)
