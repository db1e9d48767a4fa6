"""Checkpoint formats, side by side: each turns files into (LlamaConfig, tensors) and a model.

hf.py   Hugging Face folders (config.json + safetensors / pytorch_model.bin)
"""

from __future__ import annotations

from pathlib import Path

from .hf import CheckpointError, load_hf, save_pretrained


def load_pretrained(path, dtype=None, device=None, torch_dtype=None, attn_implementation: str = "sdpa"):
    """Load a model from a checkpoint path, choosing the format from what is there.

    dtype (alias torch_dtype, as transformers spells it): torch dtype, its name, "auto" for the
    checkpoint's own, or None for float32. device: "cpu", "cuda", "cuda:1", ...
    """
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError("pass dtype or torch_dtype, not both")
    dtype = dtype if dtype is not None else torch_dtype
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    raise CheckpointError(f"{path}: not a checkpoint camelid can read (expected a folder with config.json)")


__all__ = ["CheckpointError", "load_hf", "load_pretrained", "save_pretrained"]
