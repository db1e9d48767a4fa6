"""Speculative decoding, batch 1, greedy: exactly the tokens of plain greedy decoding
(`generate_tokens` with the same greedy SamplingParams, logit processors included), in fewer
forwards of the target model.

    for step in speculative_tokens(model, ids, prompt_lookup_num_tokens=10, max_new_tokens=128): ...
    for step in speculative_tokens(model, ids, draft_model=small, num_assistant_tokens=5, ...): ...

Each round, with p the cache slot of the last accepted token (the target has not seen it yet):
  1. a drafter proposes k tokens d1..dk to follow the text: a draft model (k greedy steps over its
     own KV cache), or prompt lookup (the text's last n-gram, n = max_ngram_size..1, searched for
     earlier in prompt + generated text; the tokens that followed its first occurrence are the
     draft, as transformers' prompt_lookup_num_tokens does);
  2. the target runs ONE forward over [last, d1..dk] at slots p..p+k; row i's argmax g_i is the
     greedy choice after d_i (d_0 = last);
  3. g_0, g_1, ... are emitted while g_i == d_{i+1}: the matching drafts plus the target's own
     token at the first mismatch (or after the last draft). The KV cache is static, so the slots
     of rejected drafts are simply overwritten later: rollback is bookkeeping, for the draft's too.
A round costs one target forward (whose weights are read once for all k+1 rows) and emits 1..k+1.
k follows the acceptance (+2 after a round that accepts every draft, -1 otherwise, within
1..k_max): rejected rows cost verify work, so text the drafter cannot predict gets short drafts.

Exactness. Row i of a (k+1)-row forward must carry the very bits of a one-token decode step:
otherwise a near tie flips an argmax and the text forks (on the default model a plain forward
over the rows differs by up to 1e-4 in the logits, and in the K/V it writes, so errors compound).
  - Attention over k+1 queries with a causal mask rounds differently from one query over its own
    prefix. `verify_logits` therefore runs the model's one layer loop (LlamaModel.run) with a plan
    of one attention call per query exactly as decode makes it (core/masks.py decode_step_plan:
    same shapes and cache views, no mask) and RoPE per position (dynamic RoPE even depends on it).
    Norms, activations, residuals and embeddings work row by row already.
  - A linear layer may round a row differently depending on how many rows share the product
    (MKL's sgemm; oneDNN takes a GEMV path for a single row). That is a property of the kernels,
    so `rows_invariant` probes it once per model, thread count and row count. Where it fails,
    each draft token is verified with its own decode step: exact by construction (the same
    calls as generate_tokens), but no faster than plain decoding.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch

from camelid.core.cache import KVCache, model_cache
from camelid.core.masks import decode_step_plan
from camelid.core.model import LlamaDecoderLayer, LlamaForCausalLM
from camelid.generation.sampling import SamplingParams
from camelid.generation.step import Decoding, Step, check_generation_args, next_tokens


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target confirmed (the matching prefix of each round)
    target_forwards: int = 0  # target model calls, prefill included

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


# ---------------------------------------------------------------------- drafters

def prompt_lookup(tokens: list[int], k: int, max_ngram_size: int) -> list[int]:
    """Up to k tokens that followed the first earlier occurrence of the text's last n-gram, for
    the largest n <= max_ngram_size that occurs (transformers' PromptLookupCandidateGenerator)."""
    ids = torch.tensor(tokens)
    for n in range(min(max_ngram_size, len(tokens) - 1), 0, -1):
        windows = ids[:-1].unfold(0, n, 1)  # every n-gram that has a token after it
        hits = (windows == ids[-n:]).all(-1).nonzero()
        if hits.numel():
            start = int(hits[0]) + n
            return tokens[start:start + k]
    return []


class DraftModel:
    """A draft LlamaForCausalLM with its own KV cache, holding the first `seen` tokens of the text."""

    def __init__(self, model, size: int):
        self.model, self.seen, self.fed = model, 0, 0
        self.size = min(size, model.config.max_position_embeddings)
        self.cache = model_cache(model, 1, self.size)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """k greedy tokens after `tokens`: the unseen tokens in one forward, then one step each."""
        k = min(k, self.size - len(tokens) + 1)  # the last draft is never fed: slots < len + k - 1
        out, new, pos = [], tokens[self.seen:], self.seen
        if pos == 0 and len(new) > 1 and k > 0:  # the target prefilled the prompt and fed its first new
            head = torch.tensor([new[:-1]], device=self.model.device)  # token as a step: so does the draft
            self.model(head, cache=self.cache, cache_position=torch.arange(len(new) - 1, device=head.device),
                       logits_to_keep=1)
            new, pos = new[-1:], len(new) - 1
        for _ in range(max(k, 0)):
            ids = torch.tensor([new], device=self.model.device)
            slots = torch.arange(pos, pos + len(new), device=self.model.device)
            logits = self.model(ids, cache=self.cache, cache_position=slots, logits_to_keep=1).logits[0, -1]
            out.append(int(logits.float().argmax()))
            pos, new = pos + len(new), out[-1:]
        self.fed = pos  # slots [0, pos) hold tokens + out[:-1]
        return out

    def rollback(self, n_valid: int) -> None:
        """The text's first n_valid tokens are now settled: keep the cached slots that match them."""
        self.seen = min(self.fed, n_valid)


# ---------------------------------------------------------------------- exact verification

_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: bool}


