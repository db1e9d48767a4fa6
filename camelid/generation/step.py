"""The one next-token step: raw logits + the rows' decoding state -> the chosen tokens (+ logprobs).

    decoding = Decoding.make(params, vocab_size, device, eos_token_ids=[2], min_new_tokens=4, logprobs=2)
    choice = next_tokens(decoding, logits, tokens, mask, n_prompt, n_generated)
    choice.tokens, choice.logprobs, choice.top_logprobs, choice.top_ids

Every decode loop chooses through here: `generate_tokens` (a left-padded batch, one call per
step), the engine (one call per running row, since each request has its own parameters) and
speculative decoding (one call per verified row, each with the text that row follows). The step:
  1. the request's logits processors (sampling.make_logits_processor) on the float32 logits;
  2. its EOS ids banned while fewer than min_new_tokens tokens are generated;
  3. a grammar constraint's mask, if the row has one (engine: JSON mode);
  4. the sampler (argmax, or multinomial with the request's generator);
  5. log-probabilities of the RAW logits (OpenAI's convention), when asked for.
It reads its arguments and changes nothing but the generator's state: the caller appends the
token, advances a constraint and decides whether the row ends. `Step` is what generate_tokens and
speculative_tokens yield per position (both import it from here, so neither imports the other).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from camelid.generation.sampling import (Processor, Sampler, SamplingParams, check_top_n, logprobs,
                                         make_generator, make_logits_processor, make_sampler)


@dataclass(frozen=True)
class Decoding:
    """What a request's next-token step needs that does not change from step to step."""
    process: Processor
    sample: Sampler
    generator: torch.Generator | None
    eos: Tensor  # long [E], sorted, maybe empty: banned before min_new_tokens
    min_new_tokens: int = 0
    logprobs: int | None = None  # None, or report the chosen token's and the n most likely log-probabilities

    @classmethod
    def make(cls, params: SamplingParams, vocab_size: int, device, eos_token_ids=(), min_new_tokens: int = 0,
             logprobs: int | None = None) -> "Decoding":
        """Validates params (against the vocabulary) and logprobs; seeds the generator on `device`."""
        process = make_logits_processor(params, vocab_size)
        if logprobs is not None:
            check_top_n(logprobs, vocab_size)
        eos = torch.tensor(sorted({int(e) for e in eos_token_ids}), dtype=torch.long, device=device)
        return cls(process, make_sampler(params), make_generator(params.seed, device), eos, min_new_tokens, logprobs)


@dataclass
class Choice:
    tokens: Tensor  # long [B]
    logprobs: Tensor | None = None  # [B] log-probability of each chosen token
    top_logprobs: Tensor | None = None  # [B, n] the n most likely tokens' log-probabilities ...
    top_ids: Tensor | None = None  # [B, n] ... and their ids


def next_tokens(decoding: Decoding, logits: Tensor, tokens: Tensor, mask: Tensor, n_prompt: Tensor,
                n_generated: int, constraint=None) -> Choice:
    """logits [B, V] (the model's, any float dtype) of rows whose text so far is tokens [B, T]
    (mask [B, T] 1 at real tokens; n_prompt [B] prompt tokens of each row), each row having
    generated n_generated tokens. constraint: None, or an object whose mask(scores) bans what
    a grammar does not allow next (generation/grammar.py)."""
    d = decoding
    scores = d.process(logits.float(), tokens, mask, n_prompt)
    if n_generated < d.min_new_tokens and d.eos.numel():
        scores = scores.clone()  # the processor may hand back its input when nothing is active
        scores[:, d.eos] = float("-inf")
    if constraint is not None:
        scores = constraint.mask(scores)
    chosen = d.sample(scores, d.generator)
    if d.logprobs is None:
        return Choice(chosen)
    return Choice(chosen, *logprobs(logits, chosen, d.logprobs))


# ---------------------------------------------------------------------- what the decode loops yield

@dataclass
class Step:
    """One decoding step for the whole batch."""
    tokens: torch.Tensor  # [B] the new token of each row (pad_id for rows already finished)
    finished: torch.Tensor  # [B] bool, True from the step a row ends on
    reasons: list[str | None] = field(default_factory=list)  # per row: "stop" | "length" | None
    logprobs: torch.Tensor | None = None  # [B] log-probability of each new token (raw logits)
    top_logprobs: torch.Tensor | None = None  # [B, n] the n most likely tokens' log-probabilities ...
    top_ids: torch.Tensor | None = None  # [B, n] ... and their ids


def check_generation_args(input_ids: torch.Tensor, max_new_tokens: int, context: int) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_len] with a non-empty prompt, got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if input_ids.shape[1] >= context:
        raise ValueError(f"the prompt has {input_ids.shape[1]} tokens; the model's context is {context}, "
                         f"which leaves no room to generate")
