"""Sampling: closed-form values for every step, parity with transformers' logits processors, padded
batch == each row alone, sampling statistics, and every bad parameter."""

import math

import pytest
import torch

from camelid.generation.sampling import (
                                         SamplingParams,
                                         logprobs,
                                         make_generator,
                                         make_logits_processor,
                                         make_sampler,
                                         )

hf = pytest.importorskip("transformers.generation.logits_process")  # the oracle

INF = math.inf


def process(params, logits, tokens=None, n_prompt=None, mask=None):
    """Run the processor on unpadded rows (every token real). Default context: one prompt token."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 1:
        logits = logits[None]
    B, V = logits.shape
    tokens = torch.zeros(B, 1, dtype=torch.long) if tokens is None else torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    mask = torch.ones_like(tokens) if mask is None else mask
    n_prompt = torch.full((B,), tokens.shape[1]) if n_prompt is None else torch.as_tensor(n_prompt)
    return make_logits_processor(params, V)(logits, tokens, mask, n_prompt.view(-1))


def kept(out):
    """Ids whose logit survived, per row (a set for one row)."""
    sets = [set(torch.nonzero(row > -INF).flatten().tolist()) for row in out]
    return sets[0] if len(sets) == 1 else sets


def sample(**kw):
    return SamplingParams(do_sample=True, **kw)


# A distribution with no boundary ties: p = [0.15, 0.5, 0.05, 0.3] in a shuffled vocabulary order.
P4 = torch.tensor([0.15, 0.5, 0.05, 0.3])
L4 = P4.log()


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.25, 0.5, 2.0, 7.0])
def test_temperature_is_softmax_of_logits_over_t(t):
    logits = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0])
    out = process(sample(temperature=t), logits)
    torch.testing.assert_close(out.softmax(-1)[0], (logits / t).softmax(-1))
    torch.testing.assert_close(out[0], logits / t)


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0])
    assert kept(process(sample(top_k=1), logits)) == {5}
    assert kept(process(sample(top_k=3), logits)) == {5, 7, 4}
    assert kept(process(sample(top_k=100), logits)) == set(range(8))  # k > V keeps everything
    out = process(sample(top_k=3), logits)
    torch.testing.assert_close(out[0, [4, 5, 7]], logits[[4, 5, 7]])  # survivors untouched


def test_top_p_keeps_every_tie_of_the_last_kept():
    # p = [0.4, 0.2, 0.2, 0.2]: 0.5 is reached inside the tie, which is kept whole
    logits = torch.tensor([0.4, 0.2, 0.2, 0.2]).log()
    assert kept(process(sample(top_p=0.5), logits)) == {0, 1, 2, 3}
    assert kept(process(sample(top_p=0.3), logits)) == {0}


def test_top_k_keeps_every_tie_of_the_kth_like_transformers():
    logits = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert kept(process(sample(top_k=2), logits)) == {1, 2, 3}


@pytest.mark.parametrize("p, expected", [
    # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2); cumulative 0.5, 0.8, 0.95, 1.0
    (0.4, {1}),        # 0.5 >= 0.4 already
    (0.75, {1, 3}),    # 0.8 >= 0.75
    (0.9, {1, 3, 0}),  # 0.95 >= 0.9
    (0.97, {0, 1, 2, 3}),
])
def test_top_p_keeps_smallest_set_reaching_p(p, expected):
    assert kept(process(sample(top_p=p), L4)) == expected


@pytest.mark.parametrize("m, expected", [
    (0.05, {0, 1, 2, 3}),  # threshold 0.025
    (0.25, {0, 1, 3}),     # threshold 0.125: 0.05 goes
    (0.5, {1, 3}),         # threshold 0.25: 0.15 goes
    (0.7, {1}),            # threshold 0.35
    (1.0, {1}),
])
def test_min_p_keeps_p_at_least_min_p_times_p_max(m, expected):
    assert kept(process(sample(min_p=m), L4)) == expected


@pytest.mark.parametrize("mass, expected", [(0.25, {1}), (0.45, {1, 2}), (0.6, {1, 2, 0}), (0.95, {0, 1, 2, 3})])
def test_typical_p_by_hand(mass, expected):
    # p = [0.4, 0.3, 0.2, 0.1]; H = -sum p ln p = 1.27985
    # surprise -ln p = [0.91629, 1.20397, 1.60944, 2.30259]; |surprise - H| = [0.364, 0.076, 0.330, 1.023]
    # most typical first: id 1 (0.3), id 2 (0.2), id 0 (0.4), id 3 (0.1); cumulative 0.3, 0.5, 0.9, 1.0
    p = [0.4, 0.3, 0.2, 0.1]
    H = -sum(x * math.log(x) for x in p)
    assert H == pytest.approx(1.27985, abs=1e-5)
    logits = torch.tensor(p).log()
    assert kept(process(sample(typical_p=mass), logits)) == expected  # mass 0.25 drops the argmax


def test_repetition_penalty_divides_positive_multiplies_negative_seen_only():
    logits = torch.tensor([2.0, -1.0, 3.0, -4.0, 0.5])
    # prompt [0, 1], generated [1]: 1 is penalized once, however often it appears
    out = process(SamplingParams(repetition_penalty=2.0), logits, tokens=[0, 1, 1], n_prompt=[2])
    torch.testing.assert_close(out[0], torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5]))
    out = process(SamplingParams(repetition_penalty=0.5), logits, tokens=[0, 1, 1], n_prompt=[2])
    torch.testing.assert_close(out[0], torch.tensor([4.0, -0.5, 3.0, -4.0, 0.5]))


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    tokens = [4, 4, 0, 1, 1, 1, 2]  # prompt [4, 4, 0]; generated [1, 1, 1, 2]
    out = process(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), logits, tokens, n_prompt=[3])
    # 1: 2 - 3 * 0.5 - 0.25; 2: 3 - 0.5 - 0.25; 0 and 4 (prompt only) and 3 (unseen) unchanged
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0.25, 2.25, 4.0, 5.0]))
    out = process(SamplingParams(frequency_penalty=-1.0), logits, tokens, n_prompt=[3])
    torch.testing.assert_close(out[0], torch.tensor([1.0, 5.0, 4.0, 4.0, 5.0]))
    out = process(SamplingParams(presence_penalty=2.0), logits, tokens, n_prompt=[7])  # nothing generated
    torch.testing.assert_close(out[0], logits)


def test_logit_bias_is_added():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = process(SamplingParams(logit_bias={0: 5.0, 2: -1.5, 3: -INF}), logits)
    torch.testing.assert_close(out[0], torch.tensor([6.0, 2.0, 1.5, -INF]))


@pytest.mark.parametrize("n, tokens, banned", [
    (3, [1, 2, 3, 1, 2], {3}),              # (1, 2) -> 3 seen
    (3, [1, 2, 3, 1, 2, 4, 1, 2], {3, 4}),  # (1, 2) -> 3 and -> 4 seen
    (3, [1, 2, 3, 2, 1], set()),            # (2, 1) never followed by anything
    (2, [5, 6, 5], {6}),
    (2, [5, 6], set()),                     # the suffix never bans its own successor
    (1, [5, 6, 5], {5, 6}),                 # unigrams: every seen token
    (4, [1, 2, 3], set()),                  # shorter than n
])
def test_no_repeat_ngram_bans_exactly_the_completing_tokens(n, tokens, banned):
    logits = torch.zeros(8)
    out = process(SamplingParams(no_repeat_ngram_size=n), logits, tokens)
    assert kept(out) == set(range(8)) - banned


@pytest.mark.parametrize("tokens, banned", [
    ([9, 1, 2], {3, 4, 5}),  # (1, 2, 3) and (2, 5) complete; (4,) always
    ([9, 9, 2], {4, 5}),     # only (2, 5)
    ([2, 1], {4}),           # a prefix must END the context
    ([2], {4, 5}),           # context shorter than (1, 2): skipped
])
def test_bad_words_multi_token(tokens, banned):
    params = SamplingParams(bad_words_ids=((1, 2, 3), (4,), (2, 5)))
    out = process(params, torch.zeros(10), tokens)
    assert kept(out) == set(range(10)) - banned


# ---------------------------------------------------------------------------------------------
# Parity with transformers' logits processors
# ---------------------------------------------------------------------------------------------

B, V, T = 4, 48, 14


def random_case(seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    if ties:  # integer logits: many ties at every boundary
        logits = logits.round()
    tokens = torch.randint(0, 6, (B, T), generator=g)  # few distinct ids: repeats and n-grams
    return logits, tokens


def ours(params, logits, tokens, n_prompt=T - 4):
    mask = torch.ones_like(tokens)
    return make_logits_processor(params, logits.shape[-1])(logits, tokens, mask, torch.full((B,), n_prompt))


def openai_reference(logits, tokens, n_prompt, freq, pres):
    """OpenAI's formula with Python loops: mu[j] - c[j] * freq - (c[j] > 0) * pres."""
    out = logits.clone()
    for b in range(tokens.shape[0]):
        for j in set(tokens[b, n_prompt:].tolist()):
            c = tokens[b, n_prompt:].tolist().count(j)
            out[b, j] -= c * freq + pres
    return out


