"""Sampling: logits processors and token samplers as pure functions, composed once per request.

    params = SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, seed=0)
    process = make_logits_processor(params, vocab_size)   # chain of the active steps only
    sample = make_sampler(params)                          # argmax or multinomial
    generator = make_generator(params.seed, device)
    next_token = sample(process(logits, tokens, mask, n_prompt), generator)

The decode loops do not chain these themselves: generation/step.py composes them (with the EOS
ban of min_new_tokens, a grammar mask and log-probabilities) into the one next-token step.

Shapes (B rows, T tokens so far, V vocabulary):
  logits    float32 [B, V]  the model's scores for the next token
  tokens    long    [B, T]  prompt + generated tokens so far, LEFT-padded
  mask      [B, T]          1 at real tokens, 0 at padding (any dtype; read as bool)
  n_prompt  long    [B]     real prompt tokens per row; the rest of a row's real tokens are generated

Padding never counts: a padded row gives exactly the logits it would give alone, whatever the pad
id is. The generated tokens of a row are its last (real - n_prompt) tokens.

Order of the steps (transformers' `_get_logits_processor` order where it has the step):
  1. repetition_penalty   transformers: seen logits (prompt + generated) / p if > 0, * p if < 0
  2. no_repeat_ngram_size transformers: ban every token that would repeat an n-gram already seen
  3. bad_words_ids        transformers: ban a sequence's last token when its prefix ends the context
  4. logit_bias           OpenAI: added to the logits
  5. frequency_penalty,   OpenAI: logit -= frequency * count(generated) + presence * [count > 0]
     presence_penalty
  and only when sampling (not `greedy`):
  6. temperature  7. top_k  8. top_p  9. min_p  10. typical_p
transformers applies `sequence_bias` (its logit_bias) before the repetition penalty and has no
OpenAI penalties; here the OpenAI-style additive terms come after the transformers-style steps, so
a bias is never divided by the repetition penalty. Unlike transformers' generate(), a bad word
equal to the EOS token is not dropped: camelid bans exactly what it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import camelid.kernels as kernels

Processor = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (logits, tokens, mask, n_prompt)
Sampler = Callable[[Tensor, "torch.Generator | None"], Tensor]

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for `top_logprobs`
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

MIN_TEMPERATURE = 1e-5  # below it (0 included), sampling is greedy decoding


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0  # 0 means greedy, even with do_sample=True
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0  # transformers semantics, over prompt + generated tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit; -inf bans it
    no_repeat_ngram_size: int = 0  # transformers semantics, over prompt + generated tokens
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None  # transformers semantics
    seed: int | None = None

    def __post_init__(self):
        # transformers users pass lists of lists; store tuples so the params stay hashable/frozen
        words = self.bad_words_ids
        if isinstance(words, (list, tuple)) and all(isinstance(w, (list, tuple)) for w in words):
            object.__setattr__(self, "bad_words_ids", tuple(tuple(w) for w in words))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, naming the field, for any value that has no meaning."""

        def check(ok: bool, name: str, want: str):
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

        check(isinstance(self.do_sample, bool), "do_sample", "a bool")
        t = self.temperature
        check(_is_real(t) and math.isfinite(t) and t >= 0, "temperature",
              "a finite number >= 0 (0 = greedy)")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an int >= 0 (0 = off)")
        check(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        check(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        check(_is_real(self.typical_p) and 0 < self.typical_p <= 1, "typical_p", "a number in (0, 1]")
        r = self.repetition_penalty
        check(_is_real(r) and math.isfinite(r) and r > 0, "repetition_penalty",
              "a finite number > 0 (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            check(_is_real(v) and -2 <= v <= 2, name, "a number in [-2, 2]")
        check(_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
              "no_repeat_ngram_size", "an int >= 0 (0 = off)")
        if self.logit_bias is not None:
            check(isinstance(self.logit_bias, dict), "logit_bias", "a dict {token id: bias}")
            for k, v in self.logit_bias.items():
                check(_is_int(k) and k >= 0, "logit_bias", "keyed by int token ids >= 0")
                # NaN poisons the row; +inf makes softmax inf/inf = NaN. -inf is a ban.
                check(_is_real(v) and not math.isnan(v) and v != math.inf, "logit_bias",
                      "valued by numbers (not NaN or +inf)")
        if self.bad_words_ids is not None:
            seqs = self.bad_words_ids
            check(isinstance(seqs, (tuple, list)) and len(seqs) > 0, "bad_words_ids",
                  "a non-empty sequence of token-id sequences")
            for seq in seqs:
                check(isinstance(seq, (tuple, list)) and len(seq) > 0, "bad_words_ids",
                      "made of non-empty token-id sequences")
                check(all(_is_int(i) and i >= 0 for i in seq), "bad_words_ids",
                      "made of int token ids >= 0")
        if self.seed is not None:
            check(_is_int(self.seed) and _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1], "seed",
                  "None or an int that fits in 64 bits")

    @property
    def greedy(self) -> bool:
        """Greedy when not sampling, or at a temperature under MIN_TEMPERATURE: there the sampled
        distribution is the argmax's to within float32 (and logits / t would overflow), so it is
        decoded as greedy, as vLLM does below its _SAMPLING_EPS of 1e-5."""
        return not self.do_sample or self.temperature < MIN_TEMPERATURE


# ---------------------------------------------------------------------------------------------
# Context: which positions are real, which are generated
# ---------------------------------------------------------------------------------------------

def _generated(mask: Tensor, n_prompt: Tensor) -> Tensor:
    """bool [B, T]: the real tokens after each row's prompt (the last real - n_prompt of them)."""
    T = mask.shape[1]
    n_gen = (mask.sum(1) - n_prompt).clamp(min=0)  # [B]
    pos = torch.arange(T, device=mask.device)
    return mask & (pos >= T - n_gen[:, None])


def _counts(tokens: Tensor, keep: Tensor, V: int) -> Tensor:
    """float [B, V]: how often each id occurs at the kept positions. Ids >= V (an embedding larger
    than the lm_head) and dropped positions land in a spare column V that is cut off."""
    idx = tokens.clamp(max=V).masked_fill(~keep, V)
    counts = torch.zeros(tokens.shape[0], V + 1, device=tokens.device)
    return counts.scatter_add_(1, idx, keep.float())[:, :V]


# ---------------------------------------------------------------------------------------------
# Penalties and bans (greedy and sampling alike). Each maker returns fn(logits, tokens, mask, n_prompt).
# ---------------------------------------------------------------------------------------------

def repetition_penalty(penalty: float) -> Processor:
    def fn(logits, tokens, mask, n_prompt):
        seen = _counts(tokens, mask, logits.shape[-1]) > 0
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        return torch.where(seen, penalized, logits)
    return fn


def no_repeat_ngram(n: int) -> Processor:
    """Ban every token that would complete an n-gram already present in the row: each earlier
    window of n real tokens whose first n-1 match the row's last n-1 tokens bans its last one."""

    def fn(logits, tokens, mask, n_prompt):
        B, T = tokens.shape
        V = logits.shape[-1]
        if T < n:
            return logits
        windows = tokens.unfold(1, n, 1)  # [B, T-n+1, n]
        real = mask.unfold(1, n, 1).all(-1)  # [B, T-n+1]: windows touching padding never count
        prefix = tokens[:, T - n + 1:]  # [B, n-1]; only windows of n real tokens can match
        hits = real & (windows[..., :-1] == prefix[:, None, :]).all(-1)
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        banned.scatter_(1, torch.where(hits, windows[..., -1].clamp(max=V), V), True)
        return logits.masked_fill(banned[:, :V], -math.inf)
    return fn


def bad_words(bad_words_ids) -> Processor:
    """A one-token bad word is always banned; a longer one bans its last token when its other
    tokens are the last real tokens of the row (transformers' NoBadWordsLogitsProcessor)."""
    singles = sorted({seq[0] for seq in bad_words_ids if len(seq) == 1})
    by_len: dict[int, list] = {}  # prefix length -> sequences
    for seq in dict.fromkeys(tuple(s) for s in bad_words_ids if len(s) > 1):
        by_len.setdefault(len(seq) - 1, []).append(seq)
    cache: dict[torch.device, tuple] = {}  # the constant tensors, built once per device

    def constants(device):
        if device not in cache:
            groups = [(L, torch.tensor([s[:-1] for s in seqs], device=device),  # [S, L]
                       torch.tensor([s[-1] for s in seqs], device=device))  # [S]
                      for L, seqs in by_len.items()]
            cache[device] = (torch.tensor(singles, dtype=torch.long, device=device), groups)
        return cache[device]

    def fn(logits, tokens, mask, n_prompt):
        B, T = tokens.shape
        V = logits.shape[-1]
        single_ids, groups = constants(logits.device)
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)  # V: spare column
        banned[:, single_ids] = True
        for L, prefixes, last in groups:
            if L > T:
                continue
            tail, tail_real = tokens[:, T - L:], mask[:, T - L:].all(-1)  # [B, L], [B]
            hits = tail_real[:, None] & (tail[:, None, :] == prefixes).all(-1)  # [B, S]
            banned.scatter_(1, torch.where(hits, last, V), True)
        return logits.masked_fill(banned[:, :V], -math.inf)
    return fn


def logit_bias(bias: dict[int, float]) -> Processor:
    ids, values = list(bias), list(bias.values())
    cache: dict[torch.device, Tensor] = {}

    def fn(logits, tokens, mask, n_prompt):
        if logits.device not in cache:
            dense = torch.zeros(logits.shape[-1], device=logits.device)
            dense[ids] = torch.tensor(values, dtype=dense.dtype, device=logits.device)
            cache[logits.device] = dense
        return logits + cache[logits.device]
    return fn


def openai_penalties(frequency: float, presence: float) -> Processor:
    """OpenAI: mu[j] -= frequency * c[j] + presence * (c[j] > 0), c counting generated tokens."""

    def fn(logits, tokens, mask, n_prompt):
        c = _counts(tokens, _generated(mask, n_prompt), logits.shape[-1])
        return logits - frequency * c - presence * (c > 0).to(logits.dtype)
    return fn


# ---------------------------------------------------------------------------------------------
# Warpers (sampling only): they shape the distribution, never the argmax
# ---------------------------------------------------------------------------------------------

def temperature(t: float) -> Processor:
    return lambda logits, *_: logits / t


def top_k(k: int) -> Processor:
    """Keep the k largest logits, and every logit tied with the k-th (as transformers)."""

    def fn(logits, *_):
        kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        return logits.masked_fill(logits < kth, -math.inf)
    return fn


def top_p(p: float) -> Processor:
    """Keep the smallest set of most likely tokens whose probability adds up to >= p (a token stays
    while the mass ranked above it is < p, so the first always stays), and every token tied with
    the last one kept. transformers breaks such ties by the order of its (unstable) sort instead."""

    def fn(logits, *_):
        sorted_logits = logits.sort(dim=-1, descending=True).values
        cum = sorted_logits.softmax(-1).cumsum(-1)
        n_keep = ((cum < p).sum(-1, keepdim=True) + 1).clamp(max=logits.shape[-1])  # [B, 1]
        cutoff = sorted_logits.gather(1, n_keep - 1)
        return logits.masked_fill(logits < cutoff, -math.inf)
    return fn


def min_p(m: float) -> Processor:
    """Keep tokens with probability >= m * (probability of the most likely token)."""

    def fn(logits, *_):
        probs = logits.softmax(-1)
        return logits.masked_fill(probs < m * probs.amax(-1, keepdim=True), -math.inf)
    return fn


def typical_p(mass: float) -> Processor:
    """Locally typical sampling (Meister et al. 2022): rank tokens by |-log p - H| (distance of their
    surprise from the entropy), keep the smallest most-typical set whose mass reaches `mass`,
    plus any token as typical as the last one kept."""

    def fn(logits, *_):
        logp = logits.log_softmax(-1)
        p = logp.exp()
        entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1, keepdim=True)  # 0 log 0 = 0
        distance = (-logp - entropy).abs()  # [B, V]; inf for banned tokens, ranked last
        sorted_distance, order = distance.sort(dim=-1)
        cum = p.gather(1, order).cumsum(-1)
        n_keep = ((cum < mass).sum(-1, keepdim=True) + 1).clamp(max=logits.shape[-1])  # [B, 1]
        cutoff = sorted_distance.gather(1, n_keep - 1)
        return logits.masked_fill(distance > cutoff, -math.inf)
    return fn


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------

