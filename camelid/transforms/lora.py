"""LoRA (Hu et al. 2021) as a model -> model transform: wrap chosen linear layers, train only the adapters.

    model = apply_lora(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    print_trainable_parameters(model)     # trainable params: 0.46M || all params: 135M || trainable%: 0.34
    save_adapter(model, "adapter/")       # PEFT layout: adapter_config.json + adapter_model.safetensors
    model = load_adapter(base, "adapter/")  # an adapter camelid or peft saved
    model = merge_and_unload(model)       # plain linear layers with W + s B A folded in

Each wrapped layer computes

    y = base(x) + s * B(A(dropout(x)))        A: (r, K) random,  B: (N, r) zeros,  s = alpha / r
                                                                    (alpha / sqrt(r) with use_rslora)
        x (.., K) --A--> (.., r) --B--> (.., N)

so a fresh adapter changes nothing until B has been trained. The base may be float or quantized
(camelid.transforms.quantize: int8 / int4 / nf4 = QLoRA): quantized layers dequantize on the fly when a
gradient has to flow through them to earlier adapters.

Names: the wrapper keeps the base layer's checkpoint keys (q_proj.weight stays q_proj.weight)
and adds q_proj.lora_A.weight / q_proj.lora_B.weight, the keys PEFT writes (without its adapter
name), so adapters go both ways between camelid and peft.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from camelid.atomic import fsync_dir, make_dir, new_file_mode, remove_if_empty, temp_path

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the transformers model under this prefix


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        dtype = getattr(base, "dtype", None) or base.weight.dtype
        device = base.device if hasattr(base, "device") else base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear (and peft) initialise
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.register_load_state_dict_pre_hook(_base_keys)

    @property
    def weight(self):
        """The base's weight: the state dict names it q_proj.weight, and torch.distributed.checkpoint
        finds a state-dict key by walking attributes."""
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """s * B @ A, the update to the base weight: (N, K)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))).to(y.dtype) * self.scaling

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The base's tensors under this layer's own name (q_proj.weight), then lora_A/lora_B."""
        self.base._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("lora_A", "lora_B"):
            w = getattr(self, name).weight
            destination[f"{prefix}{name}.weight"] = w if keep_vars else w.detach()

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False, **kwargs):
        destination = {} if destination is None else destination
        self._save_to_state_dict(destination, prefix, keep_vars)
        return destination

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _base_keys(module, state_dict, prefix, *args):
    """Loading: the base's tensors arrive under the layer's own name (q_proj.weight); they belong
    to q_proj.base.weight, where the default loader looks for them."""
    for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        state_dict[f"{prefix}base.{key[len(prefix):]}"] = state_dict.pop(key)


# ---------------------------------------------------------------------- the transform

def _float_base(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _linear_like(module: nn.Module) -> bool:
    from camelid.transforms.quantize import QuantizedLinear

    return _float_base(module) or isinstance(module, QuantizedLinear)


def _prepare(model: nn.Module) -> nn.Module:
    """Separate q/k/v and gate/up products and dense weights, so every named layer can be wrapped."""
    from camelid.transforms.fuse import is_fused, unfuse
    from camelid.transforms.packed import is_packed, unpack

    if is_packed(model):
        unpack(model)
    if is_fused(model):
        unfuse(model)
    return model


def target_layers(model: nn.Module, target_modules="all-linear") -> dict[str, nn.Module]:
    """The layers `target_modules` names, as peft matches them: a list of names each matching a
    layer whose dotted name ends with it ("q_proj", "layers.0.self_attn.q_proj"), a string taken
    as a regular expression over the whole name, or "all-linear" (every linear layer but lm_head).
    A list entry that matches no layer is an error that lists the layer names there are."""
    from camelid.transforms.quantize import QuantizedEmbedding

    tables = {f"{name}.table" for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}
    linears = {name: m for name, m in model.named_modules() if name and _linear_like(m) and name not in tables}
    if target_modules == "all-linear":
        return {n: m for n, m in linears.items() if n.rsplit(".", 1)[-1] != "lm_head"}
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a regular expression: {e}") from None
        found = {n: m for n, m in linears.items() if pattern.fullmatch(n)}
        if not found:
            raise ValueError(f"target_modules {target_modules!r} matches no linear layer of the model")
        return found
    targets = list(target_modules or [])
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be 'all-linear', a regular expression or a list of layer names, "
                         f"got {target_modules!r}")
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"target module(s) {', '.join(map(repr, missing))} match no linear layer of the model; "
                         f"its linear layers are named {', '.join(kinds)}")
    return {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in targets)}


def apply_lora(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
               target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora: bool = False) -> nn.Module:
    """Wrap the target layers in LoRALinear, in place, and freeze everything else; returns the model.
    r, alpha and dropout are checked before anything changes; target names are checked after
    fused/packed layers are separated (which changes no output)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0 \
            or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_and_unload it first or load a fresh model")
    _prepare(model)
    layers = target_layers(model, list(target_modules) if isinstance(target_modules, tuple) else target_modules)
    model.requires_grad_(False)
    for name, layer in layers.items():
        parent, _, attr = name.rpartition(".")
        wrapped = LoRALinear(layer, r, lora_alpha, lora_dropout, use_rslora).train(model.training)  # eval stays eval
        setattr(model.get_submodule(parent), attr, wrapped)
    model.lora_config = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": float(lora_dropout),
                         "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "use_rslora": use_rslora}
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only, under the model's names (model.layers.0.self_attn.q_proj.lora_A.weight)."""
    return {f"{name}.{ab}.weight": getattr(m, ab).weight.detach()
            for name, m in lora_layers(model).items() for ab in ("lora_A", "lora_B")}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a tied weight counts once, quantized bases by their elements."""
    params = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    frozen = sum(p.numel() for p in params.values() if not p.requires_grad)
    from camelid.transforms.quantize import QuantizedLinear

    frozen += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return trainable, trainable + frozen


def print_trainable_parameters(model: nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line


# ---------------------------------------------------------------------- merge

def _shared(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (a tied lm_head and embedding)."""
    seen, shared = set(), set()
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                (shared if id(p) in seen else seen).add(id(p))
    return shared


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its float base weight (W += s B A), in place; unmerge() undoes it."""
    shared = _shared(model)
    for name, m in lora_layers(model).items():
        if not _float_base(m.base):
            raise ValueError(f"{name} has a quantized base; merge_and_unload() gives a float layer instead")
        if id(m.base.weight) in shared:
            raise ValueError(f"{name} shares its weight (tied embeddings): merging in place would change the "
                             f"embeddings too; merge_and_unload() unties it instead")
    with torch.no_grad():
        for m in lora_layers(model).values():
            if not m.merged:
                m.base.weight += m.delta().to(m.base.weight.dtype)
                m.merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in lora_layers(model).values():
            if m.merged:
                m.base.weight -= m.delta().to(m.base.weight.dtype)
                m.merged = False
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Every LoRALinear replaced by a plain nn.Linear holding W + s B A, in place; a quantized base
    is dequantized first (to the model's activation dtype), so the result is a float model."""
    shared = _shared(model)
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            base = m.base
            if name.rsplit(".", 1)[-1] == "lm_head" and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                model.config.tie_word_embeddings = False  # the merged lm_head is no longer the embedding table
            if _float_base(base) and m.merged and id(base.weight) in shared:
                raise ValueError(f"{name}: merged in place into a tied weight")
            if _float_base(base):
                w = base.weight if m.merged else base.weight + m.delta().to(base.weight.dtype)
                dtype = base.weight.dtype
            else:
                dtype = base.dtype
                w = base.dequantize(torch.float32) + m.delta().float()
            layer = nn.Linear(m.in_features, m.out_features, bias=base.bias is not None, device=w.device, dtype=dtype)
            layer.weight.copy_(w)
            if base.bias is not None:
                layer.bias.copy_(base.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.requires_grad_(False))
    if hasattr(model, "lora_config"):
        del model.lora_config
    if hasattr(model, "quantization_config"):
        from camelid.transforms.quantize import is_quantized, quantization_summary

        if is_quantized(model):
            model.quantization_config = quantization_summary(model)
        else:
            del model.quantization_config
    return model