BAD = [[1], [2, 3], [3, 3, 4], [0, 5, 1, 2], [4, 40]]

PARITY = [
    (SamplingParams(repetition_penalty=1.3), lambda: hf.RepetitionPenaltyLogitsProcessor(1.3)),
    (SamplingParams(repetition_penalty=0.6), lambda: hf.RepetitionPenaltyLogitsProcessor(0.6)),
    (SamplingParams(no_repeat_ngram_size=1), lambda: hf.NoRepeatNGramLogitsProcessor(1)),
    (SamplingParams(no_repeat_ngram_size=2), lambda: hf.NoRepeatNGramLogitsProcessor(2)),
    (SamplingParams(no_repeat_ngram_size=3), lambda: hf.NoRepeatNGramLogitsProcessor(3)),
    (SamplingParams(bad_words_ids=tuple(map(tuple, BAD))), lambda: hf.NoBadWordsLogitsProcessor(BAD)),
    (SamplingParams(logit_bias={0: 1.5, 7: -2.0, 47: 10.0}),
     lambda: hf.SequenceBiasLogitsProcessor([[[0], 1.5], [[7], -2.0], [[47], 10.0]])),
    (sample(temperature=0.4), lambda: hf.TemperatureLogitsWarper(0.4)),
    (sample(temperature=1.7), lambda: hf.TemperatureLogitsWarper(1.7)),
    (sample(top_k=1), lambda: hf.TopKLogitsWarper(1)),
    (sample(top_k=5), lambda: hf.TopKLogitsWarper(5)),
    (sample(top_k=100), lambda: hf.TopKLogitsWarper(100)),
    (sample(top_p=0.3), lambda: hf.TopPLogitsWarper(0.3)),
    (sample(top_p=0.9), lambda: hf.TopPLogitsWarper(0.9)),
    (sample(min_p=0.05), lambda: hf.MinPLogitsWarper(0.05)),
    (sample(min_p=0.3), lambda: hf.MinPLogitsWarper(0.3)),
    (sample(typical_p=0.2), lambda: hf.TypicalLogitsWarper(0.2)),
    (sample(typical_p=0.9), lambda: hf.TypicalLogitsWarper(0.9)),
]