def _check_ids(ids, vocab_size: int, name: str):
    bad = sorted({i for i in ids if i >= vocab_size})
    if bad:
        raise ValueError(f"SamplingParams.{name} has token ids outside the vocabulary "
                         f"(size {vocab_size}): {bad[:10]}")


def make_logits_processor(params: SamplingParams, vocab_size: int) -> Processor:
    """fn(logits [B, V], tokens [B, T], mask [B, T], n_prompt [B]) -> processed logits [B, V].
    Only the active steps are chained, in the order in the module docstring."""
    if not _is_int(vocab_size) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be an int > 0, got {vocab_size!r}")
    params.validate()  # frozen, but a dict field can still be mutated after construction
    if params.logit_bias:
        _check_ids(params.logit_bias, vocab_size, "logit_bias")
    if params.bad_words_ids:
        _check_ids([i for seq in params.bad_words_ids for i in seq], vocab_size, "bad_words_ids")

    steps: list[Processor] = []
    if params.repetition_penalty != 1.0:
        steps.append(repetition_penalty(params.repetition_penalty))
    if params.no_repeat_ngram_size > 0:
        steps.append(no_repeat_ngram(params.no_repeat_ngram_size))
    if params.bad_words_ids:
        steps.append(bad_words(params.bad_words_ids))
    if params.logit_bias:
        steps.append(logit_bias(dict(params.logit_bias)))
    if params.frequency_penalty or params.presence_penalty:
        steps.append(openai_penalties(params.frequency_penalty, params.presence_penalty))
    if not params.greedy:
        if params.temperature != 1.0:
            steps.append(temperature(params.temperature))
        if params.top_k > 0:
            steps.append(top_k(params.top_k))
        if params.top_p < 1.0:
            steps.append(top_p(params.top_p))
        if params.min_p > 0.0:
            steps.append(min_p(params.min_p))
        if params.typical_p < 1.0:
            steps.append(typical_p(params.typical_p))

    def process(logits: Tensor, tokens: Tensor, mask: Tensor, n_prompt: Tensor) -> Tensor:
        if logits.dim() != 2 or logits.shape[-1] != vocab_size:
            raise ValueError(f"logits must be [B, {vocab_size}], got {list(logits.shape)}")
        mask = mask.bool()
        for step in steps:
            logits = step(logits, tokens, mask, n_prompt)
        return logits

    process.steps = tuple(steps)  # for inspection and tests
    return process


