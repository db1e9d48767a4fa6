"""Tokenizers, with the API a transformers user already knows, on the field's libraries.

    tok = Tokenizer.from_pretrained(path)     # folder (tokenizer.json | tokenizer.model), or .gguf
    batch = tok(prompts, padding=True, return_tensors="pt")     # left padding, attention_mask
    tok.batch_decode(ids, skip_special_tokens=True)

Backends (no hand-written BPE anywhere):
  tokenizers     tokenizer.json, and vocabularies embedded in GGUF files (gpt2-style byte-level
                 BPE with its pre-tokenizer regex, and llama SentencePiece-style BPE from scores)
  sentencepiece  a SentencePiece tokenizer.model (Llama 1/2)
  tiktoken       a Llama 3 tokenizer.model (base64 token + rank per line)
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import torch

# ---------------------------------------------------------------------- backends
# Each backend: encode(text, parse_special) -> ids (no BOS/EOS added), decode(ids, skip_special)
# -> str, token_to_id, id_to_token, vocab_size, special_ids.


class _HFTokenizers:
    def __init__(self, tk):
        self.tk = tk
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        self.tk.encode_special_tokens = not parse_special
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token):
        return self.tk.token_to_id(token)

    def id_to_token(self, i):
        return self.tk.id_to_token(i)


class _SentencePiece:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = path

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.special_ids = {i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        return self.sp.encode(text)  # SentencePiece never parses control-token text

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [i for i in ids if not (skip_special and i in self.special_ids)]
        return self.sp.decode(ids)

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i):
        return self.sp.id_to_piece(i)


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                  "<|image|>"] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]


class _Tiktoken:
    def __init__(self, path: Path):
        import tiktoken

        self.path = path

        ranks = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{n}: not a tiktoken 'base64 rank' line") from None
        self.special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)}
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


# ---------------------------------------------------------------------- GGUF vocabularies

# llama.cpp pre-tokenizer name -> regexes applied in order (from llama.cpp's llama-vocab.cpp table)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
GGUF_PRE = {
    "default": [GPT2_PATTERN], "gpt2": [GPT2_PATTERN], "gpt-2": [GPT2_PATTERN],
    "llama-bpe": [LLAMA3_PATTERN], "llama3": [LLAMA3_PATTERN], "llama-v3": [LLAMA3_PATTERN],
    # digits one by one, then GPT-2's split
    "smollm": [r"\p{N}", GPT2_PATTERN], "starcoder": [r"\p{N}", GPT2_PATTERN],
    "refact": [r"\p{N}", GPT2_PATTERN], "codeshell": [r"\p{N}", GPT2_PATTERN],
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def gguf_tokenizer_backend(fields: dict):
    """Build a `tokenizers` backend from a GGUF file's tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("GGUF has no tokenizer.ggml.tokens vocabulary")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        pre = fields.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE:
            raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(GGUF_PRE)}")
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in GGUF_PRE[pre]]
        tk.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                        use_regex=False)])
        tk.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = fields.get("tokenizer.ggml.unknown_token_id", 0)
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores, types),
                                    unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
        prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
        tk.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else []) +
                                             [normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] +
                                       ([decoders.Strip(" ", 1, 0)] if prefix else []))
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 and llama are)")
    tk.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                   for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)])
    return _HFTokenizers(tk)