@pytest.mark.parametrize("params, oracle", PARITY, ids=lambda x: repr(x)[:60] if isinstance(x, SamplingParams) else "")
def test_parity_each_step(params, oracle):
    changed = 0
    for seed in range(8):
        # integer logits (ties everywhere) for one seed in three, except top_p: see the test below
        logits, tokens = random_case(seed, ties=seed % 3 == 2 and params.top_p == 1.0)
        expected = oracle()(tokens, logits.clone())
        got = ours(params, logits, tokens)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        changed += not torch.equal(got, logits)
    assert changed >= 2 or params.top_k == 100, "the cases must exercise the step"


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", range(4))
def test_top_p_with_ties_keeps_transformers_set_plus_its_ties(p, seed):
    """transformers keeps whichever tied tokens its sort puts first; camelid keeps the whole tie."""
    logits, tokens = random_case(seed, ties=True)
    theirs = hf.TopPLogitsWarper(p)(tokens, logits.clone()) > -INF
    mine = ours(sample(top_p=p), logits, tokens) > -INF
    assert (mine >= theirs).all()
    lowest = logits.masked_fill(~theirs, INF).amin(-1, keepdim=True)  # transformers' last kept logit
    assert torch.equal(mine, logits >= lowest)


def test_parity_bad_words_and_ngrams_are_not_vacuous():
    """The random cases above do exercise multi-token bans, not just the one-token ones."""
    hits = 0
    for seed in range(6):
        logits, tokens = random_case(seed)
        got = ours(SamplingParams(bad_words_ids=tuple(map(tuple, BAD))), logits, tokens)
        hits += int(((got == -INF).sum(-1) > 1).sum())
    assert hits > 0


