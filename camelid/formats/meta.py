"""Meta's original checkpoint folders: params.json + consolidated.NN.pth (+ tokenizer.model).

This is the layout Meta's own `llama` / `llama-models` repositories read and write:

    params.json            {"dim", "n_layers", "n_heads", "n_kv_heads"?, "vocab_size", "multiple_of",
                            "ffn_dim_multiplier"?, "norm_eps", "rope_theta"?, "use_scaled_rope"?, ...}
    consolidated.00.pth    one file per model-parallel rank, every tensor split (or replicated)
    consolidated.01.pth    across them the way fairscale's parallel layers split it
    tokenizer.model        SentencePiece (Llama 1/2) or tiktoken ranks (Llama 3)

Three things differ from a Hugging Face folder, and each is handled here:

1. Names. `layers.3.attention.wq.weight` is `model.layers.3.self_attn.q_proj.weight`, and so on
   (see TENSOR_NAMES).
2. Model-parallel shards. Column-parallel weights (wq, wk, wv, w1, w3, output) were split on their
   output rows (dim 0), row-parallel ones (wo, w2) on their input columns (dim 1), norms copied to
   every rank. The embedding was split on the embedding dim in Llama 1/2 (fairscale's
   ParallelEmbedding) but on the vocabulary in Llama 3 (VocabParallelEmbedding); which one a folder
   uses is read off the shapes: only one of the two joins gives [vocab, dim] with params.json's dim.
3. RoPE layout. Meta rotates adjacent pairs (x[2i], x[2i+1]) as one complex number; HF rotates
   halves (x[i], x[i + D/2]). So per head the rows of wq and wk are reordered
   (meta_to_hf_rows): Meta row 2i -> HF row i, Meta row 2i+1 -> HF row D/2 + i. Attention
   scores are unchanged, because q and k are reordered alike.

Everything is checked before any weight is converted: shard numbering, that every shard holds the
same tensors with the same shapes and dtypes, and params.json against the tensors (dim, vocab,
the FFN width, then every name and shape). Shards are opened with `torch.load(weights_only=True,
mmap=True)`, so no pickle can run code and no shard is read into memory as a whole; tensors are
joined one at a time and assigned into a model built on the meta device.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from camelid.core.config import ConfigError, LlamaConfig
from camelid.core.model import LlamaForCausalLM
from camelid.formats.common import (DTYPES, CheckpointError, NameMap, assign, check_names_and_shapes, device_of,
                                    dtype_name, empty_model, finish, list_names, load_torch_state, natural_key,
                                    resolve_dtype)

PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# Meta name -> HF name ({i} = layer index).
TENSOR_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
NAMES = NameMap(TENSOR_NAMES)
DROPPED = {"rope.freqs"}  # Llama 1/2 stored the RoPE frequencies; recomputed from the config

# How model parallelism split each tensor: the dim the shards are joined on, None = replicated.
# tok_embeddings is decided per folder from the shapes (see _join_dim).
_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
           "feed_forward.w1.weight", "feed_forward.w3.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")

# params.json keys: the ones that describe the model, and run-time settings of Meta's reference
# code that change nothing about the weights. Any other key (vision_*, moe_args, quantization_args,
# lora_args, ...) means an architecture camelid does not implement, so it is refused by name.
_MODEL_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor",
               "max_seq_len"}
_RUNTIME_KEYS = {"max_batch_size"}

# Llama 3.1's rope scaling ("use_scaled_rope": true). Llama 3.2 1B/3B use factor 32, which newer
# params.json files say as "rope_scaling_factor".
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# params.json does not record the trained context length. Meta's reference code defaults max_seq_len
# to 2048; Llama 3.1+ (the only ones with use_scaled_rope) are trained to 128K.
DEFAULT_MAX_SEQ_LEN, SCALED_ROPE_MAX_SEQ_LEN = 2048, 131072


# ---------------------------------------------------------------------- names and layout

def hf_name(meta_name: str) -> str | None:
    return NAMES.to_hf(meta_name)


def meta_name(hf: str) -> str | None:
    return NAMES.from_hf(hf)


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Meta wq / wk (per head: pairs x[2i], x[2i+1]) into HF's layout
    (per head: halves x[i], x[i + D/2]). Row 2i goes to i, row 2i+1 to D/2 + i."""
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    D = rows // n_heads
    # [head, pair i, (real, imag)] -> [head, (real, imag), pair i]
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of meta_to_hf_rows (HF halves -> Meta adjacent pairs)."""
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    D = rows // n_heads
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU width Meta's FeedForward computes: 2/3 of 4*dim, times ffn_dim_multiplier when
    given, rounded up to a multiple of multiple_of (each step truncated to int, as Meta's code does)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ---------------------------------------------------------------------- params.json -> config

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_params(params: dict, where: str) -> None:
    """Types and ranges of params.json, with the file's own key names in every message."""
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: must be a JSON object, got {type(params).__name__}")
    unknown = sorted(set(params) - _MODEL_KEYS - _RUNTIME_KEYS)
    if unknown:
        raise ConfigError(f"{where}: key(s) camelid does not know: {', '.join(unknown)} (they describe an "
                          f"architecture other than the Llama text model)")
    missing = [k for k in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps") if k not in params]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
        v = params.get(key)
        if key in params and not (_is_int(v) and v > 0):
            raise ConfigError(f"{where}: {key} must be a positive integer, got {v!r}")
    vocab = params.get("vocab_size", -1)
    if not (_is_int(vocab) and (vocab > 0 or vocab == -1)):
        raise ConfigError(f"{where}: vocab_size must be a positive integer or -1, got {vocab!r}")
    for key in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor"):
        v = params.get(key)
        if key in params and v is not None and not (_is_number(v) and v > 0):
            raise ConfigError(f"{where}: {key} must be a positive number, got {v!r}")
    if "norm_eps" in params and params["norm_eps"] is None:
        raise ConfigError(f"{where}: norm_eps must be a positive number, got None")
    if not isinstance(params.get("use_scaled_rope", False), bool):
        raise ConfigError(f"{where}: use_scaled_rope must be true or false, got {params['use_scaled_rope']!r}")
    if params.get("rope_scaling_factor") is not None and not params.get("use_scaled_rope", False):
        raise ConfigError(f"{where}: rope_scaling_factor is set but use_scaled_rope is not true")
    dim, heads = params["dim"], params["n_heads"]
    kv = params.get("n_kv_heads") or heads
    if dim % heads or (dim // heads) % 2:
        raise ConfigError(f"{where}: dim ({dim}) must split into n_heads ({heads}) heads of even size")
    if heads % kv:
        raise ConfigError(f"{where}: n_kv_heads ({kv}) must divide n_heads ({heads})")


def meta_config(params: dict, shapes: dict[str, tuple[int, ...]] | None = None, *, dtype: torch.dtype | None = None,
                where: str = PARAMS) -> LlamaConfig:
    """LlamaConfig from a params.json dict.

    shapes: the full (joined) shape of each tensor, by Meta name. With it, vocab_size -1 is read
    from tok_embeddings, a missing output.weight means tied embeddings, and params.json is checked
    against the tensors (dim, vocab_size, the FFN width from multiple_of / ffn_dim_multiplier).
    dtype: the checkpoint's dtype, recorded as torch_dtype (so dtype="auto" loads it as stored).
    """
    _check_params(params, where)
    dim = params["dim"]
    ffn = intermediate_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    vocab = params.get("vocab_size", -1)
    tied = False
    if shapes is not None:
        norm = shapes.get("norm.weight")
        if norm is not None and tuple(norm) != (dim,):
            raise CheckpointError(f"{where}: dim is {dim}, but norm.weight has shape {tuple(norm)}")
        emb = shapes.get("tok_embeddings.weight")
        if emb is None:
            raise CheckpointError(f"{where}: the checkpoint has no tok_embeddings.weight")
        if len(emb) != 2 or emb[1] != dim:
            raise CheckpointError(f"{where}: dim is {dim}, but tok_embeddings.weight has shape {tuple(emb)}")
        if vocab == -1:
            vocab = emb[0]
        elif vocab != emb[0]:
            raise CheckpointError(f"{where}: vocab_size is {vocab}, but tok_embeddings.weight has "
                                  f"{emb[0]} rows")
        w1 = shapes.get("layers.0.feed_forward.w1.weight")
        if w1 is not None and w1[0] != ffn:
            how = f"multiple_of={params['multiple_of']}"
            if params.get("ffn_dim_multiplier") is not None:
                how += f", ffn_dim_multiplier={params['ffn_dim_multiplier']}"
            raise CheckpointError(
                f"{where}: the feed-forward width it implies ({how}, dim={dim} -> {ffn}) does not match "
                f"layers.0.feed_forward.w1.weight, which has {w1[0]} rows")
        tied = "output.weight" not in shapes
    if vocab == -1:
        raise ConfigError(f"{where}: vocab_size is -1 (set by the tokenizer); pass the tensor shapes to read it "
                          f"from tok_embeddings.weight")
    rope_scaling, max_len = None, DEFAULT_MAX_SEQ_LEN
    if params.get("use_scaled_rope", False):
        rope_scaling = dict(LLAMA3_ROPE)
        if params.get("rope_scaling_factor") is not None:
            rope_scaling["factor"] = float(params["rope_scaling_factor"])
        max_len = SCALED_ROPE_MAX_SEQ_LEN
    d = dict(
        vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"], num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        rms_norm_eps=float(params["norm_eps"]),
        rope_theta=float(params["rope_theta"]) if params.get("rope_theta") is not None else 10000.0,
        rope_scaling=rope_scaling, max_position_embeddings=params.get("max_seq_len") or max_len,
        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None,
        torch_dtype=dtype_name(dtype) if dtype is not None and dtype in DTYPES.values() else None,
        extra={"architectures": ["LlamaForCausalLM"]},
    )
    try:
        return LlamaConfig(**d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _special_token_ids(tokenizer: Path, vocab_size: int) -> dict:
    """bos/eos ids from a tokenizer.model, best effort: a tokenizer camelid cannot read (or whose
    library is not installed) leaves them unset rather than failing the weights."""
    if not tokenizer.is_file():
        return {}
    try:  # SentencePiece's own ids; tiktoken (Llama 3): end of text, end of message, end of turn
        from camelid.formats.tokenizer_model import special_token_ids

        bos, eos = special_token_ids(tokenizer)
    except Exception:  # noqa: BLE001 - the tokenizer is optional; the weights must still load
        return {}

    def ok(i):
        return _is_int(i) and 0 <= i < vocab_size

    out = {}
    if ok(bos):
        out["bos_token_id"] = bos
    eos = [i for i in (eos if isinstance(eos, list) else [eos]) if ok(i)]
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


# ---------------------------------------------------------------------- the folder

def read_params(directory: Path) -> dict:
    path = directory / PARAMS
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {PARAMS} (a Meta checkpoint folder holds {PARAMS} and "
                              f"consolidated.NN.pth files)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def shard_files(directory: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, in rank order, with no rank missing."""
    found: dict[int, Path] = {}
    for path in sorted(directory.glob("consolidated.*.pth")):
        m = _SHARD_RE.match(path.name)
        if not m:
            raise CheckpointError(f"{path}: not a shard name camelid understands (expected consolidated.NN.pth)")
        rank = int(m.group(1))
        if rank in found:
            raise CheckpointError(f"{directory}: {found[rank].name} and {path.name} are both shard {rank}")
        found[rank] = path
    if not found:
        raise CheckpointError(f"{directory}: no consolidated.*.pth weight files")
    missing = [r for r in range(max(found) + 1) if r not in found]
    if missing:
        raise CheckpointError(f"{directory}: shard numbering has a gap: no shard {', '.join(map(str, missing))} "
                              f"(found {', '.join(found[r].name for r in sorted(found))})")
    return [found[r] for r in range(len(found))]


def _join_dim(name: str, pieces: list[torch.Size], dim: int, files: list[Path]) -> int | None:
    """The dim the shards of `name` are joined on; None for a replicated tensor."""
    if len(pieces) == 1:
        return None
    if name == "tok_embeddings.weight":
        # Llama 3: split on the vocabulary (rows); Llama 1/2: on the embedding (columns). Only one
        # of the joins can give params.json's dim columns.
        if len(pieces[0]) == 2 and pieces[0][1] == dim:
            return 0
        if len(pieces[0]) == 2 and pieces[0][1] * len(pieces) == dim:
            return 1
        raise CheckpointError(
            f"{files[0].parent / PARAMS}: dim is {dim}, which fits neither way of joining tok_embeddings.weight "
            f"from {len(pieces)} shards of shape {tuple(pieces[0])} (split on the vocabulary: {pieces[0][1]} "
            f"columns; split on the embedding: {pieces[0][1] * len(pieces)} columns)")
    if name == "output.weight" or name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None  # norms (and anything unknown, which the name check reports)


def _shard_plan(files: list[Path], states: list[dict], dim: int) -> tuple[dict, dict, torch.dtype]:
    """Per tensor: the join dim (None = replicated) and the full shape; and the checkpoint dtype.
    Every shard must hold the same names with the same shapes and dtypes."""
    names = set(states[0])
    for file, state in zip(files[1:], states[1:]):
        if set(state) != names:
            only_0, only_k = sorted(names - set(state)), sorted(set(state) - names)
            parts = [f"missing from {file.name}: {list_names(only_0)}" if only_0 else "",
                     f"only in {file.name}: {list_names(only_k)}" if only_k else ""]
            raise CheckpointError(f"{file.parent}: shards hold different tensors ("
                                  + "; ".join(p for p in parts if p) + f", compared with {files[0].name})")
    join, shapes, dtypes = {}, {}, set()
    for name in sorted(names - DROPPED):
        pieces = [s[name].shape for s in states]
        for file, shape, state in zip(files[1:], pieces[1:], states[1:]):
            if shape != pieces[0]:
                raise CheckpointError(
                    f"{name} has shape {tuple(pieces[0])} in {files[0].name} but {tuple(shape)} in {file.name} "
                    f"(model-parallel shards split each tensor evenly)")
            if state[name].dtype != states[0][name].dtype:
                raise CheckpointError(f"{name} is {states[0][name].dtype} in {files[0].name} but "
                                      f"{state[name].dtype} in {file.name}")
        d = _join_dim(name, pieces, dim, files)
        shape = list(pieces[0])
        if d is not None:
            if len(shape) <= d:
                raise CheckpointError(f"{name} has shape {tuple(shape)} in {files[0].name}: "
                                      f"cannot be joined on dim {d}")
            shape[d] *= len(pieces)
        join[name], shapes[name] = d, tuple(shape)
        dtypes.add(states[0][name].dtype)
    floats = sorted((str(t) for t in dtypes if t.is_floating_point))
    if len(floats) > 1:
        raise CheckpointError(f"{files[0].parent}: tensors of several dtypes ({', '.join(floats)})")
    dtype = getattr(torch, floats[0].removeprefix("torch.")) if floats else torch.float32
    return join, shapes, dtype


def load_meta(directory, dtype=None, device=None, attn_implementation: str = "sdpa",
              model_cls=None) -> LlamaForCausalLM:
    """Load a Meta checkpoint folder. dtype: a torch dtype or its name, "auto" (the checkpoint's,
    usually bfloat16), or None (float32). device: where the weights go (default CPU)."""
    directory = Path(directory)
    params = read_params(directory)
    where = str(directory / PARAMS)
    _check_params(params, where)  # before any shard is opened
    files = shard_files(directory)
    states = [load_torch_state(f) for f in files]  # memory-mapped: nothing is read yet
    join, shapes, ckpt_dtype = _shard_plan(files, states, params["dim"])
    config = meta_config(params, shapes, dtype=ckpt_dtype, where=where)
    for key, value in _special_token_ids(directory / TOKENIZER, config.vocab_size).items():
        setattr(config, key, value)
    config.validate()
    dtype = resolve_dtype(dtype, config)

    model, expected_hf = empty_model(config, model_cls)
    expected = {meta_name(k): v for k, v in expected_hf.items()}
    check_names_and_shapes(directory, expected, shapes, against=f"its {PARAMS}")  # in Meta's names

    where = device_of(device)
    heads = {"wq": config.num_attention_heads, "wk": config.num_key_value_heads}
    for name in sorted(shapes, key=natural_key):  # one tensor at a time: joined, converted, assigned
        pieces = [s[name] for s in states]
        if join[name] is None:
            for file, piece in zip(files[1:], pieces[1:]):
                if not torch.equal(piece, pieces[0]):
                    raise CheckpointError(f"{name} differs between {files[0].name} and {file.name} "
                                          f"(a replicated tensor must be identical in every shard)")
            w = pieces[0]
        else:
            w = torch.cat(pieces, dim=join[name])
        w = w.to(device=where(hf_name(name)), dtype=dtype)
        kind = name.rsplit(".", 2)[-2]
        if name.startswith("layers.") and kind in heads:
            w = meta_to_hf_rows(w, heads[kind])
        if w.untyped_storage().data_ptr() == pieces[0].untyped_storage().data_ptr():
            # Still a view into the memory-mapped shard (same dtype and device, not joined): copy
            # it, so the model owns its weights. A mapped weight would change, or crash the
            # process (SIGBUS), when the file is rewritten or truncated while the model lives.
            w = w.clone()
        assign(model, hf_name(name), w)
        del pieces, w
    del states
    return finish(model, dtype, attn_implementation)


def is_meta_checkpoint(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / PARAMS).is_file() and any(path.glob("consolidated.*.pth"))


def convert_meta_to_hf(src_dir, dst_dir, dtype="auto", max_shard_size="5GB") -> Path:
    """Write a Meta checkpoint folder as a Hugging Face one (config.json + safetensors), keeping the
    checkpoint's dtype by default, and copy tokenizer.model when there is one."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    from camelid.formats.hf import save_pretrained

    model = load_meta(src_dir, dtype=dtype)
    save_pretrained(model, dst_dir, max_shard_size=max_shard_size)
    if (src_dir / TOKENIZER).is_file():
        shutil.copyfile(src_dir / TOKENIZER, dst_dir / TOKENIZER)
    return dst_dir
