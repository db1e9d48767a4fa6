"""Placing one model across several devices: device_map / max_memory, as transformers users write them.

    model = LlamaForCausalLM.from_pretrained(path, device_map="auto")                  # GPUs, then CPU
    model = LlamaForCausalLM.from_pretrained(path, device_map="auto", max_memory={0: "20GiB", "cpu": "64GiB"})
    model = LlamaForCausalLM.from_pretrained(path, device_map={"model.embed_tokens": 0, "model.layers.0": 0,
                                             ..., "model.norm": 1, "lm_head": 1})

Whole decoder layers are the unit (a layer is never split). The plan is made from the config on
the meta device, so a device that does not exist, a map that misses or invents a module, or a
max_memory too small for the model fails before any weight file is read; each tensor is then
loaded straight onto its device. Layers run where their weights are, one device after another
(pipeline placement, no parallelism); a hook on each placed module moves its inputs there, and
each layer's KV cache is allocated on its layer's device (cache.layer_devices). "cpu" in a map is
the last resort when the GPUs are full: those layers run on the CPU (no weight streaming).
"""

from __future__ import annotations

import dataclasses
import os
import re

import torch
from torch import nn

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
STRATEGIES = ("auto", "balanced", "sequential")


class PlacementError(ValueError):
    """A device_map or max_memory that cannot place this model; the message names the entry."""


# ---------------------------------------------------------------------- devices and budgets

def parse_memory(value, what: str = "max_memory") -> int:
    """Bytes from an int or a string such as "20GiB", "500MB", "1.5 GB"."""
    if isinstance(value, bool):
        raise PlacementError(f"{what}: {value!r} is not a memory size")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise PlacementError(f"{what}: {value!r} is not a memory size (e.g. 20GiB, 500MB, or bytes)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < 0:
        raise PlacementError(f"{what}: {value!r} is negative")
    return n


def device(value) -> torch.device:
    """A device this machine has, from an int (a CUDA index), "cpu", "cuda:1", or a torch.device."""
    if isinstance(value, bool):
        raise PlacementError(f"{value!r} is not a device")
    try:
        d = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, TypeError):
        raise PlacementError(f"{value!r} is not a device (use an int GPU index, 'cpu' or 'cuda:N')") from None
    if d.type == "cpu":
        return torch.device("cpu")
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if d.index is None else d.index
        if index >= n:
            raise PlacementError(f"device {value!r} does not exist: this machine has "
                                 f"{'no CUDA devices' if n == 0 else f'{n} CUDA device(s), cuda:0..cuda:{n - 1}'}")
        return torch.device("cuda", index)
    raise PlacementError(f"device {value!r} is not supported for placement (use 'cpu' or CUDA devices; "
                         f"'disk' offload is not supported)")


def _free_bytes(d: torch.device) -> int:
    if d.type == "cuda":
        return int(torch.cuda.mem_get_info(d)[0] * 0.9)  # leave room for activations and the KV cache
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(avail * 0.9)


def budgets(max_memory=None) -> dict[torch.device, int]:
    """Device -> bytes it may hold, in placement order (GPUs by index, then the CPU). Devices
    missing from a given max_memory get nothing; without max_memory, 90% of what is free."""
    if max_memory is None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [torch.device("cuda", i) for i in range(n)] + [torch.device("cpu")]
        return {d: _free_bytes(d) for d in devices}
    if not isinstance(max_memory, dict) or not max_memory:
        raise PlacementError(f"max_memory must be a dict such as {{0: '20GiB', 'cpu': '64GiB'}}, got {max_memory!r}")
    out = {}
    for key, value in max_memory.items():
        d = device(key)
        if d in out:
            raise PlacementError(f"max_memory names {d} twice")
        out[d] = parse_memory(value, f"max_memory[{key!r}]")
    return dict(sorted(out.items(), key=lambda kv: (kv[0].type == "cpu", kv[0].index or 0)))


# ---------------------------------------------------------------------- the plan

def units(model: nn.Module) -> dict[str, int]:
    """The placement units of a (meta) model in order, with their bytes: the embedding, each
    decoder layer, the final norm, the lm_head (0 bytes when tied: it shares the embedding)."""
    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))

    inner = model.model
    out = {"model.embed_tokens": nbytes(inner.embed_tokens)}
    out.update({f"model.layers.{i}": nbytes(layer) for i, layer in enumerate(inner.layers)})
    out["model.norm"] = nbytes(inner.norm)
    out["lm_head"] = 0 if model.config.tie_word_embeddings else nbytes(model.lm_head)
    return out