@pytest.mark.parametrize("seed", range(8))
def test_parity_composed_chain(seed):
    params = sample(repetition_penalty=1.2, no_repeat_ngram_size=2, bad_words_ids=((2, 3), (9,)),
                    logit_bias={4: 0.7, 11: -1.0}, frequency_penalty=0.4, presence_penalty=-0.3,
                    temperature=0.8, top_k=20, top_p=0.95, min_p=0.02, typical_p=0.97)
    logits, tokens = random_case(seed)
    n_prompt = 6
    x = logits.clone()
    for p in [hf.RepetitionPenaltyLogitsProcessor(1.2), hf.NoRepeatNGramLogitsProcessor(2),
              hf.NoBadWordsLogitsProcessor([[2, 3], [9]]),
              hf.SequenceBiasLogitsProcessor([[[4], 0.7], [[11], -1.0]])]:
        x = p(tokens, x)
    x = openai_reference(x, tokens, n_prompt, 0.4, -0.3)
    for p in [hf.TemperatureLogitsWarper(0.8), hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.95),
              hf.MinPLogitsWarper(0.02), hf.TypicalLogitsWarper(0.97)]:
        x = p(tokens, x)
    got = ours(params, logits, tokens, n_prompt)
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)
    assert (got > -INF).sum() > B  # not everything filtered away: the comparison means something


def test_order_matches_transformers_sampling_order():
    params = sample(repetition_penalty=1.1, no_repeat_ngram_size=2, bad_words_ids=((1,),), logit_bias={0: 1.0},
                    frequency_penalty=0.1, temperature=0.5, top_k=3, top_p=0.5, min_p=0.1, typical_p=0.5)
    names = [s.__qualname__.split(".")[0] for s in make_logits_processor(params, 8).steps]
    assert names == ["repetition_penalty", "no_repeat_ngram", "bad_words", "logit_bias", "openai_penalties",
                     "temperature", "top_k", "top_p", "min_p", "typical_p"]


def test_only_active_steps_are_composed():
    assert make_logits_processor(SamplingParams(), 8).steps == ()
    # greedy ignores the warpers: they would never change the argmax (typical_p could even drop it)
    greedy = SamplingParams(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1, typical_p=0.5)
    assert make_logits_processor(greedy, 8).steps == ()
    assert make_logits_processor(sample(temperature=0, top_k=3), 8).steps == ()
    assert len(make_logits_processor(sample(top_k=3), 8).steps) == 1


