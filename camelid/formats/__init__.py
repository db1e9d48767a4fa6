"""Checkpoint formats, side by side: each turns files into (LlamaConfig, tensors) assigned into a
model built on the meta device. Nothing here knows the transforms: camelid/load.py composes them.

hf.py         Hugging Face folders (config.json + safetensors / pytorch_model.bin)
gguf.py       llama.cpp GGUF files (gguf_file.py: the checked parser; gguf_write.py: the writer)
meta.py       Meta's original layout (params.json + consolidated.NN.pth; tokenizer_model.py: its
              tokenizer.model, SentencePiece or tiktoken ranks)
"""

from __future__ import annotations


from pathlib import Path

from camelid.core.config import LlamaConfig
from camelid.formats.common import DTYPES, CheckpointError
from camelid.formats.hf import load_hf, save_pretrained
from camelid.formats.hub import DEFAULT_MODEL, resolve


def gguf_path(path):
    """The file that would be a GGUF checkpoint: `path` itself, or the one .gguf file of a
    folder without config.json; None when there is none (is_gguf says whether it really is)."""
    if not path.is_dir():
        return path if path.is_file() else None
    ggufs = [] if (path / "config.json").is_file() else sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: several .gguf files ({', '.join(g.name for g in ggufs)}); name one")
    return ggufs[0] if ggufs else None


def read_model(path: Path, **kwargs):
    """The float model of the checkpoint at `path` (a resolved path): HF folder, Meta folder or
    GGUF file, each through its own format's reader. kwargs: dtype, device, attn_implementation,
    model_cls (see load_hf)."""
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf(path, **kwargs)
    if path.is_dir() and (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        from camelid.formats.meta import load_meta

        return load_meta(path, **kwargs)
    from camelid.formats.gguf import is_gguf, load_gguf

    gguf = gguf_path(path)
    if gguf is not None and is_gguf(gguf):
        return load_gguf(gguf, **kwargs)
    raise CheckpointError(f"{gguf or path}: not a checkpoint camelid can read (expected a folder with config.json, "
                          f"a Meta folder with params.json + consolidated.*.pth, or a .gguf file)")


def checkpoint_config(name_or_path=None) -> LlamaConfig:
    """The LlamaConfig of a checkpoint (HF folder, GGUF, Meta folder, packaged name) or preset,
    read without loading any weight."""
    try:
        path = resolve(DEFAULT_MODEL if name_or_path is None else name_or_path)
    except Exception:
        return LlamaConfig.from_pretrained(name_or_path)  # a preset name
    gguf = gguf_path(path)
    if gguf is not None and not (path.is_dir() and (path / "config.json").is_file()):
        from camelid.formats.gguf import gguf_config
        from camelid.formats.gguf_file import GGUFFile

        g = GGUFFile(gguf)
        try:
            return gguf_config(g)
        finally:
            g.close()
    return LlamaConfig.from_pretrained(path)


def save_gguf(model, path, dtype: str = "f16", vocab: dict | None = None):
    """Write `model` as a GGUF file llama.cpp loads (see camelid.formats.gguf_write.save_gguf);
    `vocab`: tokenizer.* fields (camelid.text.gguf_vocab.save_gguf takes a tokenizer)."""
    from camelid.formats.gguf_write import save_gguf as _save_gguf

    return _save_gguf(model, path, dtype=dtype, vocab=vocab)


__all__ = ["DTYPES", "CheckpointError", "checkpoint_config", "gguf_path", "load_hf", "read_model", "save_gguf",
           "save_pretrained"]
