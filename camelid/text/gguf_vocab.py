"""GGUF vocabularies both ways: a tokenizer out of a GGUF file's tokenizer.ggml.* metadata
(gguf_tokenizer_backend, behind Tokenizer.from_gguf), and a tokenizer into those fields
(tokenizer_gguf_fields), which formats.gguf_write.save_gguf writes as plain metadata.

    save_gguf(model, path, "q8_0", tokenizer=tok)     # the fields of `tok`, then the writer

The fields of a camelid Tokenizer are converted from its backend (SentencePiece, or a
tokenizer.json BPE) and checked to tokenize a probe text as the tokenizer does.
"""

from __future__ import annotations

import json
import math
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

# llama.cpp pre-tokenizer name -> regexes applied in order, each match split off on its own (the
# table of llama.cpp's llama-vocab.cpp, written for the `tokenizers` (Oniguruma) regex engine:
# non-ASCII ranges as \x{...} escapes, so no Unicode normalization of this file can change them).
# Every name is checked against llama-cpp-python's own tokenization (tests/test_tokenizer.py).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
QWEN2_PATTERN = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CJK = r"[\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+"
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_PORO = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{0964}\x{06D4}\x{060C})]+"
_PRE = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [GPT2_PATTERN],
    "llama3": [LLAMA3_PATTERN],
    "digits": [r"\p{N}", GPT2_PATTERN],  # digits one by one, then GPT-2's split
    "qwen2": [QWEN2_PATTERN],
    "deepseek-llm": ["[\r\n]", r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
                     r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+", r"\s+$",
                     _CJK, r"\p{N}+"],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"],
    "deepseek-v3": [r"\p{N}{1,3}", r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", GPT2_PATTERN, "[0-9][0-9][0-9]"],
    "poro": [_PORO],
    "viking": [_PORO, r"\p{N}"],
    "tekken": [r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + r"+|[^\r\n\p{L}\p{N}]?" + _UPPER + "+" + _LOWER +
               r"*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-4o": [r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTIONS + r"?|[^\r\n\p{L}\p{N}]?" + _UPPER +
               "+" + _LOWER + "*" + _CONTRACTIONS + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "chameleon": ["<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", "([\t\n]|    |  )", r"\p{N}",
                  r"[\p{P}!-/:-@\[-`{-~]", GPT2_PATTERN],
}
_NAMES = {  # the names llama.cpp reads for each split
    "default": ["default"],
    "gpt2": ["gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "gigachat", "roberta-bpe", "trillion",
             "granite-docling"],
    "llama3": ["llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
               "smaug-bpe", "chatglm-bpe"],
    "digits": ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
    "qwen2": ["qwen2", "stablelm2", "megrez", "deepseek-r1-qwen", "hunyuan"],
    "deepseek-llm": ["deepseek-llm"], "deepseek-coder": ["deepseek-coder"], "deepseek-v3": ["deepseek-v3"],
    "falcon": ["falcon"], "poro": ["poro-chat", "bloom", "gpt3-finnish"], "viking": ["viking"],
    "tekken": ["tekken"], "gpt-4o": ["gpt-4o"], "chameleon": ["chameleon"],
}
GGUF_PRE = {name: _PRE[split] for split, names in _NAMES.items() for name in names}
WRITABLE_PRE = list(GGUF_PRE)  # what camelid writes: names llama.cpp knows
GGUF_PRE["gpt2"] = [GPT2_PATTERN]  # read (files written before), never written: llama.cpp refuses it


LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
# ^ the names for which llama.cpp sets ignore_merges (a word that is a vocabulary token is that token)


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
    _check_vocab_fields(fields, tokens)
    tokens, aliases = _unique_pieces(tokens)
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
                   for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED) and i not in aliases])
    return HFTokenizers(tk, aliases)


def _unique_pieces(tokens: list[str]) -> tuple[list[str], dict[int, int]]:
    """A vocabulary where a string may appear twice (some converted GGUFs have duplicates), as
    llama.cpp reads it: text maps to the string's last id, and every id stays a token (the
    vocabulary is not one short). The earlier ids get a piece no text can produce (a NUL-led name:
    byte-level alphabets have no NUL, and no merge builds it) and decode as the id they alias."""
    last = {t: i for i, t in enumerate(tokens)}
    if len(last) == len(tokens):
        return tokens, {}
    pieces, aliases = list(tokens), {}
    for i, t in enumerate(tokens):
        if last[t] != i:
            pieces[i], aliases[i] = f"\x00duplicate {i}", last[t]
    return pieces, aliases


def _check_vocab_fields(fields: dict, tokens: list) -> None:
    """ValueError naming the tokenizer.ggml.* field that cannot describe this vocabulary."""
    n = len(tokens)
    if not all(isinstance(t, str) for t in tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens must be strings")
    scores = fields.get("tokenizer.ggml.scores")
    if scores is not None and (not isinstance(scores, list) or len(scores) != n or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores)):
        got = f"{len(scores)} entries" if isinstance(scores, list) else type(scores).__name__
        raise ValueError(f"GGUF tokenizer.ggml.scores must be {n} finite numbers (one per token), got {got}")
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, list) or
                               not all(isinstance(m, str) and " " in m.strip(" ") for m in merges)):
        raise ValueError("GGUF tokenizer.ggml.merges must be strings 'left right'")
    v = fields.get("tokenizer.ggml.unknown_token_id")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n):
        raise ValueError(f"GGUF tokenizer.ggml.unknown_token_id {v!r} is not a token id of the {n}-token vocabulary")


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
    for i, j in getattr(backend, "aliases", {}).items():  # a duplicate string: written as it was read
        tokens[i], types[i] = tokens[j], types[j]
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
    for name in WRITABLE_PRE:
        key = tuple(GGUF_PRE[name])
        if key not in tried:
            got = _gguf_encode({**fields, "tokenizer.ggml.pre": name}, PROBE_TEXT)
            tried[key] = got == want
        if tried[key]:
            return name
    raise ValueError(f"no llama.cpp pre-tokenizer ({', '.join(WRITABLE_PRE)}) splits text as this tokenizer does; "
                     f"it cannot be written as GGUF")


def _check_probe(fields: dict, encode, what: str) -> None:
    want, got = encode(PROBE_TEXT), _gguf_encode(fields, PROBE_TEXT)
    if want != got:
        k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise ValueError(f"this {what} tokenizer does not survive conversion to GGUF fields: token {k} of a "
                         f"probe text differs ({want[k:k + 4]} vs {got[k:k + 4]})")


def _gguf_encode(fields: dict, text: str) -> list[int]:
    return gguf_tokenizer_backend(fields).encode(text, parse_special=False)