def test_processor_does_not_modify_its_inputs():
    logits, tokens = random_case(0)
    before = logits.clone()
    ours(sample(repetition_penalty=1.3, no_repeat_ngram_size=2, top_k=4, bad_words_ids=((1,),)), logits, tokens)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------
# Padding: a left-padded row behaves exactly like the row alone
# ---------------------------------------------------------------------------------------------

PAD = 7  # a real id: with padding counted it would be penalized, complete n-grams and bad words

ROWS = [  # (real tokens, n_prompt)
    ([3, 1, 4, 1, 5, 9, 2, 6], 5),
    ([7, 2, 7], 2),  # n=2: a window (pad, 7) would ban 7
    ([1], 1),        # bad word (7, 7, 1, 5): the padded tail (7, 7, 1) would ban 5
    ([2, 2, 3], 0),  # everything generated
]


@pytest.mark.parametrize("params", [
    SamplingParams(repetition_penalty=1.5),
    SamplingParams(no_repeat_ngram_size=2),
    SamplingParams(bad_words_ids=((7, 7, 1, 5), (2, 2, 3, 8))),
    SamplingParams(frequency_penalty=0.7, presence_penalty=0.3),
    sample(repetition_penalty=1.5, no_repeat_ngram_size=2, bad_words_ids=((7, 7, 1, 5),),
           frequency_penalty=0.7, presence_penalty=0.3, logit_bias={3: 1.0}, temperature=0.7, top_k=12,
           top_p=0.9, min_p=0.01, typical_p=0.95),
], ids=["repetition", "ngram", "bad_words", "openai", "chain"])
def test_padded_batch_equals_each_row_alone(params):
    Tmax = max(len(r) for r, _ in ROWS)
    tokens = torch.tensor([[PAD] * (Tmax - len(r)) + r for r, _ in ROWS])
    mask = torch.tensor([[0] * (Tmax - len(r)) + [1] * len(r) for r, _ in ROWS])
    n_prompt = torch.tensor([n for _, n in ROWS])
    logits = torch.randn(len(ROWS), 16, generator=torch.Generator().manual_seed(0)) * 2
    fn = make_logits_processor(params, 16)
    batch = fn(logits, tokens, mask, n_prompt)
    for b, (row, n) in enumerate(ROWS):
        alone = fn(logits[b:b + 1], torch.tensor([row]), torch.ones(1, len(row)), torch.tensor([n]))
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=0, atol=0)
    assert not torch.equal(batch, logits)


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

def test_sampling_frequencies_match_processed_distribution():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5])
    params = sample(temperature=0.8, top_k=4, seed=1234)
    processed = process(params, logits)
    expected = processed.softmax(-1)[0]  # token 3 is filtered by top_k: probability 0
    N = 20_000
    draws = make_sampler(params)(processed.expand(N, -1), make_generator(params.seed, "cpu"))
    assert draws.shape == (N,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=5).float() / N
    assert freq[3] == 0
    # binomial standard error <= sqrt(0.25 / N) = 0.0035; 0.015 is > 4 sigma
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    sampler = make_sampler(sample(seed=5))
    a = sampler(logits, make_generator(5, "cpu"))
    b = sampler(logits, make_generator(5, torch.device("cpu")))
    c = sampler(logits, make_generator(6, "cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert make_generator(None, "cpu") is None


@pytest.mark.parametrize("params", [SamplingParams(), sample(temperature=0, top_k=2, typical_p=0.2)])
def test_greedy_is_argmax_even_with_do_sample_at_temperature_zero(params):
    assert params.greedy
    # the argmax (p = 0.4) is not "typical": typical_p=0.2 would drop it if the warpers ran
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.2, 0.05]]).log()
    out = process(params, logits)
    assert torch.isfinite(out).all()  # no division by a zero temperature
    sampler = make_sampler(params)
    for seed in [None, 0, 1, 2]:
        assert sampler(out, make_generator(seed, "cpu")).tolist() == [0, 1]  # row 1 tie: lowest id