def make_sampler(params: SamplingParams) -> Sampler:
    """fn(processed logits [B, V], generator) -> next tokens long [B]."""
    if params.greedy:
        return lambda logits, generator=None: kernels.argmax(logits)  # ties: the lowest id, as torch

    def sample(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = logits.float().softmax(-1)
        if not bool(torch.isfinite(probs).all()):  # multinomial's own error names no cause
            raise ValueError("the sampling values make the next-token distribution non-finite (a logit "
                             "overflowed after temperature and logit_bias): lower logit_bias or raise temperature")
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return sample


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator seeded on `device`, or None (torch's global RNG) when there is no seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def check_top_n(top_n, vocab_size: int) -> None:
    """Raise ValueError unless top_n is a number of alternatives `logprobs` can report."""
    if not _is_int(top_n) or not 0 <= top_n <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_n must be an int in [0, {MAX_TOP_LOGPROBS}], got {top_n!r}")
    if top_n > vocab_size:
        raise ValueError(f"top_n ({top_n}) is larger than the vocabulary ({vocab_size})")


def logprobs(logits: Tensor, tokens: Tensor, top_n: int = 0):
    """Log-softmax of the RAW logits: (chosen [B], top values [B, top_n], top ids [B, top_n]);
    the last two are None when top_n == 0."""
    check_top_n(top_n, logits.shape[-1])
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, tokens.long().view(-1, 1)).squeeze(1)
    if top_n == 0:
        return chosen, None, None
    values, ids = lp.topk(top_n, dim=-1)
    return chosen, values, ids