def _merges_from_scores(tokens, scores, types):
    """SentencePiece-BPE vocabularies store a score per piece instead of merges: a piece that can
    be split into two vocabulary pieces is their merge, ranked by the piece's score."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# ---------------------------------------------------------------------- the tokenizer

class BatchEncoding(dict):
    """input_ids / attention_mask as lists or tensors; `.to(device)` like transformers'."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _token_text(value):
    """tokenizer_config.json writes special tokens as strings or {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, backend, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, add_bos_token: bool = False,
                 add_eos_token: bool = False, chat_template: str | None = None,
                 extra_eos_token_ids=(), padding_side: str = "left", model_max_length: int | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self._pad_token = pad_token
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template
        self._extra_eos = [i for i in extra_eos_token_ids if i is not None]
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path=None) -> "Tokenizer":
        """A folder (tokenizer.json | tokenizer.model + configs), a .gguf file (or a folder with
        one), a packaged model name (the default model when None), or a HF repo id."""
        from .hub import DEFAULT_MODEL, resolve

        if path is None or (not Path(path).exists() and not str(path).startswith((".", "/"))):
            path = resolve(DEFAULT_MODEL if path is None else path)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist")
        if path.is_dir() and not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                path = ggufs[0]
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.is_file():
            path = path.parent
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        gen = _read_json(path / "generation_config.json")
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            backend = _HFTokenizers(HFTokenizer.from_file(str(path / "tokenizer.json")))
        elif (path / "tokenizer.model").is_file():
            backend = _tokenizer_model(path / "tokenizer.model")
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
        tokens = {name: _token_text(config.get(name, special_map.get(name)))
                  for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        if isinstance(backend, _Tiktoken):
            tokens["bos_token"] = tokens["bos_token"] or "<|begin_of_text|>"
            tokens["eos_token"] = tokens["eos_token"] or "<|end_of_text|>"
        elif isinstance(backend, _SentencePiece):  # the model file names its own specials
            sp = backend.sp
            for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
                if tokens[name] is None and i >= 0:
                    tokens[name] = sp.id_to_piece(i)
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        gen_eos = gen.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        # tokenizer.json's post-processor already adds BOS/EOS where the model wants them
        has_post = isinstance(backend, _HFTokenizers) and backend.tk.post_processor is not None
        default_bos = isinstance(backend, (_SentencePiece, _Tiktoken))
        return cls(backend, **tokens, chat_template=template, extra_eos_token_ids=gen_eos,
                   add_bos_token=bool(config.get("add_bos_token", default_bos)) and not has_post,
                   add_eos_token=bool(config.get("add_eos_token", False)) and not has_post,
                   model_max_length=config.get("model_max_length"))

    @classmethod
    def from_gguf(cls, path_or_fields) -> "Tokenizer":
        if isinstance(path_or_fields, dict):
            fields = path_or_fields
        else:
            from .formats.gguf_file import GGUFFile

            g = GGUFFile(path_or_fields)
            fields = g.fields
            g.close()
        backend = gguf_tokenizer_backend(fields)
        tokens = fields["tokenizer.ggml.tokens"]

        def tok(key):
            i = fields.get(f"tokenizer.ggml.{key}")
            if i is None:
                return None
            if not (isinstance(i, int) and 0 <= i < len(tokens)):
                raise ValueError(f"GGUF tokenizer.ggml.{key} {i!r} is outside the vocabulary")
            return tokens[i]

        kind = fields.get("tokenizer.ggml.model")
        tokenizer = cls(backend, bos_token=tok("bos_token_id"), eos_token=tok("eos_token_id"),
                   pad_token=tok("padding_token_id"), unk_token=tok("unknown_token_id"),
                   add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                   add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=fields.get("tokenizer.chat_template"),
                   extra_eos_token_ids=[fields.get("tokenizer.ggml.eot_token_id"),
                                        fields.get("tokenizer.ggml.eom_token_id")])
        # kept so save_gguf can write the vocabulary back exactly (token types, space prefix, ...)
        tokenizer.gguf_fields = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
        return tokenizer

    # ------------------------------------------------------------------ ids of special tokens
    def convert_tokens_to_ids(self, token):
        if isinstance(token, list):
            return [self.convert_tokens_to_ids(t) for t in token]
        return None if token is None else self.backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            self._check_ids([ids])
            return self.backend.id_to_token(ids)
        self._check_ids(ids)
        return [self.backend.id_to_token(i) for i in ids]

    bos_token_id = property(lambda self: self.convert_tokens_to_ids(self.bos_token))
    eos_token_id = property(lambda self: self.convert_tokens_to_ids(self.eos_token))
    unk_token_id = property(lambda self: self.convert_tokens_to_ids(self.unk_token))

    @property
    def pad_token(self):
        return self._pad_token

    @pad_token.setter
    def pad_token(self, token):
        if token is not None and self.backend.token_to_id(token) is None:
            raise ValueError(f"pad_token {token!r} is not in the vocabulary")
        self._pad_token = token

    @property
    def pad_token_id(self):
        return self.convert_tokens_to_ids(self._pad_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a turn: eos, generation_config's list, GGUF eot/eom."""
        ids = [self.eos_token_id] + self._extra_eos
        return sorted({i for i in ids if i is not None})

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def __len__(self):
        return self.backend.vocab_size

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS/EOS as the model expects. Special-token
        text inside `text` becomes control tokens unless parse_special=False."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if add_special_tokens and isinstance(self.backend, _HFTokenizers) and self.backend.tk.post_processor:
            self.backend.tk.encode_special_tokens = not parse_special
            return self.backend.tk.encode(text, add_special_tokens=True).ids
        ids = self.backend.encode(text, parse_special)
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        self._check_ids(ids)
        return self.backend.decode(ids, skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def _check_ids(self, ids) -> None:
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.backend.vocab_size:
                raise ValueError(f"token id {i!r} is outside the vocabulary [0, {self.backend.vocab_size})")

    def __call__(self, text, padding=False, truncation=False, max_length: int | None = None,
                 return_tensors: str | None = None, add_special_tokens: bool = True,
                 padding_side: str | None = None, return_attention_mask: bool = True) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a list of str")
        rows = [self.encode(t, add_special_tokens) for t in texts]
        if truncation:
            limit = max_length or self.model_max_length
            if not limit:
                raise ValueError("truncation=True needs max_length")
            rows = [r[:limit] for r in rows]
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding {padding!r} is not one of True, False, 'longest', 'max_length'")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side {side!r} is not 'left' or 'right'")
        masks = [[1] * len(r) for r in rows]
        if padding and padding != "do_not_pad":
            width = max_length if padding == "max_length" else max(map(len, rows), default=0)
            if width is None:
                raise ValueError("padding='max_length' needs max_length")
            pad = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
            if pad is None:
                raise ValueError("padding needs a pad_token or an eos_token")
            for k, r in enumerate(rows):
                fill = width - len(r)
                rows[k] = [pad] * fill + r if side == "left" else r + [pad] * fill
                masks[k] = [0] * fill + masks[k] if side == "left" else masks[k] + [0] * fill
        if return_tensors == "pt":
            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows have different lengths; pass padding=True to return tensors")
            out = {"input_ids": torch.tensor(rows, dtype=torch.long),
                   "attention_mask": torch.tensor(masks, dtype=torch.long)}
        elif return_tensors is None:
            out = {"input_ids": rows[0] if single else rows, "attention_mask": masks[0] if single else masks}
        else:
            raise ValueError(f"return_tensors {return_tensors!r} is not supported (use 'pt' or None)")
        if not return_attention_mask:
            out.pop("attention_mask")
        return BatchEncoding(out)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory) -> Path:
        """Write the files transformers and camelid read: tokenizer.json (or the original
        tokenizer.model) and tokenizer_config.json with the special tokens and chat template."""
        from .config import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.backend, _HFTokenizers):
            atomic_write_text(directory / "tokenizer.json", self.backend.tk.to_str(pretty=True))
        else:
            import shutil

            tmp = directory / ".tokenizer.model.tmp"
            shutil.copyfile(self.backend.path, tmp)
            tmp.replace(directory / "tokenizer.model")
        config = {"tokenizer_class": "PreTrainedTokenizerFast" if isinstance(self.backend, _HFTokenizers)
                  else "LlamaTokenizer", "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "unk_token": self.unk_token,
                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "model_max_length": self.model_max_length or 10**30, "padding_side": self.padding_side}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory

    # ------------------------------------------------------------------ chat
    def special_tokens(self) -> list[str]:
        """The text of every control token, longest first."""
        texts = {self.backend.id_to_token(i) for i in self.backend.special_ids}
        return sorted((t for t in texts if t), key=len, reverse=True)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True,
                            return_tensors: str | None = None, return_dict: bool = False,
                            chat_template: str | None = None, parse_special_in_messages: bool = False,
                            **kwargs):
        """Render `messages` with the model's Jinja template (sandboxed, see chat.py).

        Control-token text that a user typed inside a message ("<|im_end|>") stays plain text
        unless parse_special_in_messages=True; the template's own control tokens are parsed."""
        from .chat import render_chat

        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this tokenizer has no chat_template; pass chat_template=...")
        specials = [] if parse_special_in_messages else self.special_tokens()
        messages, literals = _shield_specials(messages, specials)
        text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                           pad_token=self.pad_token or "", unk_token=self.unk_token or "", **kwargs)
        if not tokenize:
            return _unshield(text, literals)
        ids = []
        for k, piece in enumerate(_SHIELD.split(text)):  # even pieces: template text; odd: literal ids
            ids += self.encode(piece, add_special_tokens=False) if k % 2 == 0 else \
                self.encode(literals[int(piece)], add_special_tokens=False, parse_special=False)
        if self.bos_token_id is not None and ids[:2] == [self.bos_token_id] * 2:
            ids = ids[1:]  # a template that writes BOS on a tokenizer that adds it: keep one
        if return_dict:
            out = BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * len(ids)]})
            return BatchEncoding({k: torch.tensor(v) for k, v in out.items()}) if return_tensors == "pt" else \
                BatchEncoding({k: v[0] for k, v in out.items()})
        return torch.tensor([ids]) if return_tensors == "pt" else ids