def test_logprobs_of_raw_logits():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([4, 0, 29])
    ref = torch.log_softmax(logits.double(), -1).float()
    chosen, top, ids = logprobs(logits, tokens)
    torch.testing.assert_close(chosen, ref[torch.arange(3), tokens])
    assert top is None and ids is None
    chosen, top, ids = logprobs(logits, tokens, top_n=5)
    assert top.shape == ids.shape == (3, 5)
    torch.testing.assert_close(top, ref.sort(-1, descending=True).values[:, :5])
    torch.testing.assert_close(ref.gather(1, ids), top)
    assert (top[:, :-1] >= top[:, 1:]).all()


@pytest.mark.parametrize("top_n", [-1, 21, 2.0, True, None])
def test_logprobs_rejects_bad_top_n(top_n):
    with pytest.raises(ValueError, match="top_n"):
        logprobs(torch.zeros(1, 30), torch.tensor([0]), top_n)


def test_logprobs_rejects_top_n_above_vocab():
    with pytest.raises(ValueError, match="top_n"):
        logprobs(torch.zeros(1, 4), torch.tensor([0]), 5)


# ---------------------------------------------------------------------------------------------
# Bad parameters
# ---------------------------------------------------------------------------------------------

BAD_PARAMS = [
    ("do_sample", 1), ("do_sample", "yes"),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("temperature", None),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.nan),
    ("typical_p", 0.0), ("typical_p", 1.2), ("typical_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf),
    ("frequency_penalty", 2.5), ("frequency_penalty", -2.01), ("frequency_penalty", math.nan),
    ("presence_penalty", 3.0), ("presence_penalty", -2.5), ("presence_penalty", math.nan),
    ("no_repeat_ngram_size", -1), ("no_repeat_ngram_size", 1.0),
    ("bad_words_ids", ()), ("bad_words_ids", ((),)), ("bad_words_ids", ((1, -2),)), ("bad_words_ids", ((1.0,),)),
    ("bad_words_ids", (1, 2)), ("bad_words_ids", "ab"),
    ("logit_bias", {"5": 1.0}), ("logit_bias", {1.0: 1.0}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {5: math.nan}), ("logit_bias", {5: math.inf}), ("logit_bias", {5: "1"}),
    ("logit_bias", [(5, 1.0)]),
    ("seed", 1.5), ("seed", 2**64), ("seed", "42"),
]


@pytest.mark.parametrize("field, value", BAD_PARAMS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMS])
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_edge_values_are_accepted():
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, typical_p=1.0, frequency_penalty=2, presence_penalty=-2,
                   top_k=1, no_repeat_ngram_size=1, logit_bias={0: -INF}, bad_words_ids=[[1, 2]], seed=-1)


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {16: 1.0}), ("bad_words_ids", ((1, 16),)), ("bad_words_ids", ((99,),)),
])
def test_ids_outside_vocab_are_rejected_when_composing(field, value):
    params = SamplingParams(**{field: value})  # valid on its own: the vocabulary is not known yet
    with pytest.raises(ValueError, match=field):
        make_logits_processor(params, 16)
    make_logits_processor(params, 100)


def test_bias_mutated_after_construction_is_checked_when_composing():
    params = SamplingParams(logit_bias={1: 1.0})
    params.logit_bias[2] = math.nan
    with pytest.raises(ValueError, match="logit_bias"):
        make_logits_processor(params, 16)


@pytest.mark.parametrize("vocab_size", [0, -3, 2.0])
def test_bad_vocab_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        make_logits_processor(SamplingParams(), vocab_size)


def test_logits_of_the_wrong_width_are_rejected():
    fn = make_logits_processor(SamplingParams(top_k=2), 16)
    with pytest.raises(ValueError, match="logits"):
        fn(torch.zeros(1, 15), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), torch.ones(1))
