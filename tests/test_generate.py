"""Generation: cache equivalence, greedy parity with transformers, batching, stopping, bad input."""

import io

import pytest
import torch

from camelid import KVCache, LlamaConfig, LlamaForCausalLM
from camelid import TextStreamer
from camelid.generation.generate import generate, generate_tokens
from camelid.generation.sampling import SamplingParams


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
    return LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="float32")  # parity work: dequantized


# ---------------------------------------------------------------------- cache equivalence

def _batch(seed, padded):
    """Two rows of 17 random tokens; with padded=True the second row has 4 tokens of left padding."""
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    return ids, mask


@pytest.mark.parametrize("split", [1, 5, 11, 16])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_with_cache_equals_full_forward(tiny, split, padded):
    ids, mask = _batch(split, padded)
    with torch.no_grad():
        full = tiny(ids, attention_mask=mask).logits
        cache = KVCache(tiny.config, 2, 17)
        a = tiny(ids[:, :split], attention_mask=mask[:, :split], cache=cache,
                 cache_position=torch.arange(split)).logits
        b = tiny(ids[:, split:], attention_mask=mask, cache=cache, cache_position=torch.arange(split, 17)).logits
    got = torch.cat([a, b], dim=1)
    real = mask.bool()
    assert (got - full).abs()[real].max() <= 1e-4


def test_int8_cache_codes_are_within_half_a_step():
    from camelid.core.cache import Int8KVCache

    x = torch.randn(2, 3, 7, 16) * torch.tensor([0.01, 1.0, 50.0])[None, :, None, None]
    x[0, 0, 0] = 0.0  # an all-zero vector: scale stays finite, codes 0
    q, scale = Int8KVCache.quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 7, 1)
    assert bool(((q.float() * scale - x).abs() <= scale / 2 * (1 + 1e-6)).all())
    assert bool((q[0, 0, 0] == 0).all()) and torch.isfinite(scale).all()


@pytest.mark.parametrize("padded", [False, True])
def test_int8_cache_decoding_is_close_to_the_float_cache(tiny, padded):
    from camelid.core.cache import Int8KVCache

    ids, mask = _batch(3, padded)
    with torch.no_grad():
        full = tiny(ids, attention_mask=mask).logits
        cache = Int8KVCache(tiny.config, 2, 17)
        a = tiny(ids[:, :9], attention_mask=mask[:, :9], cache=cache, cache_position=torch.arange(9)).logits
        steps = [tiny(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                      cache_position=torch.tensor([t])).logits for t in range(9, 17)]
    got = torch.cat([a, *steps], dim=1)
    real = mask.bool()
    err = float((got - full).abs()[real].max() / full.abs()[real].max())
    assert 1e-7 < err < 0.02, err  # lossy, but by a quantization step, not more
    assert cache.nbytes() < KVCache(tiny.config, 2, 17).nbytes() * 0.35


def test_generate_with_a_quantized_cache(tiny):
    ids, mask = _left_pad([[5, 17, 3, 44], [9, 1]])
    eos = [int(next(generate_tokens(tiny, ids[1:, 2:], max_new_tokens=4)).tokens[0])]  # row 1 stops first
    out = tiny.generate(ids, attention_mask=mask, max_new_tokens=12, cache_implementation="quantized",
                        eos_token_id=eos, pad_token_id=0)
    ref = tiny.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert out.shape == ref.shape and float((out == ref).float().mean()) > 0.8  # rows leave the int8 cache too
    with pytest.raises(ValueError, match="cache_implementation"):
        tiny.generate(ids, max_new_tokens=2, cache_implementation="offloaded")
    with pytest.raises(ValueError, match="cache_dtype"):
        next(generate_tokens(tiny, ids, max_new_tokens=2, cache_dtype="int4"))
    with pytest.raises(ValueError, match="speculative"):
        tiny.generate(ids[:1], max_new_tokens=2, cache_implementation="quantized", prompt_lookup_num_tokens=2)


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


# ---------------------------------------------------------------------- batch invariance, compaction, logprobs

CHAT_QUESTIONS = ["What is 2+2?", "Name three colors.", "Write a haiku about the sea.", "Who wrote Hamlet?",
                  "Explain gravity in one sentence.", "List the planets.", "What is the capital of France?",
                  "Tell me a joke about cats.", "How do I boil an egg?", "Translate 'hello' to Spanish.",
                  "What is Python?", "Give me a synonym for happy.", "Why is the sky blue?",
                  "Count from one to ten.", "Describe a tree.", "What is 7 times 8?"]


