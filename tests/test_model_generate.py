"""Generation: the KV cache against the full forward, greedy, top-k and nucleus sampling, seeds, stopping, batches
of unequal prompts, streaming, host syncs and errors."""

import pytest
import torch

from smollm_stack.model import ModelConfig, TransformerLM, generate
from smollm_stack.model.generate import generate_batch, sample_next, stream, top_k_filter, top_p_filter


def make_model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=61, context_length=24, d_model=32, num_layers=2, num_heads=4, backend="eager")
    return TransformerLM(ModelConfig(**{**kwargs, **overrides}))


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(num_kv_heads=2), dict(norm="post"), dict(position="nope"), dict(value_embeddings=True, num_kv_heads=2)],
)
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
    with pytest.raises(ValueError, match="temperature >= 0, 0 < top_p <= 1 and top_k >= 0"):
        generate(model, [1], 5, top_p=0.0)
    with pytest.raises(ValueError, match="top_k >= 0"):
        generate(model, [1], 5, top_k=-1)
    with pytest.raises(ValueError, match="7 prompt \\+ 20 new tokens"):
        generate_batch(model, [[1], [2] * 7], 20)
    assert generate(model, [1] * 24, 0) == []
    for limit in (0, 62):
        with pytest.raises(ValueError, match=f"vocab_limit must be in \\[1, vocab_size 61\\], got {limit}"):
            generate(model, [1], 5, vocab_limit=limit)


def test_a_padded_vocabulary_is_never_sampled_beyond_the_limit():
    """Ids from vocab_limit up (a model vocabulary padded beyond its tokenizer's) are never drawn, even where they
    are the likeliest; below it, the draws are those of a model without the padded ids."""
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight[40:] *= 50  # the padded ids dominate
    assert max(generate(model, [1, 2], 12, temperature=0)) >= 40  # without the limit, padded ids come
    for sampling in (dict(temperature=0), dict(top_k=5, seed=0), dict(top_p=0.9, seed=1), dict(seed=2)):
        ids = generate_batch(model, [[1, 2], [3]], 12, vocab_limit=40, **sampling)
        assert max(max(row) for row in ids) < 40, sampling
    cut = make_model(vocab_size=40)
    with torch.no_grad():  # the same weights without the padded rows
        cut.load_state_dict({k: v[:40] if v.shape[0] == 61 else v for k, v in model.state_dict().items()})
    assert generate(model, [1, 2], 12, vocab_limit=40, seed=3) == generate(cut, [1, 2], 12, seed=3)


def test_top_k_keeps_exactly_k_candidates():
    probs = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    kept = top_k_filter(probs, 7)
    assert (kept > 0).sum(dim=-1).tolist() == [7, 7, 7]
    torch.testing.assert_close(kept.sum(dim=-1), torch.ones(3))
    assert torch.equal(kept.topk(7).indices.sort().values, probs.topk(7).indices.sort().values)
    ties = top_k_filter(torch.full((2, 5), 0.2), 2)  # five equal candidates: still exactly two survive
    assert (ties > 0).sum(dim=-1).tolist() == [2, 2] and ties.max() == 0.5
    assert torch.equal(top_k_filter(probs, 99), probs / probs.sum(dim=-1, keepdim=True))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(torch.log(probs), 1.0, 1.0, generator, top_k=2) for _ in range(200)])
    assert set(draws.flatten().tolist()) <= set(probs.topk(2).indices.flatten().tolist())


@pytest.mark.parametrize("overrides", [{}, dict(num_kv_heads=2), dict(position="nope", norm="post")])
def test_a_batch_of_unequal_prompts_equals_one_by_one(overrides):
    model = make_model(**overrides)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [5], [8, 9, 7, 9, 3]]
    alone = [generate(model, p, 12, temperature=0) for p in prompts]
    eos = alone[1][4]  # ends row 1 early, and any other row that greedily reaches the same token
    alone_eos = [generate(model, p, 12, temperature=0, eos_id=eos) for p in prompts]
    assert generate_batch(model, prompts, 12, temperature=0) == alone
    assert generate_batch(model, prompts, 12, temperature=0, eos_id=eos) == alone_eos
    assert len(alone_eos[1]) == alone[1].index(eos) < 12


def test_the_padding_mask():
    """Causal, blind to each row's padding, and no query without a key (an empty row is NaN in some backends)."""
    model = make_model()
    cache = model.make_kv_caches(2, 5)[0]
    cache.update(torch.zeros(2, 4, 4, 8), torch.zeros(2, 4, 4, 8))
    cache.pad = torch.tensor([0, 2])
    mask = cache.attention_mask(2)[:, 0]  # the last 2 of 4 queries
    assert mask.tolist() == [[[1, 1, 1, 0], [1, 1, 1, 1]], [[0, 0, 1, 0], [0, 0, 1, 1]]]
    assert cache.attention_mask(4)[1, 0, :2].any(-1).all()  # padding queries see the padding before them


def test_streaming_equals_generating():
    model = make_model(num_kv_heads=2)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]
    eos = generate(model, prompts[0], 10, temperature=0)[6]
    steps = list(stream(model, prompts, 10, temperature=0, eos_id=eos))
    batch = generate_batch(model, prompts, 10, temperature=0, eos_id=eos)
    assert [[t for t in column if t is not None] for column in zip(*steps)] == batch
    assert all(any(t is not None for t in step) for step in steps)
    assert len(list(stream(model, prompts[:1], 10, temperature=0, eos_id=eos))) == 6  # it stops once all have ended
    sampled = [step[0] for step in stream(model, [prompts[0]], 10, temperature=0.9, top_k=5, seed=3)]
    assert sampled == generate(model, prompts[0], 10, temperature=0.9, top_k=5, seed=3)


def test_one_host_sync_per_generated_token(monkeypatch):
    """Every way Python reads a tensor's value back is counted: one per step, the step's tolist."""
    model = make_model(num_kv_heads=2)
    reads = []

    def counted(name, original):
        return lambda self, *args, **kwargs: reads.append(name) or original(self, *args, **kwargs)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    out = generate_batch(model, [[1, 2, 3], [4]], 9, temperature=0.7, top_k=10, top_p=0.9, seed=0)
    assert len(out[0]) == 9 and reads == ["tolist"] * 9
