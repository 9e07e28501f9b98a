"""Hugging Face interop: our export loads in transformers' LlamaForCausalLM with equal logits, and imports back."""

import json

import pytest
import torch

from smollm_stack.model import ModelConfig, TransformerLM
from smollm_stack.model.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")


def make_model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=67, context_length=32, d_model=32, num_layers=2, num_heads=4, rope_theta=500.0)
    model = TransformerLM(ModelConfig(**{**kwargs, **overrides}, kernels="eager"))
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
    back = import_hf(tmp_path / "a", kernels="eager")
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
    model = import_hf(tmp_path, kernels="eager")
    assert model.config.tie_embeddings and model.config.norm_eps == config.rms_norm_eps
    ids = torch.randint(0, 67, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_exports_and_imports_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="only Llama blocks export"):
        export_hf(make_model(norm="post"), tmp_path)
    with pytest.raises(ValueError, match="no value_embeddings"):  # Llama has no such tables
        export_hf(make_model(value_embeddings=True), tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf(tmp_path)