def infer_device_map(model: nn.Module, max_memory=None, strategy: str = "auto") -> dict[str, torch.device]:
    """Unit name -> device. "sequential" fills each device in order before the next; "auto" /
    "balanced" spreads the layers evenly over the GPUs (within each budget); anything left goes
    to the CPU. The first GPU also keeps the embedding (and a tied lm_head); the final norm and an
    untied lm_head go with the last layer."""
    if strategy not in STRATEGIES:
        raise PlacementError(f"device_map {strategy!r} is not one of {STRATEGIES} or a dict")
    sizes, room = units(model), budgets(max_memory)
    total = sum(sizes.values())
    if sum(room.values()) < total:
        given = ", ".join(f"{d}: {_gib(b)}" for d, b in room.items())
        raise PlacementError(f"max_memory is too small: the model needs {_gib(total)} of weights "
                             f"({model.config.torch_dtype or 'float32'}), the budgets give {given}")
    gpus = [d for d in room if d.type == "cuda"]
    if strategy in ("auto", "balanced") and len(gpus) > 1:
        share = -(-sum(sizes.values()) // len(gpus))  # an even share each, never more than the budget
        room = {d: (min(b, share + max(sizes.values())) if d.type == "cuda" else b) for d, b in room.items()}
    tied = model.config.tie_word_embeddings
    plan, devices, i = {}, list(room), 0
    left = dict(room)
    for name, size in sizes.items():
        if name == "lm_head" and tied:
            plan[name] = plan["model.embed_tokens"]  # one tensor: where the embedding is
            continue
        while i < len(devices) and left[devices[i]] < size:
            i += 1  # this device is full: the next one
        if i == len(devices):
            raise PlacementError(f"max_memory is too small: {name} ({_gib(size)}) fits on no device "
                                 f"after the units before it (budgets {', '.join(f'{d}: {_gib(b)}' for d, b in room.items())})")
        plan[name] = devices[i]
        left[devices[i]] -= size
    return plan


def check_device_map(model: nn.Module, device_map: dict) -> dict[str, torch.device]:
    """An explicit map (module name or prefix -> device) as unit -> device: every key must name a
    module, every unit must be covered, devices must exist, a tied lm_head must sit with the
    embedding."""
    if not isinstance(device_map, dict) or not device_map:
        raise PlacementError(f"device_map must be 'auto', 'balanced', 'sequential', a device, or a non-empty "
                             f"dict of module name -> device; got {device_map!r}")
    modules = dict(model.named_modules())
    mapped = {}
    for key, value in device_map.items():
        if not isinstance(key, str) or key not in modules:
            raise PlacementError(f"device_map names {key!r}, which is not a module of this model "
                                 f"(e.g. 'model.embed_tokens', 'model.layers.0', 'model.norm', 'lm_head')")
        mapped[key] = device(value)
    plan = {}
    for name in units(model):
        owner = max((k for k in mapped if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
        if owner is None:
            inside = sorted(k for k in mapped if k.startswith(name + "."))
            raise PlacementError(f"device_map does not place {name}" +
                                 (f" as a whole (a decoder layer is not split; it names {inside[0]})" if inside else ""))
        plan[name] = mapped[owner]
    for key in mapped:
        if not any(key == "" or n == key or n.startswith(key + ".") or key.startswith(n + ".") for n in plan):
            raise PlacementError(f"device_map names {key!r}, which is not a placeable module")
        if any(key.startswith(n + ".") for n in plan):
            raise PlacementError(f"device_map names {key!r} inside a unit that is placed whole "
                                 f"(the embedding, a decoder layer, the final norm or the lm_head)")
    if model.config.tie_word_embeddings and plan["lm_head"] != plan["model.embed_tokens"]:
        raise PlacementError(f"lm_head is tied to model.embed_tokens (one tensor): both must be on one device, "
                             f"got {plan['lm_head']} and {plan['model.embed_tokens']}")
    return plan


def plan_device_map(model: nn.Module, device_map, max_memory=None) -> dict[str, torch.device]:
    """The unit -> device plan for a (meta) model: from a strategy name, a single device, or a dict."""
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return infer_device_map(model, max_memory, device_map)
    if max_memory is not None:
        raise PlacementError("max_memory applies to device_map='auto' / 'balanced' / 'sequential'")
    if not isinstance(device_map, dict):
        return {name: device(device_map) for name in units(model)}
    return check_device_map(model, device_map)


def placer(plan: dict[str, torch.device]):
    """tensor name -> the device of the unit that holds it (for the checkpoint loaders)."""
    def where(name: str) -> torch.device:
        unit = name if name in plan else name.rsplit(".", 1)[0]
        while unit not in plan:
            unit = unit.rsplit(".", 1)[0]
        return plan[unit]
    return where


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------------- running across devices

def to_device(x, d: torch.device):
    """Tensors (inside tuples, lists and dataclasses such as core.masks.AttentionGroup) moved to `d`."""
    if isinstance(x, torch.Tensor):
        return x.to(d, non_blocking=True) if x.device != d else x
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, d) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: to_device(getattr(x, f.name), d) for f in dataclasses.fields(x)
                                         if f.init and isinstance(getattr(x, f.name), (torch.Tensor, tuple, list))})
    return x


def dispatch(model: nn.Module, plan: dict[str, torch.device], hooks: bool | None = None) -> nn.Module:
    """Move each unit to its device (a no-op for tensors loaded there) and make it take its inputs
    there. Logits come back on the device of the final norm (model.device). hooks: None installs
    the input-moving hooks only when the plan spans several devices."""
    if model.config.tie_word_embeddings:  # one tensor (a loader may tie what the config did not)
        plan = {**plan, "lm_head": plan["model.embed_tokens"]}
    model.device_map = {name: str(d) for name, d in plan.items()}
    if not (hooks or hooks is None and len(set(plan.values())) > 1):
        return model.to(next(iter(plan.values())))
    for name, d in plan.items():
        module = model.get_submodule(name)
        module.to(d)
        module.register_forward_pre_hook(lambda m, args, kwargs, d=d: (to_device(args, d), to_device(kwargs, d)),
                                         with_kwargs=True)
    out = plan["model.norm"]

    def logits_home(m, args, output):
        output.logits = output.logits.to(out)
        return output

    model.register_forward_hook(logits_home)
    return model
