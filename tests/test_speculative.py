"""Speculative decoding: the exact tokens of greedy generate_tokens, with either drafter, on tiny
models of every attention flavour and on the real model; bookkeeping at EOS, max_new_tokens and
the context end; prompt lookup as transformers does it; bad input."""

import math

import pytest
import torch
from torch import nn

from camelid import KVCache, LlamaConfig, LlamaForCausalLM
from camelid.generation.generate import generate_tokens
from camelid.generation.sampling import SamplingParams
from camelid.generation.speculative import SpeculativeStats, prompt_lookup, rows_invariant, speculative_tokens, verify_logits


class RowwiseLinear(nn.Module):
    """A linear layer whose row results never depend on the row count (a product summed over the
    input per output): a test double for kernels that are row-invariant."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        y = (x.unsqueeze(-2) * self.weight).sum(-1)
        return y if self.bias is None else y + self.bias


class RowCountLinear(RowwiseLinear):
    """A linear layer that rounds rows differently when several are multiplied together (grossly:
    so that a verification that trusted it would pick other tokens)."""

    def forward(self, x):
        y = super().forward(x)
        if x.numel() // x.shape[-1] > 1:
            y = y + 0.5 * torch.sin(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
        return y


def swap_linears(model, wrap):
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if hasattr(child, "in_features"):
                setattr(module, name, wrap(child))
    return model


def tiny(seed=0, linear=RowwiseLinear, **overrides):
    torch.manual_seed(seed)
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))
    for p in model.parameters():  # larger weights: peaked, prompt-dependent, often repetitive text
        p.data.normal_(0, 0.3)
    return swap_linears(model, linear).eval() if linear else model.eval()


FLAVOURS = {
    "gqa-sdpa": {},
    "eager": dict(attn="eager"),
    "mha-bias": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "mqa": dict(num_key_value_heads=1),
    "alibi": dict(alibi=True),
    "dynamic-rope": dict(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def flavour(name, seed=0, linear=RowwiseLinear):
    fields = dict(FLAVOURS[name])
    attn = fields.pop("attn", "sdpa")
    return tiny(seed, linear, **fields).set_attn_implementation(attn)


def steps(it):
    return [(int(s.tokens), bool(s.finished), s.reasons[0]) for s in it]


def greedy(model, ids, n, eos=(), context=None):
    return steps(generate_tokens(model, ids, max_new_tokens=n, eos_token_ids=eos, context=context))


def speculative(model, ids, n, eos=(), context=None, stats=None, **drafter):
    return steps(speculative_tokens(model, ids, max_new_tokens=n, eos_token_ids=eos, context=context, stats=stats,
                                    **drafter))


PROMPT = torch.tensor([[5, 17, 3, 44, 60, 2, 7]])


# ---------------------------------------------------------------------- the verify forward is bitwise decode

@pytest.mark.parametrize("name", sorted(FLAVOURS))
def test_verify_logits_are_bitwise_the_decode_steps(name):
    model = flavour(name)
    assert rows_invariant(model, 6)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for start, T in [(8, 6), (20, 3), (24, 2)]:
            decoded, verified = KVCache(model.config, 1, 40), KVCache(model.config, 1, 40)
            for cache in (decoded, verified):
                model(ids[:, :start], cache=cache, cache_position=torch.arange(start))
            steps_ = torch.cat([model(ids[:, i:i + 1], cache=decoded, cache_position=torch.tensor([i])).logits[0]
                                for i in range(start, start + T)])
            got = verify_logits(model, ids[:, start:start + T], verified, start)
            assert torch.equal(got, steps_), (name, start, T, (got - steps_).abs().max())
            for a, b in zip(decoded.k + decoded.v, verified.k + verified.v):  # the K/V it writes, too
                assert torch.equal(a[:, :, :start + T], b[:, :, :start + T])


def test_verify_logits_are_bitwise_the_decode_steps_on_the_real_model(smollm2_gguf):
    """On the real model a plain forward over the rows is not (SDPA with a causal mask over several
    queries rounds otherwise, measured: up to 1e-4 in the logits); verify_logits is."""
    model = LlamaForCausalLM.from_pretrained(smollm2_gguf)
    if not rows_invariant(model, 6):
        pytest.skip("this machine's linear kernels round a row differently depending on the row count")
    ids = torch.randint(100, 40000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decoded, verified = KVCache(model.config, 1, 48), KVCache(model.config, 1, 48)
        for cache in (decoded, verified):
            model(ids[:, :30], cache=cache, cache_position=torch.arange(30))
        steps_ = torch.cat([model(ids[:, i:i + 1], cache=decoded, cache_position=torch.tensor([i])).logits[0]
                            for i in range(30, 36)])
        assert torch.equal(verify_logits(model, ids[:, 30:36], verified, 30), steps_)
        assert all(torch.equal(a, b) for a, b in zip(decoded.k + decoded.v, verified.k + verified.v))


# ---------------------------------------------------------------------- exactly greedy, tiny models

@pytest.mark.parametrize("name", sorted(FLAVOURS))
def test_both_drafters_give_the_greedy_tokens(name):
    model = flavour(name)
    context = 64 if name == "dynamic-rope" else None  # past the 16 positions: the frequencies change
    ref = greedy(model, PROMPT, 40, context=context)
    for drafter in (dict(prompt_lookup_num_tokens=4), dict(prompt_lookup_num_tokens=1, max_ngram_size=1),
                    dict(draft_model=model), dict(draft_model=flavour(name, seed=1), num_assistant_tokens=3)):
        assert speculative(model, PROMPT, 40, context=context, **drafter) == ref, drafter


def test_self_draft_accepts_everything_and_saves_forwards():
    model, stats = tiny(), SpeculativeStats()
    assert speculative(model, PROMPT, 25, stats=stats, draft_model=model, num_assistant_tokens=4) == \
        greedy(model, PROMPT, 25)
    # the prefill gives token 1; each round then drafts 4, accepts 4 and adds the target's own
    assert stats.acceptance_rate == 1.0 and stats.drafted == stats.accepted == 4 * 4 + 3
    assert stats.target_forwards == 1 + math.ceil(24 / 5)


def test_a_random_draft_is_rejected_and_still_exact():
    model, stats = tiny(), SpeculativeStats()
    bad = tiny(seed=7, linear=None, num_hidden_layers=1)
    assert speculative(model, PROMPT, 30, stats=stats, draft_model=bad) == greedy(model, PROMPT, 30)
    assert stats.drafted > 0 and stats.acceptance_rate < 0.3


def test_drafts_per_round_follow_the_acceptance():
    """A drafter that is always wrong gets one draft a round (rejected rows cost verify work);
    one that is always right keeps k_max. Output is exact either way."""
    model, bad = tiny(), tiny(seed=7, linear=None, num_hidden_layers=1)
    stats = {}
    for adaptive in (True, False):
        stats[adaptive] = SpeculativeStats()
        assert speculative(model, PROMPT, 30, stats=stats[adaptive], draft_model=bad, adaptive=adaptive) == \
            greedy(model, PROMPT, 30)
    assert stats[True].drafted < stats[False].drafted / 2
    good = SpeculativeStats()
    speculative(model, PROMPT, 30, stats=good, draft_model=model, num_assistant_tokens=4)
    assert good.drafted == 30 - good.target_forwards and good.acceptance_rate == 1.0  # k_max every round


def test_eos_inside_an_accepted_draft_stops_there():
    model = tiny()
    ref = greedy(model, PROMPT, 30)
    tokens = [t for t, _, _ in ref]
    i = next(i for i in range(2, 30) if tokens[i] not in tokens[:i])  # an id not emitted before
    stats = SpeculativeStats()
    got = speculative(model, PROMPT, 30, eos=[tokens[i]], stats=stats, draft_model=model, num_assistant_tokens=5)
    assert got == greedy(model, PROMPT, 30, eos=[tokens[i]])
    assert [t for t, _, _ in got] == tokens[:i + 1] and got[-1][1:] == (True, "stop")
    assert not any(f for _, f, _ in got[:-1])
    assert stats.accepted > i - 1  # the EOS was drafted and accepted along with tokens after it


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 11, 12, 13])
def test_max_new_tokens_is_never_exceeded(n):
    model = tiny()
    for drafter in (dict(draft_model=model, num_assistant_tokens=5), dict(prompt_lookup_num_tokens=5)):
        got = speculative(model, PROMPT, n, **drafter)
        assert got == greedy(model, PROMPT, n) and len(got) == n and got[-1][1:] == (True, "length")


def test_context_end_finishes_with_length():
    model = tiny(max_position_embeddings=12)
    for drafter in (dict(draft_model=model), dict(prompt_lookup_num_tokens=3)):
        got = speculative(model, PROMPT, 50, **drafter)
        assert len(got) == 5 and got == greedy(model, PROMPT, 50) and got[-1][2] == "length"


def test_a_draft_with_a_shorter_context_stops_drafting_but_not_decoding():
    model, draft, stats = tiny(), tiny(max_position_embeddings=16), SpeculativeStats()  # same weights
    assert speculative(model, PROMPT, 30, stats=stats, draft_model=draft) == greedy(model, PROMPT, 30)
    # every draft is accepted, and the draft never feeds a position past its 16-slot context
    assert stats.acceptance_rate == 1.0 and 0 < stats.drafted <= 10


# ---------------------------------------------------------------------- kernels that are not row-invariant

def test_row_dependent_kernels_are_detected_and_verified_step_by_step():
    model = tiny(linear=RowCountLinear)
    assert not rows_invariant(model, 4) and rows_invariant(tiny(), 4)
    stats = SpeculativeStats()
    with pytest.warns(RuntimeWarning, match="one decode step at a time"):
        got = speculative(model, PROMPT, 30, stats=stats, draft_model=model, num_assistant_tokens=3)
    assert got == greedy(model, PROMPT, 30)
    assert stats.target_forwards == 30  # the prefill, then one step per further token


# ---------------------------------------------------------------------- prompt lookup

def test_prompt_lookup_examples():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 3) == [9, 1]  # the first occurrence
    assert prompt_lookup([4, 5, 6, 8, 9, 5, 6], 5, 3) == [8, 9, 5, 6]  # 2-gram; stops at the text's end
    assert prompt_lookup([4, 5, 6, 8, 9, 1, 6], 5, 3) == [8, 9, 1, 6]  # down to a 1-gram
    assert prompt_lookup([4, 5, 6, 8, 9, 1, 6], 5, 3)[:1] == prompt_lookup([4, 5, 6, 8, 9, 1, 6], 1, 1)
    assert prompt_lookup([1, 2, 3], 5, 3) == [] and prompt_lookup([7], 5, 3) == []


def test_prompt_lookup_equals_transformers():
    cg = pytest.importorskip("transformers.generation.candidate_generator")
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        ids = torch.randint(0, 6, (1, int(torch.randint(2, 40, (1,), generator=g))), generator=g)
        k, n = trial % 7 + 1, trial % 4 + 1
        theirs, _ = cg.PromptLookupCandidateGenerator(num_output_tokens=k, max_matching_ngram_size=n,
                                                      max_length=1000).get_candidates(ids)
        assert prompt_lookup(ids[0].tolist(), k, n) == theirs[0, ids.shape[1]:].tolist(), (ids, k, n)


# ---------------------------------------------------------------------- logit processors and model.generate

PROCESSED = [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2), dict(logit_bias={5: 3.0, 17: -2.0}),
             dict(frequency_penalty=0.8, presence_penalty=0.5), dict(bad_words_ids=[[22], [73, 15]])]


@pytest.mark.parametrize("kwargs", PROCESSED, ids=lambda k: ",".join(k))
def test_greedy_with_logit_processors_is_exact(kwargs):
    """Each verified row is processed with the very text it follows (penalties see the drafts)."""
    model, params = tiny(), SamplingParams(**kwargs)
    ref = steps(generate_tokens(model, PROMPT, max_new_tokens=30, params=params))
    assert ref != greedy(model, PROMPT, 30)  # the processor matters for this prompt
    for drafter in (dict(draft_model=model, num_assistant_tokens=4), dict(prompt_lookup_num_tokens=4)):
        assert steps(speculative_tokens(model, PROMPT, max_new_tokens=30, params=params, **drafter)) == ref


def test_min_new_tokens_holds_back_eos():
    model = tiny()
    eos = greedy(model, PROMPT, 30)[4][0]  # the fifth greedy token, used as the EOS id
    for n in (0, 8):
        ref = steps(generate_tokens(model, PROMPT, max_new_tokens=30, min_new_tokens=n, eos_token_ids=[eos]))
        got = steps(speculative_tokens(model, PROMPT, max_new_tokens=30, min_new_tokens=n, eos_token_ids=[eos],
                                       draft_model=model))
        assert got == ref
        assert len(ref) == 5 if n == 0 else len(ref) >= n + 1  # EOS at the fifth token, or held back


def test_model_generate_speculative_equals_plain():
    model = tiny()
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), PROMPT], dim=1)  # left-padded, one row
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(PROMPT)], dim=1)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=25, repetition_penalty=1.2)
    for drafter in (dict(assistant_model=tiny()), dict(prompt_lookup_num_tokens=6, max_matching_ngram_size=2)):
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=25, repetition_penalty=1.2,
                                          **drafter), ref)


@pytest.mark.parametrize("kwargs, match", [
    (dict(do_sample=True), "greedy"),
    (dict(input_ids=torch.tensor([[1, 2], [3, 4]])), "batch size 1"),
    (dict(attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1, 1]])), "left-padded"),
    (dict(assistant_model="self", prompt_lookup_num_tokens=3), "exactly one drafter"),
])
def test_model_generate_speculative_bad_input(kwargs, match):
    model = tiny()
    kwargs = {"input_ids": PROMPT, "prompt_lookup_num_tokens": 3, **kwargs}
    if kwargs.get("assistant_model") == "self":
        kwargs["assistant_model"] = model
    with pytest.raises(ValueError, match=match):
        model.generate(max_new_tokens=5, **kwargs)


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one drafter"),
    (dict(prompt_lookup_num_tokens=3, draft_model="self"), "exactly one drafter"),
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be a positive"),
    (dict(prompt_lookup_num_tokens=2.0), "prompt_lookup_num_tokens must be a positive"),
    (dict(prompt_lookup_num_tokens=3, max_ngram_size=0), "max_ngram_size must be a positive"),
    (dict(draft_model="self", num_assistant_tokens=0), "num_assistant_tokens must be a positive"),
    (dict(draft_model="self", num_assistant_tokens=True), "num_assistant_tokens must be a positive"),
    (dict(draft_model="other vocab"), "vocabulary"),
    (dict(prompt_lookup_num_tokens=3, max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments(kwargs, match):
    model = tiny()
    if kwargs.get("draft_model") == "self":
        kwargs["draft_model"] = model
    elif kwargs.get("draft_model") == "other vocab":
        kwargs["draft_model"] = tiny(vocab_size=98)
    kwargs.setdefault("max_new_tokens", 8)
    with pytest.raises(ValueError, match=match):
        next(speculative_tokens(model, PROMPT, **kwargs))


@pytest.mark.parametrize("ids, match", [
    (torch.tensor([[1, 2], [3, 4]]), "batch size 1"),
    (torch.zeros(1, 0, dtype=torch.long), "non-empty prompt"),
    (torch.tensor([1, 2, 3]), "input_ids must be"),
    (torch.ones(1, 128, dtype=torch.long), "no room"),
])
def test_bad_prompts(ids, match):
    with pytest.raises(ValueError, match=match):
        next(speculative_tokens(tiny(), ids, prompt_lookup_num_tokens=3, max_new_tokens=4))


def test_draft_must_be_a_camelid_model():
    with pytest.raises(TypeError, match="draft_model"):
        next(speculative_tokens(tiny(), PROMPT, draft_model=object(), max_new_tokens=4))


# ---------------------------------------------------------------------- the real model

PROMPTS = [  # free text; copying a list; copying code with one fix (each answer is >= 64 tokens)
    "Explain how photosynthesis works.",
    "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango, "
    "nectarine, orange, papaya, quince, raspberry, strawberry, tangerine, ugli fruit, vanilla bean, watermelon, "
    "ximenia, yellow passion fruit, zucchini, apricot, blackberry, cantaloupe, dragon fruit, eggplant, feijoa.",
    "Fix the typo in this code and show the whole corrected code:\n\nclass Stack:\n    def __init__(self):\n"
    "        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n"
    "        return self.itmes.pop()\n\n    def peek(self):\n        return self.items[-1]\n\n"
    "    def is_empty(self):\n        return len(self.items) == 0\n",
]


@pytest.fixture(scope="module")
def chat_prompts(smollm2_tokenizer):
    return [smollm2_tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  return_tensors="pt") for p in PROMPTS]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:this model's layers round a row differently")  # kernels without packing
def test_real_model_is_exactly_greedy(smollm2_gguf, smollm2_tokenizer, chat_prompts):
    model = LlamaForCausalLM.from_pretrained(smollm2_gguf)
    eos = smollm2_tokenizer.eos_token_ids
    bad_draft = tiny(seed=3, linear=None, vocab_size=model.config.vocab_size, max_position_embeddings=2048)
    bf16_draft = LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="bfloat16")  # agrees often, not always
    rates = {}
    for prompt, ids in zip(PROMPTS, chat_prompts):
        ref = greedy(model, ids, 96, eos=eos)
        assert len(ref) >= 64, prompt
        for name, drafter in [("lookup", dict(prompt_lookup_num_tokens=10)), ("self", dict(draft_model=model)),
                              ("bad", dict(draft_model=bad_draft)), ("bf16", dict(draft_model=bf16_draft))]:
            stats = SpeculativeStats()
            assert speculative(model, ids, 96, eos=eos, stats=stats, **drafter) == ref, (prompt, name)
            rates.setdefault(name, []).append(stats.acceptance_rate)
    assert min(rates["self"]) == 1.0 and max(rates["bad"]) < 0.1
    assert 0.5 < min(rates["bf16"]) < 1  # mostly accepted, some rejected: rollback on the real model
    assert max(rates["lookup"]) > 0.3  # the list and the code are copied from the prompt
