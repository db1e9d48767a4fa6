"""GGUF (llama.cpp) checkpoints: metadata -> LlamaConfig, tensors -> HF-named state dict.

llama.cpp's converter permutes the rows of q_proj/k_proj so that its RoPE (which rotates
adjacent pairs, x[2i], x[2i+1]) matches HF's (which rotates halves, x[i], x[i + D/2]):

    per head, HF rows [r0 .. r(D/2-1) | s0 .. s(D/2-1)]  ->  GGUF rows [r0 s0 r1 s1 ...]

Loading undoes that interleaving; saving (gguf_write.py) redoes it.

save_gguf writes f32 / f16 / q8_0 files through the gguf package's GGUFWriter and quantizer, with
llama.cpp's key names and types, the RoPE scaling GGUF can express (linear and yarn keys; static
per-pair schemes as a rope_freqs tensor) and, optionally, the tokenizer. To keep the vocabulary
of a model loaded from a GGUF, pass tokenizer=<that GGUF's path>.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from camelid.core.config import LlamaConfig
from camelid.core.model import LlamaForCausalLM
from camelid.formats.common import (NameMap, assign, check_names_and_shapes, column_major, device_of, empty_model, finish,
                                    resolve_dtype)
from camelid.formats.gguf_file import GGUFError, GGUFFile

# One mapping table: GGUF tensor name -> HF name ({i} = layer index).
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}
NAMES = NameMap(TENSOR_NAMES)
IGNORED = {"rope_freqs.weight"}  # folded into the config's rope scaling, see gguf_config

# ggml types we dequantize (the K-quants and legacy quants through the gguf package's numpy code)
SUPPORTED_TYPES = {t for t in GGMLQuantizationType if t.name in (
    "F32", "F16", "BF16", "F64", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}


def hf_name(gguf_name: str) -> str | None:
    return NAMES.to_hf(gguf_name)


def gguf_name(hf: str) -> str:
    name = NAMES.from_hf(hf)
    if name is None:
        raise KeyError(f"no GGUF name for tensor {hf!r}")
    return name


def permute_for_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF halves layout -> llama.cpp interleaved pairs, per head (rows of q_proj / k_proj)."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp interleaved pairs -> HF halves layout (the inverse of permute_for_gguf)."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------- metadata -> config

def gguf_config(g: GGUFFile) -> LlamaConfig:
    f = g.fields
    arch = f.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{g.path}: general.architecture is {arch!r}; camelid reads Llama-architecture GGUFs")

    def key(name, default=None, required=True):
        full = f"llama.{name}"
        if full not in f:
            if required and default is None:
                raise GGUFError(f"{g.path}: metadata {full!r} is missing")
            return default
        return f[full]

    def count(name, default=None, required=True):
        """A positive integer field; llama.cpp also allows a per-layer array (one value per
        block), which camelid's Llama reads when every layer has the same value."""
        v = key(name, default, required)
        if v is None:
            return None
        where = f"{g.path}: metadata 'llama.{name}'"
        if isinstance(v, list):
            if not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise GGUFError(f"{where} must be an integer or a per-layer array of integers, got {v!r:.60}")
            if len(set(v)) != 1:
                raise GGUFError(f"{where} differs between layers ({', '.join(map(str, sorted(set(v))[:4]))}); "
                                f"camelid's Llama has one value for every layer")
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, int):
            raise GGUFError(f"{where} must be an integer, got {type(v).__name__} {v!r:.40}")
        if v < 1:
            raise GGUFError(f"{where} must be at least 1, got {v}")
        return v

    def number(name, default):
        """A number field. GGUF stores these as float32: the shortest decimal that is the same
        float32 (1e-06, not 9.999999974752427e-07 in a converted config.json; float32 compute
        sees the same value either way)."""
        v = key(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GGUFError(f"{g.path}: metadata 'llama.{name}' must be a number, got {type(v).__name__} {v!r:.40}")
        v, f32 = float(v), np.float32(v)
        if math.isfinite(v) and float(f32) == v:
            return float(np.format_float_positional(f32, unique=True, trim="-"))
        return v

    heads = count("attention.head_count")
    hidden = count("embedding_length")
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = count("vocab_size", required=False) or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = g.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in g.tensors else None
    head_dim = count("attention.key_length", required=False) or count("rope.dimension_count", required=False)
    d = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=count("feed_forward_length"),
        num_hidden_layers=count("block_count"), num_attention_heads=heads,
        num_key_value_heads=count("attention.head_count_kv", heads),
        max_position_embeddings=count("context_length", 2048),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=number("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"), eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
    )
    if head_dim and head_dim != hidden // heads:
        d["head_dim"] = head_dim
    d["rope_scaling"] = _rope_scaling(g, key, d)
    if "q_proj.bias" in " ".join(filter(None, map(hf_name, g.tensors))):
        d["attention_bias"] = True
    if "gate_proj.bias" in " ".join(filter(None, map(hf_name, g.tensors))):
        d["mlp_bias"] = True
    if d["pad_token_id"] is not None and d["pad_token_id"] >= d["vocab_size"]:
        d["pad_token_id"] = None
    d["extra"] = {"architectures": ["LlamaForCausalLM"]}
    return LlamaConfig(**d)


