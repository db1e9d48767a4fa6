"""Tokenizers, with the API a transformers user already knows, on the field's libraries.

    tok = Tokenizer.from_pretrained(path)     # folder (tokenizer.json | tokenizer.model), or .gguf
    batch = tok(prompts, padding=True, return_tensors="pt")     # left padding, attention_mask
    tok.batch_decode(ids, skip_special_tokens=True)

Backends (text/backends.py, no hand-written BPE anywhere):
  tokenizers     tokenizer.json, and vocabularies embedded in GGUF files (text/gguf_vocab.py:
                 gpt2-style byte-level BPE with its pre-tokenizer regex, and llama
                 SentencePiece-style BPE from scores)
  sentencepiece  a SentencePiece tokenizer.model (Llama 1/2)
  tiktoken       a Llama 3 tokenizer.model (base64 token + rank per line)
Streaming detokenization and stop strings: text/streaming.py.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import torch

from camelid.text.backends import HFTokenizers, SentencePiece, Tiktoken, tokenizer_model
from camelid.text.chat_template import named_templates, pick_template, render_chat
from camelid.text.gguf_vocab import LLAMA3_PRE, gguf_tokenizer_backend

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
                 add_eos_token: bool = False, chat_template: str | list | dict | None = None,
                 extra_eos_token_ids=(), padding_side: str = "left", model_max_length: int | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self._pad_token = pad_token
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_templates = named_templates(chat_template)  # {name: template}
        self.chat_template = self.chat_templates.get("default")
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
        from camelid.formats.hub import DEFAULT_MODEL, resolve

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

            backend = HFTokenizers(HFTokenizer.from_file(str(path / "tokenizer.json")))
        elif (path / "tokenizer.model").is_file():
            backend = tokenizer_model(path / "tokenizer.model")
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
        tokens = {name: _token_text(config.get(name, special_map.get(name)))
                  for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        if isinstance(backend, Tiktoken):
            tokens["bos_token"] = tokens["bos_token"] or "<|begin_of_text|>"
            tokens["eos_token"] = tokens["eos_token"] or "<|end_of_text|>"
        elif isinstance(backend, SentencePiece):  # the model file names its own specials
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
        has_post = isinstance(backend, HFTokenizers) and backend.tk.post_processor is not None
        default_bos = isinstance(backend, (SentencePiece, Tiktoken))
        return cls(backend, **tokens, chat_template=template, extra_eos_token_ids=gen_eos,
                   add_bos_token=bool(config.get("add_bos_token", default_bos)) and not has_post,
                   add_eos_token=bool(config.get("add_eos_token", False)) and not has_post,
                   model_max_length=config.get("model_max_length"))

    @classmethod
    def from_gguf(cls, path_or_fields) -> "Tokenizer":
        if isinstance(path_or_fields, dict):
            fields = path_or_fields
        else:
            from camelid.formats.gguf_file import GGUFFile

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
        # BOS by default for SentencePiece vocabularies and Llama 3's, as llama.cpp does
        bos_default = kind == "llama" or fields.get("tokenizer.ggml.pre") in LLAMA3_PRE
        tokenizer = cls(backend, bos_token=tok("bos_token_id"), eos_token=tok("eos_token_id"),
                   pad_token=tok("padding_token_id"), unk_token=tok("unknown_token_id"),
                   add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", bos_default)),
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
        if add_special_tokens and isinstance(self.backend, HFTokenizers) and self.backend.tk.post_processor:
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
        from camelid.atomic import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.backend, HFTokenizers):
            atomic_write_text(directory / "tokenizer.json", self.backend.tk.to_str(pretty=True))
        else:
            import shutil

            tmp = directory / ".tokenizer.model.tmp"
            shutil.copyfile(self.backend.path, tmp)
            tmp.replace(directory / "tokenizer.model")
        config = {"tokenizer_class": "PreTrainedTokenizerFast" if isinstance(self.backend, HFTokenizers)
                  else "LlamaTokenizer", "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "unk_token": self.unk_token,
                  "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "model_max_length": self.model_max_length or 10**30, "padding_side": self.padding_side}
        if set(self.chat_templates) == {"default"}:
            config["chat_template"] = self.chat_template
        elif self.chat_templates:  # written back in the list form it came in
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
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
        unless parse_special_in_messages=True; the template's own control tokens are parsed.
        chat_template: a template's text or, for a tokenizer with several, one of their names."""
        template = pick_template(self.chat_templates, chat_template, kwargs.get("tools"))
        specials = [] if parse_special_in_messages else self.special_tokens()
        messages, literals, shield = _shield_specials(messages, specials)
        text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                           pad_token=self.pad_token or "", unk_token=self.unk_token or "", **kwargs)
        if not tokenize:
            return _unshield(text, literals, shield)
        ids = []
        for k, piece in enumerate(shield.split(text) if literals else [text]):  # even pieces: template text; odd: literal ids
            ids += self.encode(piece, add_special_tokens=False) if k % 2 == 0 else \
                self.encode(literals[int(piece)], add_special_tokens=False, parse_special=False)
        if self.bos_token_id is not None and ids[:2] == [self.bos_token_id] * 2:
            ids = ids[1:]  # a template that writes BOS on a tokenizer that adds it: keep one
        if return_dict:
            out = BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * len(ids)]})
            return BatchEncoding({k: torch.tensor(v) for k, v in out.items()}) if return_tensors == "pt" else \
                BatchEncoding({k: v[0] for k, v in out.items()})
        return torch.tensor([ids]) if return_tensors == "pt" else ids


# Private-use code points and a fresh nonce mark user-typed control-token text while the template
# renders: a marker is unguessable, so no text in a message or a tool (where a user may well type
# these code points) can pass for one, nor make the literal ids be read wrong.
_SHIELD_OPEN, _SHIELD_CLOSE = "\U000F0000", "\U000F0001"


def _shield_specials(messages, specials):
    nonce = secrets.token_hex(8)
    shield = re.compile(f"{_SHIELD_OPEN}{nonce}:(\\d+){_SHIELD_CLOSE}")
    if not specials:
        return messages, [], shield
    pattern = re.compile("|".join(map(re.escape, specials)))
    literals: list[str] = []

    def protect(text):
        def mark(m):
            literals.append(m.group(0))
            return f"{_SHIELD_OPEN}{nonce}:{len(literals) - 1}{_SHIELD_CLOSE}"
        return pattern.sub(mark, text)

    out = []
    for m in messages:
        m = dict(m) if isinstance(m, dict) else m
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            m["content"] = protect(m["content"])
        out.append(m)
    return out, literals, shield


def _unshield(text, literals, shield):
    return shield.sub(lambda m: literals[int(m.group(1))], text) if literals else text


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
