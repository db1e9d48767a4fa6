"""Checkpoint formats, side by side: each turns files into (LlamaConfig, tensors) and a model.

hf.py         Hugging Face folders (config.json + safetensors / pytorch_model.bin)
gguf.py       llama.cpp GGUF files (gguf_file.py: the checked parser; gguf_save.py: the writer)
meta.py       Meta's original layout (params.json + consolidated.NN.pth)
"""

from __future__ import annotations


from ..config import LlamaConfig
from .common import DTYPES, CheckpointError
from .hf import load_hf, save_pretrained


def load_pretrained(name_or_path=None, dtype=None, device=None, torch_dtype=None,
                    attn_implementation: str = "sdpa", pack: bool | None = None, load_in_8bit: bool = False,
                    load_in_4bit: bool = False, bnb_4bit_quant_type: str = "int4", group_size: int | None = None,
                    device_map=None, max_memory=None):
    """Load a model, choosing the format from what is there.

    name_or_path: a HF folder, a .gguf file (or a folder holding one), a packaged model name
    ("smollm2-135m-instruct", the default when None), or a Hugging Face repo id "org/name".
    dtype (alias torch_dtype, as transformers spells it): torch dtype, its name, "auto" for the
    checkpoint's own, or None for float32. device: "cpu", "cuda", "cuda:1", ...
    pack: put the linear weights in oneDNN's packed layout for CPU inference (camelid/packed.py:
    faster and batch-invariant, but frozen). None (the default) packs on CPU; pass False to train.
    load_in_8bit / load_in_4bit (transformers' names): weight-only quantization (camelid/quantize.py):
    int8 per output channel, or int4 in groups of `group_size` (default 32; "nf4" as
    bnb_4bit_quant_type gives NormalFloat4). A GGUF with Q4_0/Q4_1/Q8_0 tensors loads straight into
    int4/int8 with load_in_4bit (no float copy). A checkpoint saved quantized (save_pretrained of a
    quantized model) loads quantized, without these flags.
    device_map / max_memory (transformers' names): place the model over several devices, whole
    layers each: "auto" (spread over the GPUs, then the CPU), "sequential", a device, or a dict
    {"model.layers.0": 0, ..., "lm_head": "cpu"}; max_memory {0: "20GiB", "cpu": "64GiB"} caps each
    device. Checked against the config before any weight is read (camelid/placement.py).
    """
    from ..fuse import fuse
    from ..hub import DEFAULT_MODEL, resolve
    from ..quantize import is_quantized_checkpoint, load_gguf_quantized, load_quantized, quantize
    from .gguf import is_gguf
    from ..placement import dispatch, placer

    if dtype is not None and torch_dtype is not None and DTYPES.get(dtype, dtype) != DTYPES.get(torch_dtype,
                                                                                               torch_dtype):
        raise ValueError(f"pass dtype or torch_dtype, not both: dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree")
    dtype = dtype if dtype is not None else torch_dtype
    path = resolve(DEFAULT_MODEL if name_or_path is None else name_or_path)
    kwargs = dict(dtype=dtype, device=device, attn_implementation=attn_implementation)
    if load_in_8bit and load_in_4bit:
        raise ValueError("pass load_in_8bit or load_in_4bit, not both")
    if bnb_4bit_quant_type not in ("int4", "nf4"):
        raise ValueError(f"bnb_4bit_quant_type must be 'int4' or 'nf4', got {bnb_4bit_quant_type!r}")
    if group_size is not None and not load_in_4bit:
        raise ValueError("group_size applies to load_in_4bit")
    # quantized models get fused q/k/v and gate/up products (camelid/fuse.py: fewer int kernel calls)
    if path.is_dir() and is_quantized_checkpoint(path):
        if load_in_8bit or load_in_4bit:
            raise ValueError(f"{path} is already quantized: load it without load_in_8bit / load_in_4bit")
        return fuse(load_quantized(path, device=device, attn_implementation=attn_implementation))
    plan = None
    if device_map is not None:
        plan = _placement(path, dtype, device, device_map, max_memory, load_in_8bit or load_in_4bit)
        kwargs["device"] = placer(plan)
    elif max_memory is not None:
        raise ValueError("max_memory applies with device_map ('auto', 'balanced' or 'sequential')")
    gguf = _gguf_path(path) if load_in_4bit and bnb_4bit_quant_type == "int4" and group_size in (None, 32) else None
    if gguf is not None and is_gguf(gguf):
        model = load_gguf_quantized(gguf, **kwargs)  # Q4/Q8 blocks map to int4 g32 / int8 as they are
        if model.quantization_config["format"] == "int4":
            return fuse(model)
        # other block types (F16, Q8_0, K-quants) stay float or int8 there: quantize from floats below
    model = _load(path, kwargs)
    if plan is not None:
        dispatch(model, plan)
        if len(set(plan.values())) > 1 or next(iter(plan.values())).type != "cpu":
            return model  # packing is for a model wholly on the CPU
    if load_in_8bit or load_in_4bit:
        fmt = "int8" if load_in_8bit else bnb_4bit_quant_type
        return fuse(quantize(model, bits=8 if load_in_8bit else 4, group_size=group_size, format=fmt))
    if pack or pack is None:
        from ..packed import can_pack, pack as pack_model

        if pack and not can_pack(model):
            raise ValueError("pack=True needs a CPU model in float32 or bfloat16 and a torch built with oneDNN")
        pack_model(model)
    return model


