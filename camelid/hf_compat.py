"""transformers' surface on camelid's model: `from_pretrained`, `generate`, `save_pretrained`.

The core LlamaForCausalLM (camelid/core/model.py) is what a Llama is and knows no file, loader or
decoding loop; this subclass adds the three methods transformers users call, each a thin call
into the layer that does the work (camelid/load.py, camelid/generation/). It lives above both, so
nothing below it imports upward to offer them. `camelid.LlamaForCausalLM` is this class.
"""

from __future__ import annotations

import sys

import torch

from camelid.core import model as core
from camelid.generation.generate import generate_tokens, speculative_steps
from camelid.generation.sampling import SamplingParams
from camelid.load import load, save
from camelid.text.streaming import IncrementalDecoder


class LlamaForCausalLM(core.LlamaForCausalLM):
    @classmethod
    def from_pretrained(cls, name_or_path=None, **kwargs) -> "LlamaForCausalLM":
        """Load a checkpoint: HF folder, .gguf file, packaged model name (the default model when
        None) or HF repo id. Options: see camelid.load.load."""
        return load(name_or_path, model_cls=cls, **kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """transformers' `generate` surface (model_generate below)."""
        return model_generate(self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, directory, **kwargs):
        """A HF folder (safetensors, written atomically); a quantized model keeps its codes and
        reloads quantized (camelid.load.save)."""
        return save(self, directory, **kwargs)


def load_pretrained(name_or_path=None, **kwargs) -> LlamaForCausalLM:
    """`LlamaForCausalLM.from_pretrained` as a function."""
    return LlamaForCausalLM.from_pretrained(name_or_path, **kwargs)


# ---------------------------------------------------------------------- generate, as transformers spells it

HF_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                    "no_repeat_ngram_size", "bad_words_ids", "seed", "frequency_penalty", "presence_penalty",
                    "logit_bias"}


def model_generate(model, input_ids, attention_mask=None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                   eos_token_id=None, pad_token_id=None, streamer=None, use_cache: bool = True,  # always cached
                   max_length: int | None = None, assistant_model=None, prompt_lookup_num_tokens: int | None = None,
                   max_matching_ngram_size: int = 3, num_assistant_tokens: int = 5, compile: bool = False,
                   cache_implementation: str | None = None, **kwargs) -> torch.Tensor:
    """`model.generate(...)` with transformers' keyword names: returns [B, prompt + new] token ids,
    finished rows padded with pad_token_id. Sampling defaults follow transformers (top_k=50 when
    do_sample=True and top_k is not given). assistant_model= (a draft model) or
    prompt_lookup_num_tokens= turn on speculative decoding (camelid.generation.speculative): greedy, one
    row, the very tokens of plain greedy decoding. compile=True: decode steps through torch.compile.
    cache_implementation="quantized" (transformers' name): an int8 KV cache."""
    if cache_implementation not in (None, "static", "quantized"):
        raise ValueError(f"cache_implementation must be 'static' (the default) or 'quantized' (int8), "
                         f"got {cache_implementation!r}")
    unknown = set(kwargs) - HF_SAMPLING_KEYS
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if kwargs.get("do_sample") and "top_k" not in kwargs:
        kwargs["top_k"] = 50
    params = SamplingParams(**kwargs)
    if max_length is not None:
        max_new_tokens = max_length - input_ids.shape[1]
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_ids
    eos = [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id if model.config.pad_token_id
                                                         is not None else (eos[0] if eos else 0))
    if streamer is not None:
        streamer.put(input_ids.cpu())
    out = [input_ids.to(model.device)]
    cache_dtype = "int8" if cache_implementation == "quantized" else None
    common = dict(params=params, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_token_ids=eos)
    if assistant_model is not None or prompt_lookup_num_tokens is not None:
        steps = speculative_steps(model, input_ids, attention_mask, assistant_model, prompt_lookup_num_tokens,
                             max_matching_ngram_size, num_assistant_tokens, cache_dtype, **common)
    else:
        steps = generate_tokens(model, input_ids, attention_mask, pad_token_id=pad, compile=compile,
                                cache_dtype=cache_dtype, **common)
    for step in steps:
        out.append(step.tokens[:, None])
        if streamer is not None:
            streamer.put(step.tokens.cpu())
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)


class TextStreamer:
    """transformers' TextStreamer: `model.generate(..., streamer=TextStreamer(tokenizer))` prints
    text as it is generated (the prompt too unless skip_prompt=True). Batch size 1."""

    def __init__(self, tokenizer, skip_prompt: bool = False, skip_special_tokens: bool = True, file=None):
        self.tokenizer, self.skip_prompt, self.file = tokenizer, skip_prompt, file or sys.stdout
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist() if value.ndim < 2 or value.shape[0] == 1 else None
        if ids is None:
            raise ValueError("TextStreamer supports batch size 1")
        if not self.prompt_seen:
            self.prompt_seen = True
            if self.skip_prompt:
                return
        self.on_text("".join(self.decoder.add(i) for i in ids))

    def end(self) -> None:
        self.on_text(self.decoder.flush(), stream_end=True)

    def on_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="\n" if stream_end else "", file=self.file, flush=True)