# ---------------------------------------------------------------------- PEFT files

def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json as peft writes it for a LoRA on a causal LM."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA adapters (apply_lora or load_adapter first)")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
            "lora_dropout": cfg["lora_dropout"], "target_modules": cfg["target_modules"], "bias": "none",
            "fan_in_fan_out": False, "use_rslora": cfg["use_rslora"], "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
            "base_model_name_or_path": base_model_name_or_path}


def save_adapter(model: nn.Module, directory, base_model_name_or_path: str | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors (peft's keys), each written to a temp file
    and renamed into place only when both are complete."""
    directory = Path(directory)
    config = adapter_config(model, base_model_name_or_path)
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    created = make_dir(directory)
    pending = []
    try:
        tmp = temp_path(directory / ADAPTER_WEIGHTS)
        pending.append((tmp, directory / ADAPTER_WEIGHTS))
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp_cfg = temp_path(directory / ADAPTER_CONFIG)
        pending.append((tmp_cfg, directory / ADAPTER_CONFIG))
        with open(tmp_cfg, "x", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for tmp, _ in pending:
            os.chmod(tmp, new_file_mode())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        while pending:
            os.replace(*pending[0])
            pending.pop(0)
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        remove_if_empty(directory, created)
        raise
    fsync_dir(directory)
    return directory


def read_adapter_config(directory) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (a LoRA adapter folder holds {ADAPTER_CONFIG} "
                                f"and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter config (peft_type {config.get('peft_type')!r})"
                         if isinstance(config, dict) else f"{path}: not a JSON object")
    unsupported = {k: config[k] for k in ("use_dora", "fan_in_fan_out", "layers_to_transform", "rank_pattern",
                                          "alpha_pattern", "modules_to_save", "lora_bias", "exclude_modules",
                                          "layer_replication", "use_qalora", "trainable_token_indices",
                                          "target_parameters") if config.get(k)}
    if unsupported or config.get("bias", "none") != "none":
        raise ValueError(f"{path}: unsupported LoRA options {unsupported or {'bias': config.get('bias')}}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{path}: missing field {key!r}")
    return config


def adapter_tensors(directory) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's names (peft's prefix and adapter name removed)."""
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(Path(directory) / ADAPTER_WEIGHTS)).items()}
    return {re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k): v for k, v in tensors.items()}  # peft in memory


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Attach the adapter in `directory` (saved by camelid or peft) to `model`, in place. Every
    adapter tensor must find its layer with the right shape, and every wrapped layer its tensors."""
    directory = Path(directory)
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; load the adapter onto a fresh base model")
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing")
    tensors = adapter_tensors(directory)
    r = config["r"]
    layers = target_layers(_prepare(model), config["target_modules"])
    expected = {f"{n}.{ab}.weight": (r, m.in_features) if ab == "lora_A" else (m.out_features, r)
                for n, m in layers.items() for ab in ("lora_A", "lora_B")}
    unexpected, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise ValueError(f"{weights}: adapter does not fit the model: "
                         + "; ".join(f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                                     for what, keys in (("unexpected", unexpected), ("missing", missing)) if keys))
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{weights}: {key} has shape {tuple(tensors[key].shape)}, the model needs {shape} "
                             f"(an adapter of another rank or base model?)")
    apply_lora(model, r=r, lora_alpha=config["lora_alpha"], lora_dropout=config.get("lora_dropout", 0.0),
               target_modules=config["target_modules"], use_rslora=bool(config.get("use_rslora", False)))
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            for ab in ("lora_A", "lora_B"):
                getattr(m, ab).weight.copy_(tensors[f"{name}.{ab}.weight"])
    return model
