"""tokenizer.model files, as Meta ships them: a SentencePiece protobuf (Llama 1/2) or tiktoken
ranks, one "base64-token rank" line each (Llama 3), whose special tokens follow the ranks.

The file layer only: camelid.text builds tokenizers on these; formats/meta.py reads the special
token ids for the config without building one.
"""

from __future__ import annotations

import base64
from pathlib import Path

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                  "<|image|>"] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]


def is_tiktoken(path: Path) -> bool:
    """Whether a tokenizer.model holds tiktoken ranks (its first line is "token rank")."""
    head = Path(path).read_bytes()[:64]
    try:
        first = head.split(b"\n", 1)[0].decode("ascii").split()
    except UnicodeDecodeError:
        return False
    return len(first) == 2 and first[1].isdigit()


def tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> merge rank; a line that is not "base64 rank" is an error naming it."""
    path = Path(path)
    ranks = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a tiktoken 'base64 rank' line") from None
    return ranks


def llama3_special_ids(n_ranks: int) -> dict[str, int]:
    """Llama 3's special tokens and their ids, which follow the file's ranks."""
    return {t: n_ranks + i for i, t in enumerate(LLAMA3_SPECIAL)}


def special_token_ids(path: Path) -> tuple[int | None, list[int]]:
    """(bos id, eos ids) a tokenizer.model names: SentencePiece's own bos/eos (through the
    sentencepiece library; -1 where the model has none), or for tiktoken ranks Llama 3's begin of
    text, and its end of text, end of message and end of turn. Raises when neither reads it."""
    path = Path(path)
    if is_tiktoken(path):
        special = llama3_special_ids(len(tiktoken_ranks(path)))
        return special["<|begin_of_text|>"], [special[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    return sp.bos_id(), [sp.eos_id()]
