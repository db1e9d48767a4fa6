"""What every checkpoint loader shares: dtype arguments, the name/shape check, and building the
model on the meta device and assigning checkpoint tensors into it without extra copies."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from camelid.core.accounting import parameter_count
from camelid.core.config import LlamaConfig
from camelid.core.model import LlamaForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint's files or tensors do not match its config. The message names them."""


class NameMap:
    """One format's tensor names <-> the Hugging Face names, from one plain table (torchtune's
    convert_weights.py style): {"blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    ...}, {i} the layer number. Both directions come from the same table, so they cannot disagree."""

    def __init__(self, table: dict[str, str]):
        self.table = table
        compile_ = lambda t: re.compile("^" + re.escape(t).replace(r"\{i\}", r"(\d+)") + "$")  # noqa: E731
        self._to_hf = [(compile_(ours), hf) for ours, hf in table.items()]
        self._from_hf = [(compile_(hf), ours) for ours, hf in table.items()]

    @staticmethod
    def _lookup(patterns, name: str) -> str | None:
        for pattern, template in patterns:
            m = pattern.match(name)
            if m:
                return template.format(i=m.group(1)) if m.groups() else template
        return None

    def to_hf(self, name: str) -> str | None:
        return self._lookup(self._to_hf, name)

    def from_hf(self, name: str) -> str | None:
        return self._lookup(self._from_hf, name)


def resolve_dtype(dtype, config: LlamaConfig) -> torch.dtype:
    """None -> float32; "auto" -> the config's torch_dtype; a name or a floating torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype == "auto":
        return DTYPES.get(config.torch_dtype or "float32", torch.float32)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def device_of(device):
    """tensor name -> torch.device: one device for all (None: the CPU), or a per-name function
    (camelid.transforms.placement.placer, for device_map)."""
    if callable(device):
        return device
    d = torch.device(device or "cpu")
    return lambda name: d


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def list_names(items: list[str], most: int = 12) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def load_torch_state(file: Path) -> dict[str, torch.Tensor]:
    """A .bin/.pth state dict through torch.load(weights_only=True) only: a pickle can run
    arbitrary code, and weights_only refuses anything but tensors and plain containers. Zip-format
    files (torch >= 1.6) are memory-mapped, so only the tensors touched are paged in."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as e:  # torch raises several types for corrupt, legacy or unsafe pickles
        raise CheckpointError(f"{file}: cannot be read as a weights-only PyTorch checkpoint: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{file}: not a state dict (expected a mapping of tensor names to tensors, "
                              f"got {type(state).__name__})")
    return state


def natural_key(name: str):
    """Sort "layers.2" before "layers.10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_names_and_shapes(source, expected: dict, found: dict, against: str = "its config.json") -> None:
    """One error listing every missing, unexpected and misshapen tensor, in natural order."""
    missing = sorted(set(expected) - set(found), key=natural_key)
    unexpected = sorted(set(found) - set(expected), key=natural_key)
    misshapen = sorted((f"{k} {found[k]} (expected {expected[k]})" for k in set(expected) & set(found)
                        if found[k] != expected[k]), key=natural_key)
    problems = []
    if missing:
        problems.append(f"missing tensors: {list_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {list_names(unexpected)}")
    if misshapen:
        problems.append(f"tensors with the wrong shape: {list_names(misshapen)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match {against}; " + "; ".join(problems))


class SkipInit(torch.overrides.TorchFunctionMode):
    """Skip the random init that nn.Linear / nn.Embedding run in their constructors on meta tensors.

    It computes nothing there, but torch's meta kernel for normal_ imports sympy and torch._dynamo
    on first use: ~75 MB of resident memory and 1-3 s, more than a small model's weights."""

    _OPS = {"normal_", "uniform_", "zero_", "fill_", "constant_", "ones_", "zeros_", "trunc_normal_",
            "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self._OPS:
            # Tensor.normal_(t, ...) passes the tensor first; torch.nn.init.normal_ as tensor=t.
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


MIN_BYTES_PER_PARAMETER = 0.5  # 4-bit weights: the least any loader keeps per parameter


def machine_bytes() -> int:
    """Memory this process could put weights in: the RAM, plus every CUDA device's."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        if torch.cuda.is_available():
            total += sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    except (AssertionError, RuntimeError):  # a CPU-only torch, or GPUs that cannot be queried: the RAM alone
        pass
    return total


def check_fits(config: LlamaConfig) -> None:
    """Refuse, before anything is built, a config whose weights cannot fit this machine even at 4
    bits a parameter (a 300-byte config.json or a small GGUF can ask for 10^8 layers: building
    that on the meta device alone would run for hours). Arithmetic on the config, no allocation."""
    params = parameter_count(config)
    need, have = params * MIN_BYTES_PER_PARAMETER, machine_bytes()
    if need > have:
        raise CheckpointError(
            f"the config asks for {params:,} parameters (num_hidden_layers="
            f"{config.num_hidden_layers}, hidden_size={config.hidden_size}, intermediate_size="
            f"{config.intermediate_size}, vocab_size={config.vocab_size}): at least {need / 2**30:,.1f} GiB of "
            f"weights, more than this machine's {have / 2**30:,.1f} GiB of memory")


def empty_model(config: LlamaConfig, model_cls=None) -> tuple[LlamaForCausalLM, dict[str, tuple[int, ...]]]:
    """The model on the meta device (no memory, no init) and the tensors a checkpoint must supply:
    name -> shape, without lm_head.weight when it is tied to the embeddings. model_cls: the class
    to build (camelid.hf_compat's LlamaForCausalLM, or a subclass of the core one)."""
    check_fits(config)
    with torch.device("meta"), SkipInit():
        model = (model_cls or LlamaForCausalLM)(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    return model, expected


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of parameter `name` (no copy; load_state_dict per tensor would walk
    every module each time, quadratic in the model's size)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters[attr]
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix stored transposed in memory. F.linear multiplies by w.t(), which
    is then a contiguous row-major matrix: for one token at a time (decode) on CPU that GEMV reads
    the weights about 1.2x faster overall, and 1.6x faster for an lm_head larger than the cache
    (bench/generate.py). Values, shape and names are unchanged."""
    return w.t().contiguous().t() if w.ndim == 2 else w


def finish(model: LlamaForCausalLM, dtype: torch.dtype, attn_implementation: str) -> LlamaForCausalLM:
    """Re-tie lm_head (assignment replaced the embedding Parameter), record the dtype, eval mode."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.torch_dtype = dtype_name(dtype)
    return model.set_attn_implementation(attn_implementation).eval()
