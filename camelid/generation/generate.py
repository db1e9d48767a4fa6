"""Generation as an iterator: prefill the prompt into a KV cache, then one token per step.

    for step in generate_tokens(model, ids, mask, params=SamplingParams(), max_new_tokens=64): ...
    texts = generate(model, tokenizer, ["prompt", ...], max_new_tokens=64, stop=["\\n\\n"])
    # model.generate(...) with transformers' keyword names: camelid/hf_compat.py, on top of generate_tokens

Rows of a batch are left-padded; each row's RoPE positions come from its attention mask, so a
padded row computes what it would alone. Rows stop independently (any EOS id, a stop string,
max_new_tokens, or the end of the model's context); a finished row emits padding.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterator

import torch

from camelid.core.cache import model_cache
from camelid.generation.sampling import SamplingParams, check_top_n
from camelid.generation.step import Choice, Decoding, Step, check_generation_args, next_tokens


@torch.inference_mode()
def generate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    params: SamplingParams | None = None, max_new_tokens: int = 64, min_new_tokens: int = 0,
                    eos_token_ids=(), pad_token_id: int | None = None, context: int | None = None,
                    logprobs: int | None = None, halted: set[int] | None = None,
                    compile: bool = False, cache_dtype: str | None = None) -> Iterator[Step]:
    """Yield one Step per generated position until every row has finished.

    logprobs: None, or n >= 0 to report each new token's log-probability and the n most likely
    alternatives. Rows that finish are dropped from the batch (and from the KV cache), so they
    stop costing compute; each row's numbers do not depend on its neighbours (attention_plan in
    model.py, packed linears on CPU), so that changes no output.

    halted: a set the caller may add row indices to between steps (a stop string matched, a
    client went away): those rows leave the batch before the next forward and emit padding.

    compile: run the one-token decode steps through torch.compile (see compiled_decoder; needs a
    model loaded with pack=False); the prefill stays eager. Off by default: it compiles for minutes
    on a small CPU and is not batch-invariant (README has the measured trade-off).

    cache_dtype: None (the model's default: float16 keys and values for GGUF-block weights, as
    llama.cpp keeps them, else the model's dtype), "int8" (cache.Int8KVCache: a quarter of
    float32's bytes, for long contexts; attention reads them dequantized), or "float32",
    "bfloat16", "float16"."""
    params = params or SamplingParams()
    config = model.config
    context = context or config.max_position_embeddings
    check_generation_args(input_ids, max_new_tokens, context)
    device = model.device
    input_ids = input_ids.to(device)
    B, T0 = input_ids.shape
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).long()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("a row of the batch is all padding: every prompt needs at least one token")
    if logprobs is not None:
        check_top_n(logprobs, config.vocab_size)
    room = context - T0  # the cache never holds more slots than the model has positions
    budget = min(max_new_tokens, room)
    decoding = Decoding.make(params, config.vocab_size, device, eos_token_ids, min_new_tokens, logprobs)
    eos = decoding.eos
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    n_prompt = mask.sum(-1)

    decode = compiled_decoder(model) if compile else model
    cache = model_cache(model, B, T0 + budget, cache_dtype)
    logits = model(input_ids, attention_mask=mask, cache=cache, cache_position=torch.arange(T0, device=device),
                   logits_to_keep=1).logits[:, -1]
    tokens = input_ids
    rows = torch.arange(B, device=device)  # the original row of each row still in the batch
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(budget):
        choice = next_tokens(decoding, logits, tokens, mask, n_prompt, step)
        nxt = choice.tokens  # [live rows]
        hit_eos = torch.isin(nxt, eos) if eos.numel() else torch.zeros_like(nxt, dtype=torch.bool)
        last = step == budget - 1
        out = torch.full((B,), pad, dtype=nxt.dtype, device=device)
        out[rows] = nxt
        reasons = [None] * B
        for r, e in zip(rows.tolist(), hit_eos.tolist()):
            reasons[r] = "stop" if e else ("length" if last else None)
        finished = finished.clone()
        finished[rows] = hit_eos | last
        yield Step(out, finished, reasons, *_logprobs(choice, rows, B))
        done = hit_eos
        if halted:
            done = done | torch.isin(rows, torch.tensor(sorted(halted), dtype=rows.dtype, device=device))
            finished = finished.clone()
            finished[rows[done]] = True
        if bool(finished.all()):
            return
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=device)], dim=1)
        if bool(done.any()):  # drop the rows that just finished
            live = (~done).nonzero().squeeze(1)
            rows, tokens, mask, n_prompt, nxt = rows[live], tokens[live], mask[live], n_prompt[live], nxt[live]
            cache.keep(live)
        logits = decode(nxt[:, None], attention_mask=mask, cache=cache,
                        cache_position=torch.tensor([T0 + step], device=device), logits_to_keep=1).logits[:, -1]


_compiled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_decoder(model):
    """`model` through torch.compile, once per model (dynamic shapes: the mask grows one column
    per step and the batch shrinks as rows finish, which must not recompile every step). The
    graph breaks where the model reads the cache position and the padding layout as Python
    numbers (kv_len, attention_plan): those decide shapes, so they stay eager."""
    from camelid.transforms.packed import is_packed

    if is_packed(model):  # inductor cannot lower mkldnn._linear_pointwise on these inputs (measured)
        raise ValueError("compile=True needs plain linear weights: load with pack=False (torch.compile does its "
                         "own weight layout)")
    if model not in _compiled:
        _compiled[model] = torch.compile(model, dynamic=True)
    return _compiled[model]


def _logprobs(choice: Choice, rows, B):
    """Step's logprob fields, scattered back to the full batch (finished rows: 0 / -inf)."""
    chosen, values, ids = choice.logprobs, choice.top_logprobs, choice.top_ids
    if chosen is None:
        return None, None, None
    full = torch.zeros(B, dtype=chosen.dtype, device=chosen.device)
    full[rows] = chosen
    if values is None:
        return full, None, None
    n = values.shape[1]
    top = torch.full((B, n), float("-inf"), device=values.device)
    top_ids = torch.zeros((B, n), dtype=ids.dtype, device=ids.device)
    top[rows], top_ids[rows] = values, ids
    return full, top, top_ids


# ---------------------------------------------------------------------- the transformers surface

def speculative_steps(model, input_ids, attention_mask, assistant_model, prompt_lookup_num_tokens,
                 max_matching_ngram_size=3, num_assistant_tokens=5, cache_dtype=None, **common):
    """camelid.generation.speculative for transformers-style arguments (generate, and model.generate)."""
    from camelid.generation.speculative import speculative_tokens

    if cache_dtype is not None:
        raise ValueError(f"speculative decoding keeps the model's default KV cache: drop cache_dtype={cache_dtype!r}")
    drafter = {}  # both drafters given: speculative_tokens rejects the pair
    if assistant_model is not None:
        drafter.update(draft_model=assistant_model, num_assistant_tokens=num_assistant_tokens)
    if prompt_lookup_num_tokens is not None:
        drafter.update(prompt_lookup_num_tokens=prompt_lookup_num_tokens, max_ngram_size=max_matching_ngram_size)
    return speculative_tokens(model, _unpadded(input_ids, attention_mask), **drafter, **common)


def _unpadded(input_ids, attention_mask):
    """A one-row prompt without its left padding (speculative decoding runs one row)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding (assistant_model / prompt_lookup_num_tokens) supports batch size 1, "
                         f"got input_ids of shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return input_ids
    real = attention_mask[0].bool()
    start = int(real.long().argmax()) if bool(real.any()) else input_ids.shape[1]
    if not bool(real[start:].all()):
        raise ValueError("speculative decoding needs a left-padded attention_mask (zeros, then ones)")
    return input_ids[:, start:]


# ---------------------------------------------------------------------- text in, text out

@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length"


def generate(model, tokenizer, prompts, max_new_tokens: int = 64, stop=(), chat: bool = False,
             min_new_tokens: int = 0, on_text=None, assistant_model=None, prompt_lookup_num_tokens: int | None = None,
             cache_dtype: str | None = None, **sampling) -> list[Completion]:
    """Generate for a list of prompts (strings, or message lists with chat=True). Stop strings
    are matched across token boundaries and trimmed from the text. `on_text(row, delta)` is
    called with each new piece of text (an incremental detokenizer: never half a character).
    assistant_model= or prompt_lookup_num_tokens= decode one greedy prompt speculatively;
    cache_dtype="int8" keeps the KV cache in int8 (see generate_tokens)."""
    from camelid.text.streaming import IncrementalDecoder, StopMatcher

    single = isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], dict))
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    stops = [StopMatcher(stop) for _ in prompts]  # checks the stop strings
    if chat:
        rows = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    else:
        if any(not isinstance(p, str) or p == "" for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        rows = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    params = SamplingParams(**sampling)
    eos = sorted(set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids))
    decoders = [IncrementalDecoder(tokenizer) for _ in rows]
    tokens, reasons = [[] for _ in rows], [None] * len(rows)
    halted: set[int] = set()  # rows a stop string ended: generate_tokens drops them from the batch
    common = dict(params=params, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_token_ids=eos)
    if assistant_model is not None or prompt_lookup_num_tokens is not None:  # one prompt, greedy
        steps = speculative_steps(model, ids, mask, assistant_model, prompt_lookup_num_tokens, cache_dtype=cache_dtype,
                             **common)
    else:
        steps = generate_tokens(model, ids, mask, pad_token_id=pad, halted=halted, cache_dtype=cache_dtype, **common)
    for step in steps:
        for r, token in enumerate(step.tokens.tolist()):
            if reasons[r] is not None:
                continue
            if step.reasons[r] == "stop":  # an EOS id: not part of the text
                reasons[r], delta = "stop", decoders[r].flush()
            else:
                tokens[r].append(token)
                delta = decoders[r].add(token)
                if step.reasons[r] == "length":
                    reasons[r], delta = "length", delta + decoders[r].flush()
            delta, hit = stops[r].feed(delta, final=reasons[r] is not None)
            if hit:
                reasons[r] = "stop"
                halted.add(r)
            if on_text and delta:
                on_text(r, delta)
        if all(reason is not None for reason in reasons):
            break  # every row stopped (stop strings end rows the token loop does not know about)
    return [Completion(m.text, k, reason or "length") for m, k, reason in zip(stops, tokens, reasons)]
