"""GGUF vocabularies both ways: a tokenizer out of a GGUF file's tokenizer.ggml.* metadata
(gguf_tokenizer_backend, behind Tokenizer.from_gguf), and a tokenizer into those fields
(tokenizer_gguf_fields), which formats.gguf_write.save_gguf writes as plain metadata.

    save_gguf(model, path, "q8_0", tokenizer=tok)     # the fields of `tok`, then the writer

The fields of a camelid Tokenizer are converted from its backend (SentencePiece, or a
tokenizer.json BPE) and checked to tokenize a probe text as the tokenizer does.
"""

from __future__ import annotations

import json
import os
import re

from camelid.text.backends import LLAMA3_PATTERN, HFTokenizers, SentencePiece

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def save_gguf(model, path, dtype: str = "f16", tokenizer=None):
    """formats.gguf_write.save_gguf with the vocabulary of `tokenizer`: None (only the config's
    bos/eos/pad ids are written), a camelid Tokenizer, a GGUF file whose tokenizer.* fields are
    copied as they are, or a dict of such fields (see tokenizer_gguf_fields)."""
    from camelid.formats.gguf_write import save_gguf as write_gguf

    vocab = None if tokenizer is None else tokenizer_gguf_fields(tokenizer)
    return write_gguf(model, path, dtype=dtype, vocab=vocab)


# ---------------------------------------------------------------------- GGUF fields -> tokenizer

# llama.cpp pre-tokenizer name -> regexes applied in order (from llama.cpp's llama-vocab.cpp table)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
GGUF_PRE = {
    "default": [GPT2_PATTERN], "gpt2": [GPT2_PATTERN], "gpt-2": [GPT2_PATTERN],
    "llama-bpe": [LLAMA3_PATTERN], "llama3": [LLAMA3_PATTERN], "llama-v3": [LLAMA3_PATTERN],
    # digits one by one, then GPT-2's split
    "smollm": [r"\p{N}", GPT2_PATTERN], "starcoder": [r"\p{N}", GPT2_PATTERN],
    "refact": [r"\p{N}", GPT2_PATTERN], "codeshell": [r"\p{N}", GPT2_PATTERN],
}


LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe")  # llama.cpp's names of Llama 3's pre-tokenizer


def gguf_tokenizer_backend(fields: dict):
    """Build a `tokenizers` backend from a GGUF file's tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("GGUF has no tokenizer.ggml.tokens vocabulary")
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        pre = fields.get("tokenizer.ggml.pre", "default")
        # Llama 3: a word that is a vocabulary token is that token, merges or not (llama.cpp sets
        # ignore_merges for these pre-tokenizers; Llama 3's tokenizer.json says so too)
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in LLAMA3_PRE))
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
    return HFTokenizers(tk)


def _merges_from_scores(tokens, scores, types):
    """SentencePiece-BPE vocabularies store a score per piece instead of merges: a piece that can
    be split into two vocabulary pieces is their merge, ranked by the piece's score."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# ---------------------------------------------------------------------- tokenizer -> GGUF fields

def tokenizer_gguf_fields(tokenizer) -> dict:
    """The tokenizer.* GGUF fields for `tokenizer`: a GGUF path or a field dict (copied as they
    are), a camelid Tokenizer that carries its source GGUF's fields (`gguf_fields`), or any other
    camelid Tokenizer (converted, and checked to tokenize a probe text the same way)."""
    if isinstance(tokenizer, dict):
        return {k: v for k, v in tokenizer.items() if k.startswith("tokenizer.")}
    if isinstance(tokenizer, (str, os.PathLike)):
        from camelid.formats.gguf_file import GGUFFile

        g = GGUFFile(tokenizer)
        try:
            fields = {k: v for k, v in g.fields.items() if k.startswith("tokenizer.")}
        finally:
            g.close()
        if "tokenizer.ggml.tokens" not in fields:
            raise ValueError(f"{tokenizer}: this GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
        return fields
    stored = getattr(tokenizer, "gguf_fields", None)
    if stored:
        return {k: v for k, v in stored.items() if k.startswith("tokenizer.")}
    return _fields_from_tokenizer(tokenizer)


# Text that tells the pre-tokenizers apart: digit runs (grouped, in threes, one by one), digits
# right after whitespace (" \n0" splits differently once digits are isolated first), contractions,
# runs of spaces/newlines/tabs, and characters that need byte fallback / byte-level coverage.
PROBE_TEXT = ("Hello world! I'm here, they'll see: it's 2024-06-01 at 12:34, pi=3.14159 and 1234567.\n\n"
              "  Indented\tline  with   spaces\n \n0 a  1\t\t2 x\n 3  \n\n45 (6)\r\n7\n"
              "x**2 + y_1 == 100000 // café naïve Ünïcödé 日本語 🙂 ΑΒΓ\r\nend ")


def _fields_from_tokenizer(tok) -> dict:
    backend = tok.backend
    if isinstance(backend, SentencePiece):
        fields = _sentencepiece_fields(backend.sp)
    elif isinstance(backend, HFTokenizers):
        fields = _hf_tokenizers_fields(backend)
    else:
        raise ValueError(f"a {type(backend).__name__.strip('_')} tokenizer cannot be written as GGUF yet; "
                         f"load the model's tokenizer.json, or pass a GGUF file's tokenizer")
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "unknown_token_id": tok.unk_token_id, "padding_token_id": tok.pad_token_id}
    fields.update({f"tokenizer.ggml.{k}": i for k, i in ids.items() if i is not None})
    eot = [i for i in tok.eos_token_ids if i != tok.eos_token_id]
    if eot:
        fields["tokenizer.ggml.eot_token_id"] = eot[0]
    probe = tok.encode("a")  # what the tokenizer adds around text, post-processor included
    fields["tokenizer.ggml.add_bos_token"] = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    fields["tokenizer.ggml.add_eos_token"] = tok.eos_token_id is not None and len(probe) > 1 and \
        probe[-1] == tok.eos_token_id
    if tok.chat_template:
        fields["tokenizer.chat_template"] = tok.chat_template
    return fields


