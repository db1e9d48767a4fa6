"""Writing GGUF files llama.cpp loads: `save_gguf(model, path, dtype, tokenizer)`.

The inverse of gguf.py: HF names -> llama.cpp names, Q/K rows re-interleaved for llama.cpp's
RoPE, llama.* metadata, and the tokenizer's vocabulary as tokenizer.ggml.* fields. Written to a
temp file in the same folder and renamed into place, so a failed save leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import LlamaConfig, fsync_dir
from ..model import LlamaForCausalLM
from .gguf import gguf_name, permute_for_gguf
from .gguf_file import GGUFFile

# ---------------------------------------------------------------------- writing

# dtype -> (general.file_type as llama.cpp numbers it, ggml type of the 2-D weights)
FILE_TYPES = {"f32": (0, GGMLQuantizationType.F32), "f16": (1, GGMLQuantizationType.F16),
              "q8_0": (7, GGMLQuantizationType.Q8_0)}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the block layout of the quantized types
UNUSED = 5  # llama.cpp token type of the "[PAD{i}]" filler tokens


def save_gguf(model: LlamaForCausalLM, path, dtype: str = "f16", tokenizer=None) -> Path:
    """Write `model` as a llama.cpp GGUF file (architecture "llama") that load_gguf, llama.cpp and
    transformers read back.

    dtype: "f16" (2-D weights float16), "q8_0" (2-D weights whose rows are a multiple of 32 long
    quantized to Q8_0, the rest float16) or "f32". Norms and every 1-D tensor stay float32.
    tokenizer: None (only the config's bos/eos/pad ids are written), a camelid Tokenizer, a GGUF
    file whose tokenizer.* fields are copied as they are, or a dict of such fields.

    The file is written to a temp file in the same folder, fsynced and renamed over `path`:
    readers see the old file or the whole new one, and a failed save leaves nothing behind.
    """
    from gguf import GGUFWriter

    if dtype not in FILE_TYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(FILE_TYPES)}")
    path = Path(path)
    config = model.config
    writer = GGUFWriter(None, "llama")  # opens no file until write_header_to_file
    rope_freqs = _write_config(writer, config, dtype)
    for key, value in getattr(model, "gguf_metadata", {}).items():  # provenance of a GGUF source
        if key.startswith("general.") and key not in _WRITER_OWNED and _is_str_or_strs(value):
            _add_field(writer, key, value)
    if tokenizer is not None:
        fields = _checked_tokenizer_fields(tokenizer_gguf_fields(tokenizer), config.vocab_size)
        for key, value in fields.items():
            _add_field(writer, key, value)
    else:
        eos = config.eos_token_ids
        for key, i in (("bos_token_id", config.bos_token_id), ("eos_token_id", eos[0] if eos else None),
                       ("padding_token_id", config.pad_token_id)):
            if i is not None:
                writer.add_uint32(f"tokenizer.ggml.{key}", i)

    plan = _tensor_plan(model, dtype, rope_freqs)
    for name, shape, qtype, _ in plan:
        block, type_size = GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(name, shape, np.float32, math.prod(shape) // block * type_size, raw_dtype=qtype)

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, _, qtype, get in plan:
            writer.write_tensor_data(_encode(name, get(), qtype))
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


_WRITER_OWNED = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}


def _is_str_or_strs(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v))


def _write_config(w, config: LlamaConfig, dtype: str) -> torch.Tensor | None:
    """llama.* hyper-parameters; returns the rope_freqs tensor when the RoPE needs one."""
    if config.alibi:
        raise ValueError("ALiBi models cannot be written as GGUF: llama.cpp's llama architecture "
                         "always applies rotary embeddings")
    if config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {config.hidden_act!r} cannot be written as GGUF: llama.cpp's llama "
                         f"architecture uses SiLU")
    H, D, C = config.num_attention_heads, config.head_dim, config.hidden_size
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(C)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(D)
    if H * D != C:
        w.add_key_length(D)
        w.add_value_length(D)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(FILE_TYPES[dtype][0])
    w.add_quantization_version(QUANTIZATION_VERSION)
    return _write_rope_scaling(w, config)


# yarn keys GGUF has (read back by _rope_scaling above); anything else changes the frequencies
_YARN_KEYS = {"rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow"}


def _write_rope_scaling(w, config: LlamaConfig) -> torch.Tensor | None:
    """linear and yarn as llama.cpp's rope.scaling.* keys; static per-pair schemes (llama3, ntk,
    longrope with one factor list and no temperature) as a rope_freqs tensor of frequency
    divisors, as llama.cpp's converter bakes Llama 3.1. The rest raise: GGUF cannot say them."""
    from gguf import RopeScalingType

    from ..rope import _base_inv_freq, rope_inv_freq

    s, kind = config.rope_scaling, config.rope_type
    if kind == "default":
        return None
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s["factor"])
        return None
    if kind == "yarn":
        extra = set(s) - _YARN_KEYS
        if s.get("truncate", True):
            extra.discard("truncate")
        if "attention_factor" in extra and "mscale" not in s and "mscale_all_dim" not in s and \
                math.isclose(s["attention_factor"], 0.1 * math.log(s["factor"]) + 1.0 if s["factor"] > 1 else 1.0):
            extra.discard("attention_factor")  # the default temperature, which a reader recomputes
        if extra:
            raise ValueError(f"yarn rope_scaling with {sorted(extra)} cannot be written as GGUF: llama.cpp's "
                             f"keys carry only factor, original context length, beta_fast and beta_slow")
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(s["factor"])
        if s.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
        if s.get("beta_fast"):
            w.add_rope_scaling_yarn_beta_fast(s["beta_fast"])
        if s.get("beta_slow"):
            w.add_rope_scaling_yarn_beta_slow(s["beta_slow"])
        return None
    if kind in ("llama3", "ntk", "longrope"):
        if kind == "longrope" and list(s["short_factor"]) != list(s["long_factor"]):
            raise ValueError("longrope rope_scaling with different short_factor and long_factor cannot be "
                             "written as GGUF: its rope_freqs tensor holds one factor list for all lengths")
        inv_freq, scale = rope_inv_freq(config)
        if not math.isclose(scale, 1.0, abs_tol=1e-6):
            raise ValueError(f"{kind} rope_scaling with attention scale {scale} cannot be written as GGUF: "
                             f"rope_freqs carries frequencies only")
        return (_base_inv_freq(config.head_dim, config.rope_theta) / inv_freq).float()
    raise ValueError(f"rope_type {kind!r} cannot be written as GGUF: its frequencies depend on the sequence "
                     f"length, and llama.cpp's llama architecture has no such scaling")


