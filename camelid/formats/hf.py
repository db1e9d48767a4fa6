"""Hugging Face checkpoint folders: config.json + safetensors (single or sharded) or legacy .bin.

Loading checks every tensor name and shape against the model before any weight is read, builds
the model on the meta device and assigns the checkpoint's tensors in place (safetensors are
memory-mapped, so peak memory stays near one copy of the weights). Saving writes each file to
a temp name and renames it, so an interrupted save never leaves a torn file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from camelid.atomic import (fsync_dir, make_dir, new_file_mode, remove_if_empty, remove_stale_temps,
                            temp_path)
from camelid.core.config import LlamaConfig
from camelid.core.model import LlamaForCausalLM
from camelid.formats.common import (CheckpointError, assign, check_names_and_shapes, device_of, dtype_name,
                                    empty_model, finish, list_names, load_torch_state, natural_key, resolve_dtype)

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exporters saved; recomputed here


# ---------------------------------------------------------------------- reading: which tensors where

def weight_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the file that holds it, validating index files and duplicates."""
    for index_name, single_name in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if (directory / index_name).is_file():
            shard_of = _read_index(directory, index_name)
            break
        if (directory / single_name).is_file():
            shard_of = None
            files = [directory / single_name]
            break
    else:
        raise CheckpointError(f"{directory}: no weights found (looked for {SAFE_INDEX}, {SAFE_SINGLE}, "
                              f"{BIN_INDEX}, {BIN_SINGLE})")
    if shard_of is not None:
        files = sorted(set(shard_of.values()))
    location: dict[str, Path] = {}
    for file in files:
        for name in _tensor_names(file):
            if name in location:
                raise CheckpointError(f"tensor {name!r} appears in both {location[name].name} and {file.name}")
            location[name] = file
    if shard_of is not None:
        wrong = sorted(n for n, f in shard_of.items() if location.get(n) != f)
        if wrong:
            raise CheckpointError(f"{directory / index_name}: tensors not in the shard the index names: "
                                  f"{list_names(wrong)}")
    return location


def _read_index(directory: Path, index_name: str) -> dict[str, Path]:
    path = directory / index_name
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid index (needs a 'weight_map' object): {e}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: 'weight_map' must be an object")
    shard_of = {}
    for name, filename in weight_map.items():
        if not isinstance(filename, str) or not filename:
            raise CheckpointError(f"{path}: tensor {name!r} maps to {filename!r}, not a file name")
        # A plain name in this folder: no absolute path, no "..", no sub-folder. Checked on the name,
        # not on the resolved path, because the Hugging Face cache's snapshot folders hold symlinks
        # to ../../blobs/<hash>, and those are the checkpoints people load most.
        if filename in (".", "..") or "/" in filename or "\\" in filename or os.path.isabs(filename):
            raise CheckpointError(f"{path}: tensor {name!r} points outside the checkpoint folder: {filename!r}")
        file = directory / filename
        if not file.is_file():
            raise CheckpointError(f"{path}: shard {filename!r} (for tensor {name!r}) does not exist")
        shard_of[name] = file
    return shard_of


HEADER_BYTES_PER_TENSOR = 512  # a safetensors header entry: name, dtype, shape, offsets (~100-200 bytes)


def check_header_sizes(directory: Path, config: LlamaConfig) -> None:
    """Refuse a safetensors file whose header is far larger than this config's tensors could need,
    from its first 8 bytes, before the header is parsed: a 67 MB header of 1M empty entries took
    12-81 s and 1.4+ GB to parse only to fail on the names."""
    tensors = 16 * (config.num_hidden_layers + 1)  # 9-13 per layer (with biases), a few outside; doubled
    limit = tensors * HEADER_BYTES_PER_TENSOR + (1 << 20)  # + the __metadata__ entry
    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                head = f.read(8)
        except OSError:
            continue  # reported where the file is read
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        if size > limit:
            raise CheckpointError(f"{file}: its header is {size:,} bytes; a model of {config.num_hidden_layers} "
                                  f"layers needs at most {limit:,} (about {tensors} tensors): not this model's "
                                  f"weights, or a corrupt file")


