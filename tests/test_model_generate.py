"""Generation: the KV cache against the full forward, greedy and nucleus sampling, seeds, stopping and errors."""

import pytest
import torch

from model import ModelConfig, TransformerLM, generate
from model.generate import sample_next, top_p_filter


def make_model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=61, context_length=24, d_model=32, num_layers=2, num_heads=4, kernels="eager")
    return TransformerLM(ModelConfig(**{**kwargs, **overrides}))


@pytest.mark.parametrize("overrides", [{}, dict(num_kv_heads=2), dict(norm="post"), dict(position="nope")])
def test_kv_cache_decoding_equals_full_forward(overrides):
    model = make_model(**overrides)
    ids = torch.randint(0, 61, (2, 20))
    full = model(ids)
    caches = model.make_kv_caches(batch_size=2, max_len=20)
    with torch.inference_mode():
        steps = [model(ids[:, :7], kv_caches=caches)]  # prefill
        steps += [model(ids[:, t : t + 1], kv_caches=caches) for t in range(7, 15)]  # one token at a time
        steps.append(model(ids[:, 15:], kv_caches=caches))  # a chunk after decoding
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 20 tokens"):
        model(ids[:, :1], kv_caches=caches)


def test_greedy_generation_equals_argmax_of_the_full_forward():
    model = make_model(num_kv_heads=2)
    prompt = [3, 1, 4, 1, 5]
    ids = list(prompt)
    for _ in range(10):  # no cache: rerun the whole sequence each step
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert generate(model, prompt, 10, temperature=0) == ids[len(prompt) :]
    assert generate(model, torch.tensor(prompt), 10, temperature=1.0, top_p=1e-6, seed=1) == ids[len(prompt) :]
    eos = ids[len(prompt) + 3]
    assert generate(model, prompt, 10, temperature=0, eos_id=eos) == ids[len(prompt) : ids.index(eos, len(prompt))]


def test_sampling_is_seeded():
    model = make_model()
    a, b = generate(model, [1, 2], 15, seed=7), generate(model, [1, 2], 15, seed=7)
    assert a == b and len(a) == 15
    assert generate(model, [1, 2], 15, seed=8) != a


def test_top_p_filter_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3]])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.625, 0.375], [0.0, 2 / 3, 1 / 3]]))
    torch.testing.assert_close(top_p_filter(probs, 0.5), torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)


def test_sample_next_follows_the_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    counts = torch.bincount(torch.stack([sample_next(logits, 1.0, 1.0, generator) for _ in range(4000)]), minlength=4)
    torch.testing.assert_close(counts / 4000, torch.softmax(logits, 0), atol=0.03, rtol=0)
    counts = torch.bincount(torch.stack([sample_next(logits, 0.5, 0.9, generator) for _ in range(500)]), minlength=4)
    assert counts[0] == counts[3] == 0  # sharpened to [0.016, 0.117, 0.865, 0.002]: the top 2 make the 0.9 nucleus
    assert sample_next(logits, 0.0, 1.0, generator).item() == 2


def test_generate_rejects_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="5 prompt \\+ 20 new tokens must fit the context length 24"):
        generate(model, [1, 2, 3, 4, 5], 20)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match="temperature >= 0 and 0 < top_p <= 1"):
        generate(model, [1], 5, top_p=0.0)
    assert generate(model, [1] * 24, 0) == []