def _tensor_plan(model: LlamaForCausalLM, dtype: str, rope_freqs) -> list:
    """(GGUF name, PyTorch shape, ggml type, () -> float tensor) for every tensor, in llama.cpp order."""
    config = model.config
    state = model.state_dict()
    tied = config.tie_word_embeddings or model.lm_head.weight is model.model.embed_tokens.weight
    if tied:
        state.pop("lm_head.weight", None)
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    wanted = FILE_TYPES[dtype][1]

    def getter(hf, t):
        if ".q_proj." in hf:
            return lambda: permute_for_gguf(t.detach().float(), H)
        if ".k_proj." in hf:
            return lambda: permute_for_gguf(t.detach().float(), Hkv)
        return lambda: t.detach().float()

    plan = []
    for hf, t in state.items():
        try:
            name = gguf_name(hf)
        except KeyError:
            raise ValueError(f"tensor {hf!r} has no llama.cpp name; it cannot be written as GGUF") from None
        if t.ndim == 1 or wanted == GGMLQuantizationType.F32:
            qtype = GGMLQuantizationType.F32
        elif wanted == GGMLQuantizationType.Q8_0 and t.shape[-1] % GGML_QUANT_SIZES[wanted][0] == 0:
            qtype = wanted
        else:
            qtype = GGMLQuantizationType.F16
        plan.append((name, tuple(t.shape), qtype, getter(hf, t)))
    if rope_freqs is not None:
        plan.append(("rope_freqs.weight", tuple(rope_freqs.shape), GGMLQuantizationType.F32, lambda: rope_freqs))
    order = {"token_embd": 0, "rope_freqs": 1, "blk": 2, "output_norm": 3, "output": 4}
    plan.sort(key=lambda p: (order[p[0].split(".")[0]], int(p[0].split(".")[1]) if p[0].startswith("blk.") else 0))
    return plan


