"""Generation: cache equivalence, greedy parity with transformers, batching, stopping, bad input."""

import io

import pytest
import torch

from camelid import KVCache, LlamaConfig, LlamaForCausalLM
from camelid.generate import TextStreamer, generate, generate_tokens
from camelid.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48))
    for p in model.parameters():  # larger weights: a peaked, prompt-dependent next-token distribution
        p.data.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return LlamaForCausalLM.from_pretrained(smollm2_gguf)


# ---------------------------------------------------------------------- cache equivalence

@pytest.mark.parametrize("split", [1, 5, 11, 16])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_with_cache_equals_full_forward(tiny, split, padded):
    g = torch.Generator().manual_seed(split)
    ids = torch.randint(0, 97, (2, 17), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    with torch.no_grad():
        full = tiny(ids, attention_mask=mask).logits
        cache = KVCache(tiny.config, 2, 17)
        a = tiny(ids[:, :split], attention_mask=mask[:, :split], cache=cache,
                 cache_position=torch.arange(split)).logits
        b = tiny(ids[:, split:], attention_mask=mask, cache=cache, cache_position=torch.arange(split, 17)).logits
    got = torch.cat([a, b], dim=1)
    real = mask.bool()
    assert (got - full).abs()[real].max() <= 1e-4


# ---------------------------------------------------------------------- greedy parity on the real model

@pytest.mark.slow
def test_greedy_equals_transformers_generate_for_64_tokens(model, smollm2_gguf, smollm2_tokenizer):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32).eval()
    for prompt in ["The history of the Roman Empire", "def quicksort(items):", "Once upon a time, in a small"]:
        ids = torch.tensor([smollm2_tokenizer.encode(prompt)])
        ours = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                                 do_sample=False, pad_token_id=2)
        assert ours.shape[1] == ids.shape[1] + 64
        assert ours.tolist() == theirs.tolist(), prompt