def _rope_scaling(g: GGUFFile, key, d) -> dict | None:
    kind = key("rope.scaling.type", required=False)
    factor = key("rope.scaling.factor", required=False)
    orig = key("rope.scaling.original_context_length", required=False)
    if "rope_freqs.weight" in g.tensors:
        # Llama 3.1-style per-pair divisors, baked by llama.cpp's converter: inv_freq / rope_freqs.
        # LongRoPE with one factor list for all lengths is exactly that.
        freqs = tensor_data(g.tensors["rope_freqs.weight"]).flatten().tolist()
        return {"rope_type": "longrope", "short_factor": freqs, "long_factor": freqs,
                "original_max_position_embeddings": d["max_position_embeddings"], "attention_factor": 1.0}
    if kind in (None, "none") or (kind == "linear" and not factor):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": float(factor)}
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        for gk, hk in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if key(f"rope.scaling.{gk}", required=False):
                out[hk] = float(key(f"rope.scaling.{gk}"))
        return out
    raise GGUFError(f"{g.path}: rope scaling type {kind!r} is not supported")


# ---------------------------------------------------------------------- tensors

def tensor_data(t) -> torch.Tensor:
    """Dequantize one GGUF tensor to a float32 torch tensor in PyTorch shape."""
    if t.type not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {t.name!r} has GGML type {t.type.name}, which camelid does not read")
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
             GGMLQuantizationType.F64: np.float64}.get(t.type)
    if plain is not None:  # no dequantization: reinterpret the bytes (and own them)
        return torch.from_numpy(t.data.view(plain).reshape(t.shape).astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.type), dtype=np.float32).reshape(t.shape))


def load_gguf(path, dtype=None, device=None, attn_implementation: str = "sdpa",
              model_cls=None) -> LlamaForCausalLM:
    g = GGUFFile(path)
    try:
        config = gguf_config(g)
        dtype = resolve_dtype(dtype, config)
        unknown = sorted(n for n in g.tensors if hf_name(n) is None and n not in IGNORED)
        if unknown:
            raise GGUFError(f"{g.path}: tensors camelid does not know: {', '.join(unknown[:12])}")
        model, expected = empty_model(config, model_cls)
        found = {hf_name(n): t.shape for n, t in g.tensors.items() if n not in IGNORED}
        check_names_and_shapes(g.path, expected, found, against="its metadata")
        where = device_of(device)
        H, Hkv = config.num_attention_heads, config.num_key_value_heads
        for name, t in g.tensors.items():
            if name in IGNORED:
                continue
            w = tensor_data(t)
            if ".attn_q." in name:
                w = unpermute_from_gguf(w, H)
            elif ".attn_k." in name:
                w = unpermute_from_gguf(w, Hkv)
            assign(model, hf_name(name), column_major(w.to(device=where(hf_name(name)), dtype=dtype)))  # decode-friendly layout
        model.gguf_metadata = {k: v for k, v in g.fields.items() if not k.startswith("tokenizer.ggml.")}
        return finish(model, dtype, attn_implementation)
    finally:
        g.close()


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
