"""The model with backend="triton" against backend="eager": same weights, same loss, same gradient for every parameter.

On a CPU the Triton side runs under the interpreter, so the model is tiny (but every routed op is exercised: RMSNorm,
SwiGLU, RoPE, attention and the fused loss, with grouped-query heads, a length of 23 that ends every kernel's blocks
ragged, and some ignored targets). Tolerances: conftest's fp32 row, the backends' fp32 math in another order.
"""

import pytest
import torch

from conftest import assert_close
from smollm_stack.model import ModelConfig, TransformerLM

pytestmark = pytest.mark.usefixtures("poison_outputs")


@pytest.mark.parametrize("norm,ffn", [("pre", "swiglu"), ("post", "silu")])
def test_triton_model_matches_eager(norm, ffn):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    common = dict(vocab_size=97, context_length=24, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  d_ff=80, norm=norm, ffn=ffn)  # fmt: skip
    eager = TransformerLM(ModelConfig(**common, backend="eager")).to(device)
    triton = TransformerLM(ModelConfig(**common, backend="triton")).to(device)
    triton.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (2, 23), device=device)
    targets = torch.randint(0, 97, (2, 23), device=device)
    targets[:, :3] = -100

    losses = []
    for model in (eager, triton):
        loss = model(ids, targets)
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[1], losses[0], torch.float32, scale=1.0)  # a loss in nats: atol relative to one nat
    grads = dict(eager.named_parameters())
    for name, p in triton.named_parameters():
        # atol relative to each gradient's largest element: each is a sum over tokens, whose terms may cancel.
        assert_close(p.grad, grads[name].grad, torch.float32, msg=name)
