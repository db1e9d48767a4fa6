"""THE loader: the one place that knows both the file formats and the transforms.

    open checkpoint -> build on meta -> [quantized layers from the file's own blocks] -> assign
    weights -> [device_map placement] -> [quantize] -> [LoRA adapter: merged into a float base,
    kept beside a quantized one] -> fuse (quantized) -> pack (CPU float)

Pack and fuse come last, so every transform before them (quantize, LoRA, tensor parallelism)
gets plain nn.Linear layers; `pack=False` stops there, for training or export. `save` is the
way back: a float model as a Hugging Face folder, a quantized one with its codes.

Every program, the server, tensor-parallel loading and evaluation load through `load`;
`LlamaForCausalLM.from_pretrained` (camelid/hf_compat.py) is `load` with its own class.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import camelid.kernels as kernels
from camelid.core.config import LlamaConfig
from camelid.formats import CheckpointError, checkpoint_config, gguf_path, read_model
from camelid.formats.common import (DTYPES, assign, check_names_and_shapes, column_major, empty_model, finish,
                                    resolve_dtype)
from camelid.formats.gguf import IGNORED, gguf_config, hf_name, is_gguf, tensor_data, unpermute_from_gguf
from camelid.formats.gguf_blocks import int4_from_q4_0, int4_from_q4_1, q8_0_rows
from camelid.formats.gguf_file import GGUFFile
from camelid.formats.hf import is_quantized_checkpoint, read_file, save_pretrained, weight_files
from camelid.formats.hub import DEFAULT_MODEL, resolve
from camelid.transforms.fuse import fuse
from camelid.transforms.native import fused_decode
from camelid.transforms.lora import load_adapter, merge_and_unload, read_adapter_config
from camelid.transforms.packed import can_pack, pack as pack_model
from camelid.transforms.placement import dispatch, placer, plan_device_map
from camelid.transforms.quantize import (BlockLinear, Int4Linear, Int8Linear, QuantizedEmbedding, QuantizedLinear, is_quantized,
                                         layer_from_state, quantization_summary, quantize, quantize_int8)
from camelid.transforms.tp import TPError, check_plan, tensor_parallel


def load(name_or_path=None, dtype=None, device=None, torch_dtype=None, attn_implementation: str = "sdpa",
         pack: bool | None = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
         bnb_4bit_quant_type: str | None = None, group_size: int | None = None, device_map=None, max_memory=None,
         adapter=None, model_cls=None, bnb_8bit_quant_type: str | None = None):
    """Load a model, choosing the format from what is there.

    name_or_path: a HF folder, a .gguf file (or a folder holding one), a packaged model name
    ("smollm2-135m-instruct", the default when None), or a Hugging Face repo id "org/name".
    dtype (alias torch_dtype, as transformers spells it): torch dtype, its name, "auto" for the
    checkpoint's own, or None for float32. device: "cpu", "cuda", "cuda:1", ...
    pack: put the linear weights in oneDNN's packed layout for CPU inference (camelid/transforms/
    packed.py: faster and batch-invariant, but frozen). None (the default) packs on CPU; pass
    False to train or export.
    load_in_8bit / load_in_4bit (transformers' names): weight-only quantization (camelid/transforms/
    quantize.py). On CPU with camelid's kernels the defaults are GGUF's own blocks: Q4_1 (4-bit) and
    Q8_0 (8-bit), run by camelid's kernels and written by save_gguf(dtype="auto"); elsewhere int4 in
    groups of `group_size` (default 32) and int8 per output channel. bnb_4bit_quant_type: "q4_1",
    "q4_0", "q4_k" (super-blocks of 256; layers whose rows are not a multiple of 256 take q4_1), "int4"
    or "nf4" (NormalFloat4); bnb_8bit_quant_type: "q8_0" or "int8". A GGUF's own
    Q4/Q8 blocks load as they are (no float copy). A checkpoint saved quantized (`save` of a
    quantized model) loads quantized, without these flags.
    device_map / max_memory (transformers' names): place the model over several devices, whole
    layers each: "auto" (spread over the GPUs, then the CPU), "sequential", a device, or a dict
    {"model.layers.0": 0, ..., "lm_head": "cpu"}; max_memory {0: "20GiB", "cpu": "64GiB"} caps each
    device. Checked against the config before any weight is read (camelid/transforms/placement.py).
    adapter: a LoRA adapter folder (peft's layout), checked before any weight is read; merged into
    a float base (which is then packed), kept beside a quantized one.
    model_cls: the class to build (default the core LlamaForCausalLM).
    """
    if dtype is not None and torch_dtype is not None and DTYPES.get(dtype, dtype) != DTYPES.get(torch_dtype,
                                                                                               torch_dtype):
        raise ValueError(f"pass dtype or torch_dtype, not both: dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree")
    dtype = dtype if dtype is not None else torch_dtype
    path = resolve(DEFAULT_MODEL if name_or_path is None else name_or_path)
    if load_in_8bit and load_in_4bit:
        raise ValueError("pass load_in_8bit or load_in_4bit, not both")
    blocks = kernels.available() and torch.device(device or "cpu").type == "cpu" and device_map is None
    if bnb_4bit_quant_type is None:
        bnb_4bit_quant_type = "q4_1" if blocks and group_size in (None, 32) else "int4"
    if bnb_4bit_quant_type not in ("int4", "nf4", "q4_0", "q4_1", "q4_k"):
        raise ValueError(f"bnb_4bit_quant_type must be 'q4_1', 'q4_0', 'q4_k', 'int4' or 'nf4', "
                         f"got {bnb_4bit_quant_type!r}")
    if bnb_4bit_quant_type in ("q4_0", "q4_1", "q4_k") and group_size not in (None, 32):
        raise ValueError(f"{bnb_4bit_quant_type} blocks hold 32 weights: group_size {group_size!r} does not apply "
                         f"(use bnb_4bit_quant_type='int4')")
    bnb_8bit_quant_type = bnb_8bit_quant_type or ("q8_0" if blocks else "int8")
    if bnb_8bit_quant_type not in ("int8", "q8_0"):
        raise ValueError(f"bnb_8bit_quant_type must be 'q8_0' or 'int8', got {bnb_8bit_quant_type!r}")
    if group_size is not None and not load_in_4bit:
        raise ValueError("group_size applies to load_in_4bit")
    if adapter is not None:
        read_adapter_config(adapter)  # a bad adapter fails before the model loads
    kwargs = dict(dtype=dtype, device=device, attn_implementation=attn_implementation, model_cls=model_cls)
    if path.is_dir() and is_quantized_checkpoint(path):
        if load_in_8bit or load_in_4bit:
            raise ValueError(f"{path} is already quantized: load it without load_in_8bit / load_in_4bit")
        model = load_quantized(path, device=device, attn_implementation=attn_implementation, model_cls=model_cls)
        return _finish(model, adapter, pack)
    plan = None
    if device_map is not None:
        plan = _placement(path, dtype, device, device_map, max_memory, load_in_8bit or load_in_4bit)
        kwargs["device"] = placer(plan)
    elif max_memory is not None:
        raise ValueError("max_memory applies with device_map ('auto', 'balanced' or 'sequential')")
    gguf = gguf_path(path)
    wants = (bnb_4bit_quant_type if load_in_4bit else bnb_8bit_quant_type if load_in_8bit else None)
    if (gguf is not None and plan is None and wants in (None, "q4_0", "q4_1", "q4_k", "q8_0") and is_gguf(gguf)
            and (pack is not False or wants) and native_gguf(dtype, device)):
        model = load_gguf_quantized(gguf, **kwargs, native=True)  # the file's blocks, kept
        kinds = {m.format for m in model.modules() if isinstance(m, BlockLinear)}
        four = {"q4_0", "q4_1", "q4_k"}
        if wants is None or kinds == {wants} or (load_in_4bit and kinds & four
                                                 and kinds <= four | {"q6_k", "q8_0"}):  # 6/8-bit: the lm_head
            return _finish(model, adapter, pack)
        # the file holds other blocks than asked for: quantize from its floats below
    gguf = gguf if load_in_4bit and bnb_4bit_quant_type == "int4" and group_size in (None, 32) else None
    if gguf is not None and is_gguf(gguf):
        model = load_gguf_quantized(gguf, **kwargs)  # Q4/Q8 blocks map to int4 g32 / int8 as they are
        if model.quantization_config["format"] == "int4":
            return _finish(model, adapter, pack)
        # other block types (F16, Q8_0, K-quants) stay float or int8 there: quantize from floats below
    model = read_model(path, **kwargs)
    if plan is not None:
        dispatch(model, plan)
        if len(set(plan.values())) > 1 or next(iter(plan.values())).type != "cpu":
            pack = False  # packing is for a model wholly on the CPU
    if load_in_8bit or load_in_4bit:
        fmt = bnb_8bit_quant_type if load_in_8bit else bnb_4bit_quant_type
        model = quantize(model, bits=8 if load_in_8bit else 4, group_size=group_size, format=fmt)
    return _finish(model, adapter, pack)


def _finish(model, adapter, pack):
    """The last steps, in order: adapter, then fuse (quantized) or pack (float, CPU)."""
    if adapter is not None:
        load_adapter(model, adapter)
        if is_quantized(model):
            return model  # LoRA wraps the separate projections: no fusing
        merge_and_unload(model)
    if is_quantized(model):
        return _half_cache(fused_decode(fuse(model)))  # fewer kernel calls; decode layers in one native call each
    if pack is False:
        return model
    if pack and not can_pack(model):
        raise ValueError("pack=True needs a CPU model in float32 or bfloat16 and camelid's kernels or a torch "
                         "built with oneDNN")
    if kernels.available() and can_pack(model):  # camelid's float tiles, q/k/v and gate/up fused, and
        return fused_decode(pack_model(fuse(model)))  # decode steps one native call per layer
    return pack_model(model)  # oneDNN's layout where it can (CPU, float32/bfloat16); the rest as it is


def _half_cache(model):
    """GGUF blocks decoded by the fused step keep llama.cpp's float16 KV cache (half the bytes a
    step reads; the step widens each head once). Decoded by the PyTorch layers (LoRA on top, no
    kernels), a half cache would be widened whole at every step: those keep the model's dtype."""
    if model.model.fused_decode is not None and any(isinstance(m, BlockLinear) for m in model.modules()):
        model.cache_dtype = "float16"
    return model


def _placement(path, dtype, device, device_map, max_memory, quantized):
    """The unit -> device plan, from the checkpoint's config on the meta device (no weight read)."""
    if device is not None:
        raise ValueError(f"pass device or device_map, not both (device={device!r})")
    if quantized or (path.is_dir() and is_quantized_checkpoint(path)):
        raise ValueError("device_map places float weights; quantized weights (load_in_8bit / load_in_4bit, "
                         "a quantized checkpoint) load on one device")
    config = checkpoint_config(path)
    meta, _ = empty_model(config)
    return plan_device_map(meta.to(resolve_dtype(dtype, config)), device_map, max_memory)


# ---------------------------------------------------------------------- saving

def save(model: nn.Module, directory, max_shard_size="5GB") -> Path:
    """A Hugging Face folder (safetensors, written atomically, sharded past max_shard_size). A
    quantized model keeps its codes in a device-independent layout (int4 `qweight` nibbles
    high-first + `scales_and_zeros` [G, N, 2]; int8 `qweight` + `scales` + `zeros`; nf4 `qweight`
    + `absmax`) with a `quantization_config` in config.json, and reloads quantized."""
    if is_quantized(model):
        model.config.extra["quantization_config"] = {"quant_method": "camelid", **quantization_summary(model)}
    return save_pretrained(model, directory, max_shard_size=max_shard_size)


def save_quantized(model: nn.Module, directory, max_shard_size="5GB") -> Path:
    """`save` of a model that must be quantized."""
    if not is_quantized(model):
        raise ValueError("the model is not quantized: use save_pretrained (or quantize it first)")
    return save(model, directory, max_shard_size)


def load_quantized(directory, device=None, attn_implementation: str = "sdpa", model_cls=None):
    """Reload what `save` wrote for a quantized model, packing the stored codes for `device`;
    nothing is re-quantized. Every tensor name and shape is checked against config.json."""
    directory = Path(directory)
    if not is_quantized_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a camelid quantized checkpoint (config.json has no "
                              f"quantization_config with quant_method 'camelid')")
    config = LlamaConfig.from_pretrained(directory)
    dtype, device = resolve_dtype("auto", config), torch.device(device or "cpu")
    tensors = {k: v for file in sorted(set(weight_files(directory).values())) for k, v in read_file(file).items()}
    model, expected = empty_model(config, model_cls)
    for key in sorted(k for k in tensors if k.endswith(".qweight")):
        prefix = key.removesuffix(".qweight")
        table = prefix == "model.embed_tokens.table" or (prefix == "lm_head" and config.tie_word_embeddings)
        name = "model.embed_tokens.weight" if table else f"{prefix}.weight"
        try:
            layer = layer_from_state(prefix, tensors, dtype, device)
        except (KeyError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{directory}: {prefix}: {e}") from None
        if expected.get(name) != (layer.out_features, layer.in_features):
            raise CheckpointError(f"{directory}: {prefix} is {layer.out_features} x {layer.in_features}; the "
                                  f"config wants {expected.get(name, 'no such layer')}")
        if prefix != "model.embed_tokens.table":
            parent, _, child = prefix.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        if table:
            model.model.embed_tokens = QuantizedEmbedding(layer, config.pad_token_id, tied=prefix == "lm_head")
        expected.pop(name)
        expected.pop(f"{prefix}.bias", None)
    check_names_and_shapes(directory, expected, {k: tuple(v.shape) for k, v in tensors.items()})
    for name, t in tensors.items():
        assign(model, name, t.to(device=device, dtype=dtype))
    if config.tie_word_embeddings and isinstance(model.model.embed_tokens, nn.Embedding):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.quantization_config = {k: v for k, v in config.extra["quantization_config"].items() if k != "quant_method"}
    return model.set_attn_implementation(attn_implementation).requires_grad_(False).eval()


# ---------------------------------------------------------------------- GGUF, quantized as stored

def int8_from_q8_0(raw, shape, rows_per_chunk: int = 4096):
    """Q8_0 blocks -> int8 (q, scales, zeros) per row. Not exact: Q8_0 scales each block of 32,
    the int8 kernel each row, so rows are re-rounded (|error| <= row scale / 2)."""
    parts = [quantize_int8(w) for w in q8_0_rows(raw, shape, rows_per_chunk)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _gguf_layer(t, heads, dtype, device, native: bool = False) -> QuantizedLinear | None:
    """A GGUF tensor as a quantized layer, or None when its type does not map. native: the
    file's own blocks for camelid's kernels (Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K), else int4 g32 / int8."""
    from gguf import GGMLQuantizationType as T

    fix = (lambda x: unpermute_from_gguf(x, heads)) if heads else (lambda x: x)  # q/k rows, see formats/gguf.py
    if native:
        if int(t.type) not in kernels.NAMES:
            return None
        blocks = kernels.file_blocks(t.data, *t.shape, int(t.type))
        scales = kernels.block_scales(blocks, int(t.type))
        if not torch.isfinite(scales).all():
            row, block = (~torch.isfinite(scales)).any(-1).nonzero()[0].tolist()
            raise CheckpointError(f"{t.name}: block {block} of row {row} has a NaN or infinite scale (corrupt file)")
        return BlockLinear(fix(blocks), int(t.type), dtype=dtype)
    if t.type in (T.Q4_0, T.Q4_1):
        q, s, z = (int4_from_q4_0 if t.type == T.Q4_0 else int4_from_q4_1)(t.data, t.shape)
        return Int4Linear(fix(q), fix(s), fix(z), dtype=dtype, device=device)
    if t.type == T.Q8_0:
        return Int8Linear(*(fix(x).to(device) for x in int8_from_q8_0(t.data, t.shape)), dtype=dtype)
    return None


def native_gguf(dtype, device) -> bool:
    """Whether a GGUF loads with its blocks kept for camelid's CPU kernels: the default on CPU when
    no dtype is asked for (dtype="float32" dequantizes, for parity work; pack=False gives plain
    float layers, for training and export) and the kernels built."""
    return dtype is None and torch.device(device or "cpu").type == "cpu" and kernels.available()


def load_gguf_quantized(path, dtype=None, device=None, attn_implementation: str = "sdpa", model_cls=None,
                        native: bool = False):
    """A GGUF file as a quantized model, straight from the blocks (no float32 copy of the model).
    native: Q4_0/Q4_1/Q8_0 weights (linear layers and embeddings) stay GGUF blocks for camelid's
    kernels (BlockLinear); else Q4_0/Q4_1 become int4 g32 and Q8_0 int8 (torch's kernels). Every
    other tensor is dequantized to `dtype` (default float32) as camelid.formats.gguf does; a
    quantized weight with no kernel gets a one-line note."""
    g = GGUFFile(path)
    try:
        config = gguf_config(g)
        dtype = resolve_dtype(dtype, config)
        model, expected = empty_model(config, model_cls)  # unknown GGUF names show up as unexpected tensors
        check_names_and_shapes(g.path, expected, {hf_name(n) or n: t.shape for n, t in g.tensors.items()
                                                   if n not in IGNORED}, against="its metadata")
        device, tied = torch.device(device or "cpu"), config.tie_word_embeddings
        no_kernel = {}
        # biases last: their layers are built by then
        for name in sorted((n for n in g.tensors if n not in IGNORED), key=lambda n: n.endswith(".bias")):
            t, (owner, _, attr) = g.tensors[name], hf_name(name).rpartition(".")
            heads = (config.num_attention_heads if ".attn_q." in name else
                     config.num_key_value_heads if ".attn_k." in name else None)
            quantizable = attr == "weight" and (owner.endswith("_proj") or owner in ("lm_head", "model.embed_tokens"))
            layer = _gguf_layer(t, heads, dtype, device, native) if quantizable else None
            if layer is None and quantizable and t.type.name not in ("F32", "F16", "BF16", "F64"):
                no_kernel.setdefault(t.type.name, []).append(name)
            if layer is None:  # dequantized, as load_gguf does
                w = tensor_data(t)
                w = column_major((unpermute_from_gguf(w, heads) if heads else w).to(device=device, dtype=dtype))
                setattr(model.get_submodule(owner), attr, nn.Parameter(w, requires_grad=False))
            elif owner == "model.embed_tokens":
                if tied:
                    model.lm_head = layer
                model.model.embed_tokens = QuantizedEmbedding(layer, config.pad_token_id, tied)
            else:
                parent, _, child = owner.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
        for kind, names in no_kernel.items():
            warnings.warn(f"camelid: {g.path.name}: no kernel for {kind} ({names[0]}"
                          f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}); dequantized to {dtype}",
                          stacklevel=3)
        if tied and isinstance(model.model.embed_tokens, nn.Embedding):
            model.lm_head.weight = model.model.embed_tokens.weight  # the table stayed float
        model.gguf_metadata = {k: v for k, v in g.fields.items() if not k.startswith("tokenizer.ggml.")}
    finally:
        g.close()
    model.config.torch_dtype = str(dtype).removeprefix("torch.")
    model.quantization_config = quantization_summary(model)
    return model.set_attn_implementation(attn_implementation).requires_grad_(False).eval()


# ---------------------------------------------------------------------- tensor parallelism

def load_tensor_parallel(name_or_path=None, group=None, dtype=None, attn_implementation: str = "sdpa",
                         model_cls=None):
    """This rank's shard of a checkpoint. From an HF safetensors folder only each tensor's shard is
    read (safetensors slices), so no rank holds the whole model; other formats are loaded whole,
    then split."""
    from safetensors import safe_open

    if not dist.is_available() or not dist.is_initialized():
        raise TPError("tensor_parallel needs torch.distributed initialised (torchrun, or dist.init_process_group)")
    path = resolve(DEFAULT_MODEL if name_or_path is None else name_or_path)
    files = weight_files(path) if path.is_dir() and (path / "config.json").is_file() else None
    if not files or any(f.suffix != ".safetensors" for f in files.values()):
        model = load(path, dtype=dtype, pack=False, attn_implementation=attn_implementation, model_cls=model_cls)
        return tensor_parallel(model, group)
    config = LlamaConfig.from_pretrained(path)
    check_plan(config, dist.get_world_size(group))
    dtype = resolve_dtype(dtype, config)
    if "lm_head.weight" not in files:
        config.tie_word_embeddings = True
    model, _ = empty_model(config, model_cls)
    handles = {}

    def source(name, spec):
        f = files.get(name)
        if f is None:
            raise TPError(f"{path}: the checkpoint has no tensor {name}")
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        s = handles[f].get_slice(name)
        t = s[:] if spec is None else (s[spec[1]] if spec[0] == 0 else s[:, spec[1]])
        return t.to(dtype).contiguous()

    tensor_parallel(model, group, source=source)
    handles.clear()
    return finish(model, dtype, attn_implementation)