def _row_units(model):
    """(module, input width) of every part that verify_logits runs on all T rows at once."""
    c, inner = model.config, model.model
    for layer in (m for m in inner.modules() if isinstance(m, LlamaDecoderLayer)):  # in order
        a = layer.self_attn
        projections = [a.qkv_proj.inner] if a.qkv_proj is not None else [a.q_proj, a.k_proj, a.v_proj]
        yield from ((layer.input_layernorm, c.hidden_size), *((p, c.hidden_size) for p in projections),
                    (a.o_proj, a.num_heads * a.head_dim),
                    (layer.post_attention_layernorm, c.hidden_size), (layer.mlp, c.hidden_size))
    yield from ((inner.norm, c.hidden_size), (model.lm_head, c.hidden_size))


def rows_invariant(model, rows: int) -> bool:
    """True when every part of the model that verify_logits applies to all rows at once (linear
    layers, MLPs, norms) gives a row the same bits alone as with up to `rows - 1` others. Kernels
    are chosen by shape, layout, dtype and thread count, not by values: one random probe per kind
    of part decides, and the answer is cached per model (weights and thread count)."""
    units = list(_row_units(model))
    key = (torch.get_num_threads(), rows, tuple(id(p) for m, _ in units for p in m.parameters()))
    seen = _probed.setdefault(model, {})
    if key not in seen:
        kinds = {(type(m), width, tuple((p.shape, p.dtype, "mkldnn" if p.is_mkldnn else p.stride())
                                        for p in m.parameters())): (m, width) for m, width in units}
        g, ok = torch.Generator().manual_seed(0), True
        with torch.inference_mode():
            for m, width in kinds.values():
                x = torch.randn(1, rows, width, generator=g).to(model.device, model.dtype)
                alone = torch.cat([m(x[:, i:i + 1]) for i in range(rows)], dim=1)
                ok = ok and all(torch.equal(m(x[:, :n]), alone[:, :n]) for n in range(2, rows + 1))
        seen[key] = ok
    return seen[key]


def verify_logits(model: LlamaForCausalLM, ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    """Logits [T, V] of ids [1, T] at cache slots start..start+T-1, writing their K/V. The model's
    own layers, with RoPE and attention per position exactly as a one-token decode step computes
    them (see the module docstring); equal to T decode steps where the linears are row-invariant."""
    inner, T = model.model, ids.shape[1]
    pos = torch.arange(start, start + T, device=ids.device)
    x = inner.embed_tokens(ids)
    rope = None
    if inner.rotary_emb is not None:
        parts = [inner.rotary_emb(pos[None, i:i + 1], x.dtype) for i in range(T)]
        rope = tuple(torch.cat(p, dim=1) for p in zip(*parts))  # cos, sin [1, T, D]
    plan = decode_step_plan(start, T, inner.alibi_slopes, ids.device)
    x, _ = inner.run(x, pos[None], plan, cache, pos, start + T, rope=rope)
    return model.lm_head(x)[0]


# ---------------------------------------------------------------------- the loop

def _check(model, input_ids, draft_model, prompt_lookup_num_tokens, max_ngram_size, num_assistant_tokens, params):
    if not params.greedy:
        raise ValueError("speculative decoding here is greedy: pass do_sample=False (or temperature=0); "
                         "logit processors such as repetition_penalty are fine")
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"the target must be a camelid LlamaForCausalLM, got {type(model).__name__}")
    if input_ids.ndim == 2 and input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding supports batch size 1, got {input_ids.shape[0]} rows")
    if (draft_model is None) == (prompt_lookup_num_tokens is None):
        raise ValueError("pass exactly one drafter: draft_model=... or prompt_lookup_num_tokens=...")

    def positive(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    if draft_model is None:
        positive("prompt_lookup_num_tokens", prompt_lookup_num_tokens)
        positive("max_ngram_size", max_ngram_size)
        return
    positive("num_assistant_tokens", num_assistant_tokens)
    if not isinstance(draft_model, LlamaForCausalLM):
        raise TypeError(f"draft_model must be a camelid LlamaForCausalLM, got {type(draft_model).__name__}")
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the "
                         f"target's ({model.config.vocab_size}): its token ids would mean other tokens")


