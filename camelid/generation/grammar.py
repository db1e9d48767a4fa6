"""Constrained decoding: only tokens that keep the output valid JSON (of a schema) may be sampled.

    constraint = JsonConstraint(tokenizer, schema)       # schema None: any JSON object
    scores = constraint.mask(scores)                     # [1, V]: disallowed tokens -> -inf
    constraint.advance(token)                            # after sampling
    constraint.done                                      # complete: only EOS is left

Built on llguidance (a maintained Rust grammar engine with a JSON-schema compiler and token-trie
masks, ~2 ms per step on a 49k vocabulary here) rather than a hand-written JSON automaton: the
schema compiler and the tokenizer-aware mask are the hard, bug-prone parts. EOS is allowed
exactly when the JSON is complete, so a constrained answer always parses.
"""

from __future__ import annotations

import torch

_TOKENIZERS: dict[int, object] = {}  # id(camelid Tokenizer) -> llguidance.LLTokenizer (built once: ~0.5 s)


class ConstraintError(ValueError):
    """The schema cannot be compiled, or this tokenizer cannot be constrained."""


def _ll_tokenizer(tokenizer):
    import llguidance

    key = id(tokenizer)
    if key not in _TOKENIZERS:
        tk = getattr(tokenizer.backend, "tk", None)
        if tk is None:
            raise ConstraintError("constrained output needs a tokenizer.json (Hugging Face tokenizers) vocabulary; "
                                  "this model's tokenizer is SentencePiece or tiktoken")
        _TOKENIZERS[key] = llguidance.LLTokenizer(tk.to_str(), eos_token=list(tokenizer.eos_token_ids))
    return _TOKENIZERS[key]


def compile_schema(schema: dict | None) -> str:
    """An llguidance grammar for `schema` (None: any JSON object); compact JSON (no free whitespace,
    so a model cannot pad forever)."""
    try:
        import llguidance
    except ImportError:
        raise ConstraintError("constrained output needs llguidance: pip install 'camelid[serve]'") from None
    if schema is not None and not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                             overrides={"whitespace_flexible": False})
    except (ValueError, RuntimeError, TypeError) as e:
        raise ConstraintError(f"the JSON schema cannot be compiled: {e}") from None


class JsonConstraint:
    def __init__(self, tokenizer, schema: dict | None = None, grammar: str | None = None):
        import llguidance

        self.vocab_size = len(tokenizer)
        grammar = grammar or compile_schema(schema)
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), grammar)
        if self.matcher.is_error():
            raise ConstraintError(f"the JSON schema cannot be used: {self.matcher.get_error()}")

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [1, V] with every token the grammar forbids at -inf."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
        n = min(len(allowed), scores.shape[-1])
        keep[:n] = allowed[:n] > 0
        return scores.masked_fill(~keep.to(scores.device), float("-inf"))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise ConstraintError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()