def _tensor_names(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return list(load_torch_state(file).keys())


def _shapes_and_dtypes(location: dict[str, Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Shape and dtype of every tensor in `location` (headers only for safetensors)."""
    shapes, dtypes = {}, {}
    for file in sorted(set(location.values())):
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    if k in location:  # not the dropped ones (rotary_emb.inv_freq)
                        s = f.get_slice(k)
                        shapes[k] = tuple(s.get_shape())
                        dtypes[k] = _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype())  # else its name
        else:
            for k, t in load_torch_state(file).items():
                if k in location:
                    shapes[k], dtypes[k] = tuple(t.shape), t.dtype
    return shapes, dtypes


# ---------------------------------------------------------------------- loading

def load_hf(directory, dtype=None, device=None, attn_implementation: str = "sdpa",
            model_cls=None) -> LlamaForCausalLM:
    """Load an HF folder. dtype: a torch dtype or its name, "auto" (the checkpoint's), or None
    (float32). device: where the weights go (default CPU)."""
    directory = Path(directory)
    config = LlamaConfig.from_pretrained(directory)
    # "auto" and config.json names no dtype: the checkpoint tensors' own, as transformers does.
    auto_from_tensors = isinstance(dtype, str) and dtype == "auto" and not config.torch_dtype
    dtype = resolve_dtype(dtype, config)  # a bad argument fails before any weight file is opened
    check_header_sizes(directory, config)
    location = {k: f for k, f in weight_files(directory).items() if not k.endswith(DROPPED_SUFFIXES)}
    shapes, dtypes = _shapes_and_dtypes(location)
    not_float = sorted((k for k, d in dtypes.items() if not (isinstance(d, torch.dtype) and d.is_floating_point)),
                       key=natural_key)
    if not_float:  # an int or bool weight cast to float would load as nonsense without a word
        named = [f"{k} ({str(dtypes[k]).removeprefix('torch.')})" for k in not_float]
        raise CheckpointError(f"{directory}: weights must be floating point (F32, F16, BF16, F64); these are not: "
                              f"{list_names(named)}")
    if auto_from_tensors:
        dtype = next((d for d in dtypes.values() if d is not None and d.is_floating_point), dtype)
    if "lm_head.weight" not in shapes and not config.tie_word_embeddings:
        config.tie_word_embeddings = True  # no separate output matrix: the embeddings serve as it

    model, expected = empty_model(config, model_cls)
    if config.tie_word_embeddings and "lm_head.weight" in shapes:  # some exporters store the tied copy too
        location.pop("lm_head.weight"), shapes.pop("lm_head.weight")
    check_names_and_shapes(directory, expected, shapes)

    where = device_of(device)
    for file in sorted(set(location.values())):
        for name, tensor in read_file(file).items():
            if name in expected:
                if not bool(torch.isfinite(tensor.sum(dtype=torch.float64))):  # NaN/Inf give NaN logits; no copy
                    raise CheckpointError(f"{file}: tensor {name!r} holds NaN or infinite values")
                assign(model, name, tensor.to(device=where(name), dtype=dtype))
    return finish(model, dtype, attn_implementation)


def read_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix != ".safetensors":
        return load_torch_state(file)
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read tensor data (truncated or corrupt?): {e}") from None


def is_quantized_checkpoint(directory) -> bool:
    """Whether `directory` holds a camelid quantized model (config.json's quantization_config has
    quant_method "camelid"; camelid/load.py `save` writes it)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
        return config["quantization_config"]["quant_method"] == "camelid"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False


# ---------------------------------------------------------------------- saving

_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """5_000_000, "5GB", "500MiB" -> bytes (decimal units as transformers uses them)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = None if isinstance(size, (bool, int)) else re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*",
                                                               str(size).upper())
    if not m or int(float(m.group(1)) * _UNITS[m.group(2)]) < 1:
        raise ValueError(f"max_shard_size {size!r} is not a size such as 5GB, 500MB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def save_pretrained(model: LlamaForCausalLM, directory, max_shard_size="5GB") -> Path:
    """Write config.json and model.safetensors (or model-0000i-of-0000n.safetensors shards with
    model.safetensors.index.json) in the layout transformers.from_pretrained reads."""
    limit = parse_size(max_shard_size)
    directory = Path(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embeddings

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    n = len(shards)
    shard_files = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    config = LlamaConfig.from_dict(model.config.to_dict())
    config.torch_dtype = dtype_name(model.dtype)
    config.extra.setdefault("architectures", ["LlamaForCausalLM"])
    texts = {"config.json": json.dumps(config.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"}
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(shard_files, shards) for k in shard}}
        texts[SAFE_INDEX] = json.dumps(index, indent=2, sort_keys=True) + "\n"

    # Every file goes to a temp name first; only when all are written are they renamed into place,
    # so a save that fails (disk full, Ctrl-C) leaves the folder as it was, with no temp files.
    created = make_dir(directory)
    # Temps a killed save left (of any file a save writes here: the shard names change with the count).
    remove_stale_temps(directory, [SAFE_SINGLE, SAFE_INDEX, "config.json"], pattern=_SHARD_RE)
    pending: list[tuple[Path, Path]] = []
    try:
        for name, shard in zip(shard_files, shards):
            tmp = temp_path(directory / name)
            pending.append((tmp, directory / name))
            save_file({k: v.cpu() for k, v in shard.items()}, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, new_file_mode())  # safetensors creates its files 0600
            _fsync_file(tmp)
        for name, text in texts.items():
            tmp = temp_path(directory / name)
            pending.append((tmp, directory / name))
            with open(tmp, "x", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        while pending:  # shards, then config.json, then the index that points at the shards
            tmp, final = pending[0]
            if final.name == "config.json" and n == 1:
                # An old index outranks the new single file; it goes once that file is in place
                # (until then it still describes the old shards, which are all still there).
                (directory / SAFE_INDEX).unlink(missing_ok=True)
            os.replace(tmp, final)
            pending.pop(0)
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        remove_if_empty(directory, created)
        raise
    # Remove what an earlier save left that would now mislead a loader.
    for stale in directory.iterdir():
        if stale.name not in shard_files and (_SHARD_RE.match(stale.name) or stale.name == SAFE_SINGLE):
            stale.unlink()
    fsync_dir(directory)
    return directory


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