@torch.inference_mode()
def speculative_tokens(model, input_ids: torch.Tensor, *, draft_model=None, prompt_lookup_num_tokens: int | None = None,
                       max_ngram_size: int = 3, num_assistant_tokens: int = 5, max_new_tokens: int,
                       min_new_tokens: int = 0, params: SamplingParams | None = None,
                       eos_token_ids=(), context: int | None = None,
                       stats: SpeculativeStats | None = None, adaptive: bool = True) -> Iterator[Step]:
    """Yield one Step per token (tokens [1]), the same Steps as greedy `generate_tokens` with the
    same params and min_new_tokens: reason "stop" on an EOS id, "length" at max_new_tokens or the
    end of the model's context. params must be greedy; its logit processors (repetition penalty,
    no-repeat n-grams, bad words, logit bias, penalties) apply to each verified row with the text
    that row follows. adaptive: the number of drafts per round follows the acceptance (as
    transformers' "heuristic" schedule): up to k_max while drafts are accepted, down to 1 while
    they are not, so text the drafter cannot predict costs little more than plain decoding."""
    params = params or SamplingParams()
    _check(model, input_ids, draft_model, prompt_lookup_num_tokens, max_ngram_size, num_assistant_tokens, params)
    context = context or model.config.max_position_embeddings
    check_generation_args(input_ids, max_new_tokens, context)
    stats = stats if stats is not None else SpeculativeStats()
    device, T0 = model.device, input_ids.shape[1]
    budget = min(max_new_tokens, context - T0)
    eos = {int(e) for e in eos_token_ids}
    choose = _chooser(model, params, eos, min_new_tokens, T0)
    k_max = num_assistant_tokens if draft_model is not None else prompt_lookup_num_tokens
    batched = rows_invariant(model, min(k_max, budget - 1) + 1)
    if not batched:
        warnings.warn("this model's layers round a row differently depending on how many rows are "
                      "multiplied (a kernel property, see camelid.generation.speculative): drafts are verified one decode "
                      "step at a time, exact but no faster than plain decoding", RuntimeWarning, stacklevel=3)
    drafter = DraftModel(draft_model, T0 + budget) if draft_model is not None else None

    # the prefill exactly as generate_tokens runs it (same cache size, mask and logits_to_keep)
    cache = model_cache(model, 1, T0 + budget)
    ids = input_ids.to(device)
    logits = model(ids, attention_mask=torch.ones_like(ids), cache=cache,
                   cache_position=torch.arange(T0, device=device), logits_to_keep=1).logits[:, -1]
    stats.target_forwards += 1
    tokens, emitted = ids[0].tolist(), 0
    k_now = k_max  # drafts per round: +2 after a round that accepts all, -1 after one that does not
    choices = choose(logits, tokens, [], 0)
    while True:
        for token in choices:  # each is the greedy choice after the tokens before it
            emitted += 1
            tokens.append(token)
            reason = "stop" if token in eos else ("length" if emitted == budget else None)
            yield Step(tokens=torch.tensor([token], device=device),
                       finished=torch.tensor([reason is not None], device=device), reasons=[reason])
            if reason is not None:
                return
        k = min(k_now, budget - emitted - 1)  # a round emits up to k + 1 tokens: never past the budget
        if k == 0:
            drafts = []
        else:
            drafts = drafter.propose(tokens, k) if drafter else prompt_lookup(tokens, k, max_ngram_size)
        p = len(tokens) - 1  # slot of the last token, the first row of the verify forward
        row = torch.tensor([tokens[-1:] + drafts], device=device)
        if batched and drafts:
            stats.target_forwards += 1
            greedy = choose(verify_logits(model, row, cache, p), tokens, drafts, emitted)
        else:  # one decode step per row, stopping at the first mismatch
            greedy = []
            for i in range(len(drafts) + 1):
                stats.target_forwards += 1
                mask = torch.ones(1, p + i + 1, dtype=torch.long, device=device)  # as generate_tokens passes
                step_logits = model(row[:, i:i + 1], attention_mask=mask, cache=cache,
                                    cache_position=torch.tensor([p + i], device=device), logits_to_keep=1).logits[0, -1]
                greedy += choose(step_logits[None], tokens + drafts[:i], [], emitted + i)
                if i == len(drafts) or greedy[i] != drafts[i]:
                    break
        n_ok = next((i for i, d in enumerate(drafts) if greedy[i] != d), len(drafts))
        stats.drafted, stats.accepted = stats.drafted + len(drafts), stats.accepted + n_ok
        if adaptive and drafts:  # rejected rows cost a verify forward more than they save
            k_now = min(k_max, k_now + 2) if n_ok == len(drafts) else max(1, k_now - 1)
        choices = greedy[:n_ok + 1]
        if drafter:
            drafter.rollback(p + 1 + n_ok)  # the last token and the accepted drafts


def _chooser(model, params, eos, min_new_tokens, n_prompt):
    """choose(logits [n, V], tokens, drafts, emitted) -> the greedy token after each of the n
    texts tokens + drafts[:i]: generate_tokens' own step (generation/step.py), one row at a time."""
    decoding = Decoding.make(params, model.config.vocab_size, model.device, eos, min_new_tokens)
    n_prompt = torch.tensor([n_prompt], device=model.device)

    def choose(logits, tokens, drafts, emitted):
        out = []
        for i in range(logits.shape[0]):
            text = torch.tensor([tokens + drafts[:i]], device=logits.device)
            out.append(int(next_tokens(decoding, logits[i:i + 1], text, torch.ones_like(text), n_prompt,
                                       emitted + i).tokens))
        return out
    return choose