def _sentencepiece_fields(sp) -> dict:
    n = sp.get_piece_size()
    types = [CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else BYTE if sp.is_byte(i) else
             UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
              "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
              "tokenizer.ggml.token_type": types,
              # SentencePiece's dummy prefix: "a" encodes to a piece that starts with the space mark
              "tokenizer.ggml.add_space_prefix": sp.id_to_piece(sp.encode("a")[0]).startswith("\u2581")}
    _check_probe(fields, lambda text: sp.encode(text), "SentencePiece")
    return fields


def _hf_tokenizers_fields(backend) -> dict:
    tk = backend.tk
    spec = json.loads(tk.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"a tokenizers {model.get('type')!r} model cannot be written as GGUF (BPE only)")
    vocab = tk.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for i, added in tk.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")]):
        fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                  "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
        fields["tokenizer.ggml.pre"] = _detect_pre(fields, backend)
        return fields
    if model.get("byte_fallback"):
        # SentencePiece-style BPE (Llama 2's tokenizer.json): GGUF stores a score per piece, and a
        # reader merges the best-scoring pair; the k-th merge's result scores -k.
        scores = [0.0] * n
        for rank, merge in enumerate(merges):
            piece = merge.replace(" ", "")
            if piece in vocab and scores[vocab[piece]] == 0.0:
                scores[vocab[piece]] = -float(rank + 1)
        for token, i in vocab.items():
            if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                types[i] = BYTE
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = UNKNOWN
        fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                  "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                  "tokenizer.ggml.add_space_prefix": "Prepend" in json.dumps(spec.get("normalizer")) or
                  '"prepend_scheme": "first"' in json.dumps(spec.get("pre_tokenizer")) or
                  '"prepend_scheme": "always"' in json.dumps(spec.get("pre_tokenizer"))}
        if unk in vocab:
            fields["tokenizer.ggml.unknown_token_id"] = vocab[unk]
        _check_probe(fields, lambda text: backend.encode(text, parse_special=False), "tokenizer.json")
        return fields
    raise ValueError("this tokenizer.json is neither byte-level BPE nor byte-fallback BPE; GGUF cannot hold it")


def _detect_pre(fields: dict, backend) -> str:
    """The llama.cpp pre-tokenizer name whose splitting reproduces this tokenizer on PROBE_TEXT."""
    want = backend.encode(PROBE_TEXT, parse_special=False)
    tried = {}
    for name, patterns in GGUF_PRE.items():
        key = tuple(patterns)
        if key not in tried:
            got = _gguf_encode({**fields, "tokenizer.ggml.pre": name}, PROBE_TEXT)
            tried[key] = got == want
        if tried[key]:
            return name
    raise ValueError(f"no llama.cpp pre-tokenizer ({', '.join(GGUF_PRE)}) splits text as this tokenizer does; "
                     f"it cannot be written as GGUF")


def _check_probe(fields: dict, encode, what: str) -> None:
    want, got = encode(PROBE_TEXT), _gguf_encode(fields, PROBE_TEXT)
    if want != got:
        k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise ValueError(f"this {what} tokenizer does not survive conversion to GGUF fields: token {k} of a "
                         f"probe text differs ({want[k:k + 4]} vs {got[k:k + 4]})")


def _gguf_encode(fields: dict, text: str) -> list[int]:
    return gguf_tokenizer_backend(fields).encode(text, parse_special=False)