def _placement(path, dtype, device, device_map, max_memory, quantized):
    """The unit -> device plan, from the checkpoint's config on the meta device (no weight read)."""
    from ..placement import plan_device_map
    from ..quantize import is_quantized_checkpoint
    from .common import empty_model, resolve_dtype

    if device is not None:
        raise ValueError(f"pass device or device_map, not both (device={device!r})")
    if quantized or (path.is_dir() and is_quantized_checkpoint(path)):
        raise ValueError("device_map places float weights; quantized weights (load_in_8bit / load_in_4bit, "
                         "a quantized checkpoint) load on one device")
    config = checkpoint_config(path)
    meta, _ = empty_model(config)
    return plan_device_map(meta.to(resolve_dtype(dtype, config)), device_map, max_memory)


def _gguf_path(path):
    """The file that would be a GGUF checkpoint: `path` itself, or the one .gguf file of a
    folder without config.json; None when there is none (is_gguf says whether it really is)."""
    if not path.is_dir():
        return path if path.is_file() else None
    ggufs = [] if (path / "config.json").is_file() else sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: several .gguf files ({', '.join(g.name for g in ggufs)}); name one")
    return ggufs[0] if ggufs else None


def _load(path, kwargs):
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf(path, **kwargs)
    if path.is_dir() and (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        from .meta import load_meta

        return load_meta(path, **kwargs)
    from .gguf import is_gguf, load_gguf

    gguf = _gguf_path(path)
    if gguf is not None and is_gguf(gguf):
        return load_gguf(gguf, **kwargs)
    raise CheckpointError(f"{gguf or path}: not a checkpoint camelid can read (expected a folder with config.json, "
                          f"a Meta folder with params.json + consolidated.*.pth, or a .gguf file)")


def checkpoint_config(name_or_path=None) -> LlamaConfig:
    """The LlamaConfig of a checkpoint (HF folder, GGUF, Meta folder, packaged name) or preset,
    read without loading any weight."""
    from ..hub import DEFAULT_MODEL, resolve

    try:
        path = resolve(DEFAULT_MODEL if name_or_path is None else name_or_path)
    except Exception:
        return LlamaConfig.from_pretrained(name_or_path)  # a preset name
    gguf = _gguf_path(path)
    if gguf is not None and not (path.is_dir() and (path / "config.json").is_file()):
        from .gguf import gguf_config
        from .gguf_file import GGUFFile

        g = GGUFFile(gguf)
        try:
            return gguf_config(g)
        finally:
            g.close()
    return LlamaConfig.from_pretrained(path)


def save_gguf(model, path, dtype: str = "f16", tokenizer=None):
    """Write `model` as a GGUF file llama.cpp loads (see camelid.formats.gguf.save_gguf)."""
    from .gguf_save import save_gguf as _save_gguf

    return _save_gguf(model, path, dtype=dtype, tokenizer=tokenizer)


__all__ = ["CheckpointError", "checkpoint_config", "load_hf", "load_pretrained", "save_gguf", "save_pretrained"]