def test_chat_answer_and_streamer(model, smollm2_tokenizer):
    out = io.StringIO()
    prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   add_generation_prompt=True, return_tensors="pt")
    ids = model.generate(prompt, max_new_tokens=16, streamer=TextStreamer(smollm2_tokenizer, skip_prompt=True, file=out))
    text = smollm2_tokenizer.decode(ids[0, prompt.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text and out.getvalue().strip() == text.strip()


# ---------------------------------------------------------------------- batching

def test_padded_batch_generates_what_each_prompt_does_alone(tiny):
    prompts = [[5, 17, 3], [9, 1, 44, 60, 2, 7, 8], [70], [33, 33, 33, 12, 90]]
    alone = []
    for p in prompts:
        steps = list(generate_tokens(tiny, torch.tensor([p]), max_new_tokens=12))
        alone.append([s.tokens[0].item() for s in steps])
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        rows = [prompts[i] for i in order]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        steps = list(generate_tokens(tiny, ids, mask, max_new_tokens=12))
        for k, i in enumerate(order):
            assert [s.tokens[k].item() for s in steps] == alone[i], (order, i)


def test_batch_text_generation_matches_single(model, smollm2_tokenizer):
    prompts = ["The capital of France is", "Water boils at", "1, 2, 3, 4,"]
    batch = generate(model, smollm2_tokenizer, prompts, max_new_tokens=10)
    singles = [generate(model, smollm2_tokenizer, p, max_new_tokens=10)[0] for p in prompts]
    assert [c.tokens for c in batch] == [c.tokens for c in singles]


# ---------------------------------------------------------------------- stopping

def test_multiple_eos_ids_each_stop_their_row(tiny):
    ids = torch.tensor([[5, 17, 3]])
    free = [s.tokens[0].item() for s in generate_tokens(tiny, ids, max_new_tokens=10)]
    third = free[2]
    other = next(t for t in range(97) if t not in free)
    steps = list(generate_tokens(tiny, ids, max_new_tokens=10, eos_token_ids=[other, third]))
    assert len(steps) == free.index(third) + 1 and steps[-1].reasons == ["stop"]
    assert steps[-1].tokens[0].item() == third


def test_min_new_tokens_suppresses_eos(tiny):
    ids = torch.tensor([[5, 17, 3]])
    first = next(generate_tokens(tiny, ids, max_new_tokens=1)).tokens[0].item()
    steps = list(generate_tokens(tiny, ids, max_new_tokens=6, eos_token_ids=[first], min_new_tokens=3))
    assert len(steps) >= 3 and all(s.tokens[0].item() != first for s in steps[:3])


def test_stop_string_across_token_boundary_is_trimmed(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    free = generate(model, tok, "The capital of France is", max_new_tokens=12)[0]
    pieces = [tok.decode([t]) for t in free.tokens]
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    cut = free.text.index(stop)
    got = generate(model, tok, "The capital of France is", max_new_tokens=12, stop=[stop])[0]
    assert got.text == free.text[:cut] and got.finish_reason == "stop"
    streamed = []
    generate(model, tok, "The capital of France is", max_new_tokens=12, stop=[stop],
             on_text=lambda row, delta: streamed.append(delta))
    assert "".join(streamed) == free.text[:cut]


def test_context_limit_ends_with_length(tiny):
    ids = torch.randint(0, 97, (1, 45))
    steps = list(generate_tokens(tiny, ids, max_new_tokens=100))  # context 48: room for 3
    assert len(steps) == 3 and steps[-1].reasons == ["length"]


# ---------------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible(tiny):
    ids = torch.tensor([[5, 17, 3]])
    params = SamplingParams(do_sample=True, temperature=1.0, seed=1234)
    a = [s.tokens.item() for s in generate_tokens(tiny, ids, params=params, max_new_tokens=20)]
    b = [s.tokens.item() for s in generate_tokens(tiny, ids, params=params, max_new_tokens=20)]
    c = [s.tokens.item() for s in generate_tokens(tiny, ids, params=SamplingParams(do_sample=True, seed=99),
                                                  max_new_tokens=20)]
    assert a == b and a != c


def test_temperature_zero_is_greedy(tiny):
    ids = torch.tensor([[5, 17, 3]])
    greedy = [s.tokens.item() for s in generate_tokens(tiny, ids, max_new_tokens=8)]
    zero = [s.tokens.item() for s in generate_tokens(tiny, ids, max_new_tokens=8,
                                                     params=SamplingParams(do_sample=True, temperature=0.0))]
    assert greedy == zero


# ---------------------------------------------------------------------- bad input

def test_empty_prompt(tiny, smollm2_tokenizer, model):
    with pytest.raises(ValueError, match="non-empty prompt"):
        list(generate_tokens(tiny, torch.zeros(1, 0, dtype=torch.long)))
    with pytest.raises(ValueError, match="non-empty strings"):
        generate(model, smollm2_tokenizer, [""])


def test_prompt_longer_than_context(tiny):
    with pytest.raises(ValueError, match="context is 48"):
        list(generate_tokens(tiny, torch.zeros(1, 60, dtype=torch.long)))


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_max_new_tokens_must_be_positive(tiny, n):
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(generate_tokens(tiny, torch.tensor([[1, 2]]), max_new_tokens=n))


@pytest.mark.parametrize("kwargs,field", [({"temperature": -1.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                                          ({"top_k": -2}, "top_k"), ({"temperature": float("nan")}, "temperature"),
                                          ({"repetition_penalty": 0.0}, "repetition_penalty")])
def test_invalid_sampler_values(tiny, kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny.generate(torch.tensor([[1, 2]]), do_sample=True, **kwargs)


def test_stop_list_with_empty_string(model, smollm2_tokenizer):
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        generate(model, smollm2_tokenizer, "Hello", stop=["ok", ""])


def test_unknown_generate_kwarg(tiny):
    with pytest.raises(TypeError, match="num_beams"):
        tiny.generate(torch.tensor([[1, 2]]), num_beams=4)


def test_all_padding_row(tiny):
    with pytest.raises(ValueError, match="all padding"):
        list(generate_tokens(tiny, torch.tensor([[1, 2], [0, 0]]), torch.tensor([[1, 1], [0, 0]])))


def test_bad_words_as_transformers_lists(tiny):
    ids = torch.tensor([[5, 17, 3]])
    free = tiny.generate(ids, max_new_tokens=1)[0, -1].item()
    banned = tiny.generate(ids, max_new_tokens=1, bad_words_ids=[[free]])[0, -1].item()
    assert banned != free
