"""The tokenizer backends, each on one of the field's libraries (no hand-written BPE anywhere):

  HFTokenizers   `tokenizers`: tokenizer.json, and vocabularies embedded in GGUF files
  SentencePiece  `sentencepiece`: a SentencePiece tokenizer.model (Llama 1/2)
  Tiktoken       `tiktoken`: a Llama 3 tokenizer.model (base64 token + rank per line)

Each: encode(text, parse_special) -> ids (no BOS/EOS added), decode(ids, skip_special) -> str,
token_to_id, id_to_token, vocab_size, special_ids. camelid.text.tokenizer.Tokenizer wraps one.
"""

from __future__ import annotations

import re

from pathlib import Path

from camelid.formats.tokenizer_model import (LLAMA3_PATTERN, LLAMA3_SPECIAL, is_tiktoken, llama3_special_ids,
                                             tiktoken_ranks)

__all__ = ["HFTokenizers", "LLAMA3_PATTERN", "LLAMA3_SPECIAL", "SentencePiece", "Tiktoken", "tokenizer_model"]


class HFTokenizers:
    """A `tokenizers` Tokenizer. aliases: ids whose string another id also has (a GGUF vocabulary
    with duplicates): they hold a placeholder piece and decode as the id they alias."""

    def __init__(self, tk, aliases: dict[int, int] | None = None):
        self.tk = tk
        self.aliases = aliases or {}
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self.special_ids |= {i for i, j in self.aliases.items() if j in self.special_ids}

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        self.tk.encode_special_tokens = not parse_special
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [self.aliases.get(i, i) for i in ids] if self.aliases else list(ids)
        return self.tk.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token):
        return self.tk.token_to_id(token)

    def id_to_token(self, i):
        return self.tk.id_to_token(self.aliases.get(i, i))


class SentencePiece:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = path

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.special_ids = {i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        pieces = {self.sp.id_to_piece(i): i for i in self.special_ids if self.sp.id_to_piece(i)}
        self.special_pieces = pieces
        # control-token text ("<s>", "</s>") in a text to parse: split on it, longest first
        self._specials = re.compile("(" + "|".join(map(re.escape, sorted(pieces, key=len, reverse=True))) + ")") \
            if pieces else None

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """SentencePiece itself never reads control-token text; as transformers' LlamaTokenizer,
        parse_special splits the text on it and encodes each piece between on its own."""
        if not parse_special or self._specials is None:
            return self.sp.encode(text)
        ids = []
        for k, part in enumerate(self._specials.split(text)):
            if k % 2:
                ids.append(self.special_pieces[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [i for i in ids if not (skip_special and i in self.special_ids)]
        return self.sp.decode(ids)

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i):
        return self.sp.id_to_piece(i)


class Tiktoken:
    def __init__(self, path: Path):
        import tiktoken

        self.path = path

        ranks = tiktoken_ranks(path)
        self.special = llama3_special_ids(len(ranks))
        self.enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self.vocab_size = self.enc.n_vocab
        self.special_ids = set(self.special.values())

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        return self.enc.encode(text, allowed_special="all" if parse_special else set(), disallowed_special=())

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.enc.decode([i for i in ids if not (skip_special and i in self.special_ids)])

    def token_to_id(self, token):
        if token in self.special:
            return self.special[token]
        try:
            return self.enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    def id_to_token(self, i):
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")


def tokenizer_model(path: Path):
    """tokenizer.model is a SentencePiece protobuf (Llama 1/2) or tiktoken ranks (Llama 3)."""
    if is_tiktoken(path):
        return Tiktoken(path)
    try:
        return SentencePiece(path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: neither a SentencePiece model nor tiktoken ranks: {e}") from None