# Private-use code points mark user-typed control-token text while the template renders.
_SHIELD_OPEN, _SHIELD_CLOSE = "\U000F0000", "\U000F0001"
_SHIELD = re.compile(f"{_SHIELD_OPEN}(\\d+){_SHIELD_CLOSE}")


def _shield_specials(messages, specials):
    if not specials:
        return messages, []
    pattern = re.compile("|".join(map(re.escape, specials)))
    literals: list[str] = []

    def shield(text):
        def mark(m):
            literals.append(m.group(0))
            return f"{_SHIELD_OPEN}{len(literals) - 1}{_SHIELD_CLOSE}"
        return pattern.sub(mark, text)

    out = []
    for m in messages:
        m = dict(m) if isinstance(m, dict) else m
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            m["content"] = shield(m["content"])
        out.append(m)
    return out, literals


def _unshield(text, literals):
    return _SHIELD.sub(lambda m: literals[int(m.group(1))], text) if literals else text


def _tokenizer_model(path: Path):
    """tokenizer.model is a SentencePiece protobuf (Llama 1/2) or tiktoken ranks (Llama 3)."""
    head = path.read_bytes()[:64]
    try:
        first = head.split(b"\n", 1)[0].decode("ascii").split()
        is_tiktoken = len(first) == 2 and first[1].isdigit()
    except UnicodeDecodeError:
        is_tiktoken = False
    if is_tiktoken:
        return _Tiktoken(path)
    try:
        return _SentencePiece(path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: neither a SentencePiece model nor tiktoken ranks: {e}") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


class IncrementalDecoder:
    """Streaming detokenization: feed ids one at a time, get the new text, never half a UTF-8
    character (a byte-fallback or byte-level token may hold part of one) and with the spaces a
    whole-sequence decode would give (SentencePiece strips a leading space per decode call)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids before this are settled context
        self.read_offset = 0  # text of ids[prefix_offset:read_offset] was already emitted

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset:], self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes to U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]