@pytest.fixture(scope="module")
def tiny_packed():
    from camelid.transforms import packed

    if not packed.available():
        pytest.skip("torch built without oneDNN")
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return packed.pack(model.eval())


def _left_pad(rows, pad=0):
    width = max(map(len, rows))
    return (torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))


def test_batched_log_probabilities_are_bit_identical_to_each_row_alone(tiny_packed):
    """Not just the same tokens: the same bits, at every batch size and order (packed linears give
    row results independent of the row count; attention_plan gives each row its own keys)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 14, (9,), generator=g)]

    def run(rows):
        ids, mask = _left_pad(rows)
        steps = list(generate_tokens(tiny_packed, ids, mask, max_new_tokens=10, logprobs=3))
        return [torch.stack([s.top_logprobs[k] for s in steps]) for k in range(len(rows))]

    alone = [run([p])[0] for p in prompts]
    for size in (2, 3, 4, 5, 9):
        order = torch.randperm(9, generator=g)[:size].tolist()
        for k, got in enumerate(run([prompts[i] for i in order])):
            assert torch.equal(got, alone[order[k]]), (size, order, k)


@pytest.mark.slow
def test_batch_invariance_on_the_default_model_at_sizes_1_to_16(model, smollm2_tokenizer):
    """Greedy output of a batch equals each prompt alone, token for token, for every batch size
    from 1 to 16 with the prompts in a shuffled order."""
    import random

    prompts = [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS]
    alone = [generate(model, smollm2_tokenizer, [p], max_new_tokens=20, chat=True)[0].tokens for p in prompts]
    rng = random.Random(0)
    for size in range(1, 17):
        order = rng.sample(range(16), size)
        out = generate(model, smollm2_tokenizer, [prompts[i] for i in order], max_new_tokens=20, chat=True)
        assert [c.tokens for c in out] == [alone[i] for i in order], f"batch of {size}: {order}"


def test_finished_rows_leave_the_batch(tiny_packed):
    prompts = [[5, 17, 3], [9, 1, 44, 60, 2], [70, 8]]
    free = [[s.tokens[0].item() for s in generate_tokens(tiny_packed, torch.tensor([p]), max_new_tokens=8)]
            for p in prompts]
    eos = free[1][2]  # row 1 stops on its first emission of this token
    stop = free[1].index(eos)
    assert eos not in free[0] and eos not in free[2], "pick prompts whose other rows never emit it"
    sizes = []
    real_forward = tiny_packed.forward

    def counting_forward(*args, **kwargs):
        sizes.append((args[0] if args else kwargs["input_ids"]).shape[0])
        return real_forward(*args, **kwargs)

    tiny_packed.forward = counting_forward
    try:
        ids, mask = _left_pad(prompts)
        steps = list(generate_tokens(tiny_packed, ids, mask, max_new_tokens=8, eos_token_ids=[eos], pad_token_id=0))
    finally:
        del tiny_packed.forward
    assert sizes == [3] + [3] * stop + [2] * (7 - stop)  # prefill, decode at 3 rows, then at 2
    assert steps[stop].reasons == [None, "stop", None] and steps[-1].reasons == ["length", None, "length"]
    for k in (0, 2):
        assert [s.tokens[k].item() for s in steps] == free[k]
    assert [s.tokens[1].item() for s in steps][stop + 1:] == [0] * (7 - stop)  # padding after its stop


def test_halted_rows_leave_the_batch(tiny_packed):
    """A caller (generate's stop strings, a server whose client left) ends a row between steps."""
    prompts = [[5, 17, 3], [9, 1, 44, 60, 2], [70, 8]]
    free = [[s.tokens[0].item() for s in generate_tokens(tiny_packed, torch.tensor([p]), max_new_tokens=8)]
            for p in prompts]
    sizes, real_forward = [], tiny_packed.forward
    tiny_packed.forward = lambda *a, **k: (sizes.append(a[0].shape[0]), real_forward(*a, **k))[1]
    halted, got = set(), []
    try:
        ids, mask = _left_pad(prompts)
        for i, step in enumerate(generate_tokens(tiny_packed, ids, mask, max_new_tokens=8, pad_token_id=0,
                                                 halted=halted)):
            got.append(step.tokens.tolist())
            if i == 2:
                halted.add(0)
    finally:
        del tiny_packed.forward
    assert sizes == [3, 3, 3, 2, 2, 2, 2, 2]  # prefill, 2 steps at 3 rows, then row 0 is gone
    assert [g[0] for g in got] == free[0][:3] + [0] * 5
    assert [g[1] for g in got] == free[1] and [g[2] for g in got] == free[2]


def test_a_stop_string_ends_its_row_early(tiny, monkeypatch):
    """generate() hands rows a stop string ended to generate_tokens, which stops computing them."""
    import camelid.generation.generate as gen

    seen = []
    real = gen.generate_tokens

    def spy(*args, **kwargs):
        for step in real(*args, **kwargs):
            seen.append(step.finished.tolist())
            yield step

    class Tok:  # one character per token id: text positions are token positions
        eos_token_ids, pad_token_id, eos_token_id = [96], 0, 96
        encode = staticmethod(lambda text: [ord(c) % 90 + 1 for c in text])
        decode = staticmethod(lambda ids, *args, **kw: "".join(chr(33 + i % 90) for i in ids))

    monkeypatch.setattr(gen, "generate_tokens", spy)
    free = gen.generate(tiny, Tok, ["hello", "abc"], max_new_tokens=12)
    stop = free[0].text[3:5]
    seen.clear()
    out = gen.generate(tiny, Tok, ["hello", "abc"], max_new_tokens=12, stop=[stop])
    assert out[0].text == free[0].text[:free[0].text.index(stop)] and out[0].finish_reason == "stop"
    assert len(seen) == 12 and seen[6][0]  # row 0 is finished in the generator soon after its stop


def test_logprobs_are_the_log_softmax_of_the_full_forward(tiny):
    ids = torch.tensor([[5, 17, 3, 9]])
    steps = list(generate_tokens(tiny, ids, max_new_tokens=6, logprobs=4))
    new = torch.tensor([[s.tokens[0].item() for s in steps]])
    with torch.no_grad():
        ref = tiny(torch.cat([ids, new], 1)).logits[0, 3:-1].log_softmax(-1)
    for t, s in enumerate(steps):
        assert torch.allclose(s.logprobs[0], ref[t, new[0, t]], atol=1e-5)
        top, top_ids = ref[t].topk(4)
        assert torch.allclose(s.top_logprobs[0], top, atol=1e-5) and torch.equal(s.top_ids[0], top_ids)
        assert s.top_ids[0, 0] == s.tokens[0]  # greedy takes the most likely token
    assert steps[0].top_logprobs.shape == (1, 4)
    no_top = next(generate_tokens(tiny, ids, max_new_tokens=1, logprobs=0))
    assert no_top.logprobs is not None and no_top.top_logprobs is None
    assert next(generate_tokens(tiny, ids, max_new_tokens=1)).logprobs is None


@pytest.mark.parametrize("n", [-1, 2.5, 10 ** 6])
def test_bad_logprobs_count(tiny, n):
    with pytest.raises(ValueError, match="top_n"):
        next(generate_tokens(tiny, torch.tensor([[5, 17]]), max_new_tokens=1, logprobs=n))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own use of torch.jit
def test_compiled_decode_gives_the_eager_tokens(tiny):
    """compile=True runs the decode steps through torch.compile: same greedy tokens, one compiled
    module per model, batches that shrink as rows finish included."""
    from camelid.generation.generate import compiled_decoder

    ids, mask = _left_pad([[5, 17, 3, 44], [9, 1], [70, 8, 2]])
    eos = [int(generate_tokens(tiny, ids[:1], max_new_tokens=6).__next__().tokens[0])]  # row 0 stops at once
    eager = [s.tokens.tolist() for s in generate_tokens(tiny, ids, mask, max_new_tokens=12, eos_token_ids=eos)]
    compiled = [s.tokens.tolist() for s in generate_tokens(tiny, ids, mask, max_new_tokens=12, eos_token_ids=eos,
                                                           compile=True)]
    assert compiled == eager
    assert compiled_decoder(tiny) is compiled_decoder(tiny)


def test_compile_refuses_a_packed_model(tiny_packed):
    with pytest.raises(ValueError, match="pack=False"):
        next(generate_tokens(tiny_packed, torch.tensor([[1, 2, 3]]), max_new_tokens=2, compile=True))
