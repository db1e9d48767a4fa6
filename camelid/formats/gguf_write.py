"""Writing GGUF files llama.cpp loads: `save_gguf(model, path, dtype, vocab)`.

The inverse of gguf.py: HF names -> llama.cpp names, Q/K rows re-interleaved for llama.cpp's
RoPE, llama.* metadata, and a vocabulary given as plain tokenizer.* fields (camelid.text.gguf_vocab
makes them from a tokenizer; its save_gguf takes tokenizer=). Written to a temp file in the same
folder and renamed into place, so a failed save leaves nothing behind.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from camelid.atomic import fsync_dir, remove_stale_temps, temp_path
from camelid.core.config import LlamaConfig
from camelid.core.model import LlamaForCausalLM
from camelid.formats.gguf import gguf_name, permute_for_gguf

# ---------------------------------------------------------------------- writing

# dtype -> (general.file_type as llama.cpp numbers it, ggml type of the 2-D weights)
FILE_TYPES = {"f32": (0, GGMLQuantizationType.F32), "f16": (1, GGMLQuantizationType.F16),
              "q8_0": (7, GGMLQuantizationType.Q8_0), "q4_0": (2, GGMLQuantizationType.Q4_0),
              "q4_1": (3, GGMLQuantizationType.Q4_1), "q5_0": (8, GGMLQuantizationType.Q5_0),
              "q5_1": (9, GGMLQuantizationType.Q5_1), "q4_k": (15, GGMLQuantizationType.Q4_K),
              "q6_k": (18, GGMLQuantizationType.Q6_K)}
# K-quants need rows a multiple of 256 long; the other 2-D weights take these (as camelid's quantize)
K_FALLBACK = {GGMLQuantizationType.Q4_K: GGMLQuantizationType.Q4_1,
              GGMLQuantizationType.Q6_K: GGMLQuantizationType.Q8_0}
# dtype="auto": what a model's own blocks (camelid.transforms.quantize.BlockLinear) are, kept as they are
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the block layout of the quantized types
UNUSED = 5  # llama.cpp token type of the "[PAD{i}]" filler tokens


def save_gguf(model: LlamaForCausalLM, path, dtype: str = "f16", vocab: dict | None = None) -> Path:
    """Write `model` as a llama.cpp GGUF file (architecture "llama") that load_gguf, llama.cpp and
    transformers read back.

    dtype: "f16" (2-D weights float16), "q8_0" / "q4_0" / "q4_1" (2-D weights whose rows are a
    multiple of 32 long quantized by the gguf package's quantizer, the rest float16), "q4_k" / "q6_k"
    (camelid's K-quant quantizer; rows not a multiple of 256 take q4_1 / q8_0); with the 4-bit
    types the embedding and output tables are Q8_0, as llama.cpp does where K-quants do not fit),
    "f32", or "auto": a model holding GGUF blocks (a GGUF loaded as it is, or quantized to q4_0 /
    q4_1 / q8_0) writes its blocks byte for byte and its float tensors as f16. Norms and every 1-D
    tensor stay float32.
    vocab: None (only the config's bos/eos/pad ids are written) or a dict of tokenizer.* fields,
    written as they are once checked against the model (camelid.text.gguf_vocab.tokenizer_gguf_fields
    makes them from a Tokenizer or a GGUF file); the token list is padded to vocab_size.

    The file is written to a temp file in the same folder, fsynced and renamed over `path`:
    readers see the old file or the whole new one, and a failed save leaves nothing behind.
    """
    from gguf import GGUFWriter

    if dtype == "auto":
        dtype = _blocks_file_type(model)
    elif dtype not in FILE_TYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(FILE_TYPES) + ['auto']}")
    elif dtype != "auto" and any(k.endswith(".ggml_type") for k in model.state_dict()):
        raise ValueError(f"the model holds GGUF blocks: save it with dtype='auto' (its blocks as they are), "
                         f"not {dtype!r}")
    path = Path(path)
    config = model.config
    writer = GGUFWriter(None, "llama")  # opens no file until write_header_to_file
    rope_freqs = _write_config(writer, config, dtype)
    for key, value in getattr(model, "gguf_metadata", {}).items():  # provenance of a GGUF source
        if key.startswith("general.") and key not in _WRITER_OWNED and _is_str_or_strs(value):
            _add_field(writer, key, value)
    if vocab is not None:
        fields = _checked_tokenizer_fields(vocab, config.vocab_size)
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

    remove_stale_temps(path.parent, [path.name])  # what a killed save of this file left
    tmp = temp_path(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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

    from camelid.core.rope import _base_inv_freq, rope_inv_freq

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


def _blocks_file_type(model) -> str:
    """The file type of a model's GGUF blocks: the most common block type of its layers."""
    state = model.state_dict()
    kinds = [int(v.reshape(-1)[0]) for k, v in state.items() if k.endswith(".ggml_type") and "lm_head" not in k]
    names = {t[1].value: name for name, t in FILE_TYPES.items()}
    if not kinds:
        raise ValueError("dtype='auto' writes a model's GGUF blocks; this model has none (use f16, q8_0, q4_0 ...)")
    return names[max(set(kinds), key=kinds.count)]


def _raw_blocks(state: dict) -> dict:
    """{HF weight name: (ggml type, uint8 rows)} for the layers that hold GGUF blocks; their
    entries leave `state` (an embedding served from a tied lm_head is written as token_embd)."""
    out = {}
    for key in [k for k in state if k.endswith(".ggml_type")]:
        prefix = key.removesuffix(".ggml_type")
        qtype = GGMLQuantizationType(int(state.pop(key).reshape(-1)[0]))
        name = "model.embed_tokens" if prefix == "model.embed_tokens.table" else prefix  # an untied table
        out[name + ".weight"] = (qtype, state.pop(prefix + ".qweight"))
    return out


def _tensor_plan(model: LlamaForCausalLM, dtype: str, rope_freqs) -> list:
    """(GGUF name, PyTorch shape, ggml type, () -> float tensor or raw block rows) for every
    tensor, in llama.cpp order."""
    config = model.config
    state = model.state_dict()
    raw = _raw_blocks(state)
    if "lm_head.weight" in raw and "model.embed_tokens.weight" not in state and "model.embed_tokens.weight" not in raw:
        raw["model.embed_tokens.weight"] = raw.pop("lm_head.weight")  # the tied table lives in the lm_head
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
    for hf, (qtype, rows) in raw.items():
        block, size = GGML_QUANT_SIZES[qtype]
        shape = (rows.shape[0], rows.shape[1] // size * block)
        heads = H if ".q_proj." in hf else Hkv if ".k_proj." in hf else None
        get = (lambda r=rows, n=heads: permute_for_gguf(r, n)) if heads else (lambda r=rows: r)
        plan.append((gguf_name(hf), shape, qtype, get))
    small = wanted in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K)
    for hf, t in state.items():
        try:
            name = gguf_name(hf)
        except KeyError:
            raise ValueError(f"tensor {hf!r} has no llama.cpp name; it cannot be written as GGUF") from None
        if t.ndim == 1 or wanted == GGMLQuantizationType.F32:
            qtype = GGMLQuantizationType.F32
        elif wanted != GGMLQuantizationType.F16 and t.shape[-1] % 32 == 0:
            qtype = GGMLQuantizationType.Q8_0 if small and name in ("token_embd.weight", "output.weight") else wanted
            if t.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
                qtype = K_FALLBACK[qtype]
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

    if t.dtype == torch.uint8:  # GGUF blocks, as the model holds them
        return np.ascontiguousarray(t.detach().cpu().numpy())
    a = np.ascontiguousarray(t.detach().to(device="cpu", dtype=torch.float32).numpy())
    if qtype == GGMLQuantizationType.F32:
        return a
    finite = np.isfinite(a)
    # the largest |value| whose block scale still fits float16: d = amax / 127 (Q8_0), amax / 8
    # (Q4_0); Q4_1 stores the block minimum itself
    limit = float(np.finfo(np.float16).max) * {GGMLQuantizationType.Q8_0: 127, GGMLQuantizationType.Q4_0: 8}.get(qtype, 1)
    if finite.all() and a.size and float(np.abs(a).max()) > limit:
        raise ValueError(f"tensor {name!r} has values up to {float(np.abs(a).max()):.4g}, beyond what "
                         f"{qtype.name} can hold; save with dtype='f32'")
    if qtype == GGMLQuantizationType.F16:
        return a.astype(np.float16)
    if qtype in K_FALLBACK:  # gguf-py has no K-quant quantizer: camelid's own
        from camelid.kernels import kquants

        return kquants.quantize(torch.from_numpy(a), qtype.value).reshape(a.shape[0], -1).numpy()
    return quantize(a, qtype)


# ---------------------------------------------------------------------- metadata fields

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
    other = sorted(k for k in fields if not k.startswith("tokenizer."))
    if other:
        raise ValueError(f"vocab holds tokenizer.* fields only, got {other[0]!r}")
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