def _encode(name: str, t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    from gguf.quants import quantize

    a = np.ascontiguousarray(t.detach().to(device="cpu", dtype=torch.float32).numpy())
    if qtype == GGMLQuantizationType.F32:
        return a
    finite = np.isfinite(a)
    limit = float(np.finfo(np.float16).max) * (127 if qtype == GGMLQuantizationType.Q8_0 else 1)
    if finite.all() and a.size and float(np.abs(a).max()) > limit:
        raise ValueError(f"tensor {name!r} has values up to {float(np.abs(a).max()):.4g}, beyond what "
                         f"{qtype.name} can hold; save with dtype='f32'")
    if qtype == GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return quantize(a, qtype)


# ---------------------------------------------------------------------- tokenizer fields

def _add_field(w, key: str, value) -> None:
    """Add a parsed field with the GGUF type llama.cpp's converter gives that key."""
    from gguf import GGUFValueType as T

    if key in w.kv_data[0]:
        raise ValueError(f"GGUF metadata key {key!r} given twice")
    name = key.rsplit(".", 1)[-1]
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):  # ids, counts: uint32 as llama.cpp writes them
        if 0 <= value < 2**32:
            w.add_uint32(key, value)
        elif -2**31 <= value < 0:
            w.add_int32(key, value)
        else:
            w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple, bytes)):
        if len(value) == 0:
            return  # GGUF has no typed empty array
        sub = {"token_type": T.INT32, "scores": T.FLOAT32, "precompiled_charsmap": T.UINT8}.get(name)
        if sub is None:
            first = value[0]
            sub = T.STRING if isinstance(first, str) else T.BOOL if isinstance(first, bool) else \
                T.INT32 if isinstance(first, int) else T.FLOAT32 if isinstance(first, float) else None
        if sub is None:
            raise ValueError(f"GGUF metadata {key!r}: cannot write a list of {type(value[0]).__name__}")
        if sub == T.FLOAT32:
            value = [float(x) for x in value]
        w.add_key_value(key, list(value), T.ARRAY, sub_type=sub)
    else:
        raise ValueError(f"GGUF metadata {key!r}: cannot write a {type(value).__name__}")


def _checked_tokenizer_fields(fields: dict, vocab_size: int) -> dict:
    """Validate a tokenizer.* field set against the model and pad the vocabulary to vocab_size."""
    fields = dict(fields)
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("tokenizer has no tokenizer.ggml.tokens list of strings")
    n = len(tokens)
    if n > vocab_size:
        raise ValueError(f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}: ids past "
                         f"{vocab_size - 1} would have no embedding")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in fields and len(fields[key]) != n:
            raise ValueError(f"{key} has {len(fields[key])} entries for {n} tokens")
    for key, value in fields.items():
        if key.endswith("_token_id") and not (isinstance(value, int) and 0 <= value < vocab_size):
            raise ValueError(f"{key} {value!r} is outside the vocabulary [0, {vocab_size})")
    if n < vocab_size:  # as llama.cpp's converter: filler tokens for embedding rows no token uses
        extra = range(n, vocab_size)
        fields["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in extra]
        fields["tokenizer.ggml.token_type"] = list(fields.get("tokenizer.ggml.token_type", [1] * n)) + \
            [UNUSED] * len(extra)
        if "tokenizer.ggml.scores" in fields:
            fields["tokenizer.ggml.scores"] = list(fields["tokenizer.ggml.scores"]) + [-1000.0] * len(extra)
    return fields


def tokenizer_gguf_fields(tokenizer) -> dict:
    """The tokenizer.* GGUF fields for `tokenizer`: a GGUF path or a field dict (copied as they
    are), a camelid Tokenizer that carries its source GGUF's fields (`gguf_fields`), or any other
    camelid Tokenizer (converted, and checked to tokenize a probe text the same way)."""
    if isinstance(tokenizer, dict):
        return {k: v for k, v in tokenizer.items() if k.startswith("tokenizer.")}
    if isinstance(tokenizer, (str, os.PathLike)):
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
    from ..tokenizer import _HFTokenizers, _SentencePiece

    backend = tok.backend
    if isinstance(backend, _SentencePiece):
        fields = _sentencepiece_fields(backend.sp)
    elif isinstance(backend, _HFTokenizers):
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
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else
             UNUSED if sp.is_unused(i) else 1 for i in range(n)]
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
        tokens[i], types[i] = token, 1
    for i, added in tk.get_added_tokens_decoder().items():
        types[i] = 3 if added.special else 4
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
                types[i] = 6
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = 2
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
    from ..tokenizer import GGUF_PRE

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
    from ..tokenizer import gguf_tokenizer_backend

    return gguf_tokenizer_backend(fields).encode(text, parse_special=False)
