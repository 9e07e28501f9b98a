"""The model with kernels="triton" against kernels="eager": same weights, same loss, same gradient for every parameter.

On a CPU the Triton side runs under the interpreter, so the model is tiny (but every routed op is exercised: RMSNorm,
SwiGLU, RoPE, attention and the fused loss, with grouped-query heads and some ignored targets).
"""

import pytest
import torch

from model import ModelConfig, TransformerLM


@pytest.mark.parametrize("norm,ffn", [("pre", "swiglu"), ("post", "silu")])
def test_triton_model_matches_eager(norm, ffn):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    common = dict(vocab_size=97, context_length=24, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  d_ff=80, norm=norm, ffn=ffn)  # fmt: skip
    eager = TransformerLM(ModelConfig(**common, kernels="eager")).to(device)
    triton = TransformerLM(ModelConfig(**common, kernels="triton")).to(device)
    triton.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (2, 24), device=device)
    targets = torch.randint(0, 97, (2, 24), device=device)
    targets[:, :3] = -100

    losses = []
    for model in (eager, triton):
        loss = model(ids, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1.3e-6, atol=1e-6)
    grads = dict(eager.named_parameters())
    for name, p in triton.named_parameters():
        ref = grads[name].grad
        # fp32 tolerance, absolute part scaled to the gradient's size (each is a sum over tokens).
        torch.testing.assert_close(p.grad, ref, rtol=1.3e-6, atol=2e-6 * ref.abs().max().item(), msg=name)
