"""Static graphs of the model for other runtimes: torch.export (.pt2) and ONNX.

One graph serves both the prefill (past length P = 0) and every decode step (T = 1), at any
batch size and length, with the KV cache as explicit inputs and outputs, named as
onnxruntime-genai and optimum name them:

    input_ids                  [B, T]          int64
    attention_mask             [B, P + T]      int64, 1 for real tokens, 0 for (left) padding
    past_key_values.{i}.key    [B, Hkv, P, D]  one key and one value per layer i (P may be 0)
    past_key_values.{i}.value  [B, Hkv, P, D]
 -> logits                     [B, T, V]
    present.{i}.key            [B, Hkv, P + T, D]  the past with this call's keys appended
    present.{i}.value          [B, Hkv, P + T, D]

    export(model, "model.onnx", format="onnx")       # or "model.pt2", format="torch-export"
    onnx_greedy("model.onnx", [[1, 415, 3437]], max_new_tokens=16)   # numpy + onnxruntime only

The graph is the model's own layers (model.py) driven without its Python control flow: where
LlamaModel.forward plans attention per row from the mask's values (batch invariance), the
export wrapper builds one [B, 1, T, P + T] boolean mask in the graph and concatenates the past
in a functional cache. Packed-document masks (values > 1) and dynamic RoPE (frequencies that
depend on the longest position) are not expressible this way and are refused.

Notation: B batch, T new tokens, P past tokens, S = P + T, Hkv key/value heads, D head_dim,
V vocab_size.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from camelid.core.masks import dense_plan
from camelid.core.model import LlamaForCausalLM
from camelid.core.rope import DYNAMIC_ROPE_TYPES, alibi_bias

FORMATS = ("torch-export", "onnx")
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: larger ONNX weights go to a .data file beside the .onnx


# ---------------------------------------------------------------------- the exported module

class PastKeyValues:
    """The functional cache LlamaAttention calls: update() appends this call's k, v to the past
    of the layer and keeps the result as that layer's present (no buffer is written in place)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past, self.present = past, []

    def update(self, layer, slots, k, v, kv_len):
        past_k, past_v = self.past[layer]  # (B, Hkv, P, D)
        k, v = torch.cat([past_k, k.to(past_k.dtype)], dim=2), torch.cat([past_v, v.to(past_v.dtype)], dim=2)
        self.present.append((k, v))  # (B, Hkv, P + T, D)
        return k, v


class CausalLMWithPast(nn.Module):
    """forward(input_ids, attention_mask, past_key_values) -> (logits, present), in shapes and
    tensors only, so torch.export traces one graph for every B, T and P."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        check_exportable(model)
        self.model = model

    def forward(self, input_ids, attention_mask, past_key_values):
        m = self.model.model
        T = input_ids.shape[1]
        P = past_key_values[0][0].shape[2]
        S = P + T
        slots = torch.arange(P, S, device=input_ids.device)  # (T,) the new tokens' cache slots
        keys = torch.arange(S, device=input_ids.device)  # (S,)
        # RoPE position = real tokens before it (left padding). Indexing by slots, not slicing
        # [:, P:], keeps the graph free of guards on T (a view's contiguity checks T != 1).
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, slots]  # (B, T)
        # Causal, real keys only, and each query its own slot: a padding query would otherwise see
        # no key at all, and a softmax over nothing is NaN in an exported graph wherever the mask
        # is a float bias (ALiBi): NaN hidden states at padding slots, then NaN keys and values
        # that real queries weigh by 0 (0 x NaN = NaN). A real query's own slot is a real key, so
        # this changes nothing it computes; what a padding query computes is never read.
        own = keys[None] == slots[:, None]  # (T, S)
        mask = (((keys[None] <= slots[:, None]) & attention_mask.bool()[:, None, :]) | own)[:, None]  # (B, 1, T, S)
        if m.alibi_slopes is not None:
            mask = alibi_bias(m.alibi_slopes, slots, S).masked_fill(~mask, float("-inf"))  # (B, H, T, S)

        cache = PastKeyValues(past_key_values)
        x, _ = m.run(m.embed_tokens(input_ids), positions, dense_plan(mask), cache, slots, S)  # (B, T, C)
        return self.model.lm_head(x), cache.present  # (B, T, V), L x ((B, Hkv, S, D), (B, Hkv, S, D))


def check_exportable(model) -> None:
    """ValueError naming what the static graph cannot hold."""
    from camelid.transforms.lora import lora_layers
    from camelid.transforms.packed import is_packed
    from camelid.transforms.quantize import is_quantized

    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"export takes a camelid LlamaForCausalLM, got {type(model).__name__}")
    if is_packed(model):
        raise ValueError("the model's linears are packed for CPU inference (oneDNN ops no exporter knows): "
                         "load it with from_pretrained(..., pack=False) or call camelid.transforms.packed.unpack(model)")
    if is_quantized(model):
        raise ValueError("quantized models cannot be exported yet: export the float model "
                         "(from_pretrained without load_in_8bit/load_in_4bit)")
    if lora_layers(model):
        raise ValueError("the model holds LoRA adapters: fold them in first with camelid.transforms.lora.merge_and_unload(model)")
    if model.config.rope_type in DYNAMIC_ROPE_TYPES:
        raise ValueError(f"rope_type {model.config.rope_type!r} computes its frequencies from the longest "
                         f"position of each call, which a static graph cannot express")


# ---------------------------------------------------------------------- names, shapes, examples

def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(num_layers)
                                              for kv in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def example_inputs(model: LlamaForCausalLM, batch: int = 2, seq: int = 3, past: int = 2):
    """Inputs to trace with. Sizes 0 and 1 would be specialized by torch.export, so the example
    uses 2+; the dynamic dimensions still admit batch 1, T = 1 and P = 0."""
    c, device = model.config, model.device
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    kv = lambda: torch.zeros(batch, c.num_key_value_heads, past, c.head_dim, dtype=model.dtype, device=device)
    return ids, mask, [(kv(), kv()) for _ in range(c.num_hidden_layers)]


def dynamic_shapes(num_layers: int) -> dict:
    Dim = torch.export.Dim
    batch, seq, past = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0)
    # The mask's length is P + T; torch.export derives that relation from the graph itself.
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim("total", min=1)},
            "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(num_layers)]}


def export_program(model: LlamaForCausalLM) -> torch.export.ExportedProgram:
    """The model as a torch.export program; `.module()(input_ids, attention_mask, past_key_values)`
    with past_key_values a list of (key, value) per layer returns (logits, present)."""
    wrapper = CausalLMWithPast(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, example_inputs(model),
                                       dynamic_shapes=dynamic_shapes(model.config.num_hidden_layers))
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------- writing files

def export(model: LlamaForCausalLM, out, format: str = "onnx") -> Path:
    """Write the model's graph to `out`: a .pt2 file (format="torch-export"; torch.export.load
    reads it) or an .onnx file (format="onnx"; weights beyond 2 GB go to `out`.data beside it).
    Files appear complete or not at all."""
    check_output(out, format)  # before minutes of tracing
    return save_program(export_program(model), out, format)


def check_output(out, format: str) -> Path:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ValueError(f"output path {str(out)!r}: the folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise ValueError(f"output path {str(out)!r} is a folder; give a file name")
    return out


def save_program(program: torch.export.ExportedProgram, out, format: str = "onnx") -> Path:
    """Write a program from export_program in `format` (one trace can be written in both)."""
    out = check_output(out, format)
    # Everything is written into a hidden folder beside `out`, then renamed into place (the
    # .onnx last, so it never points at weights that are not there yet).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if format == "torch-export":
            torch.export.save(program, tmp / out.name)
        else:
            _save_onnx(program, tmp / out.name)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == out.name):
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    if importlib.util.find_spec("onnxscript") is None:  # torch.onnx's exporter translates through it
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'camelid[export]'")
    L = (len(program.graph_signature.user_inputs) - 2) // 2  # input_ids, attention_mask, then 2 per layer
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=input_names(L),
                                     output_names=output_names(L), verbose=False)
    nbytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    onnx_program.save(str(path), external_data=nbytes > EXTERNAL_DATA_BYTES)


# ---------------------------------------------------------------------- running the ONNX file

def onnx_greedy(onnx_path, input_ids, attention_mask=None, max_new_tokens=16, eos_token_ids=(), pad_token_id=0):
    """Greedy decoding from an exported .onnx file with numpy and onnxruntime only (no torch, no
    camelid: this function can be copied out as it is). input_ids: [B, T] ids, left-padded where
    attention_mask [B, T] has 0s. Returns [B, T + n] int64 ids; rows that emitted an EOS id are
    padded with pad_token_id after it, and decoding stops when every row has (as model.generate)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_len] with a non-empty prompt, got {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
    B = ids.shape[0]
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(past_inputs[0].type)
    if dtype is None:
        raise ValueError(f"onnx_greedy runs float32 and float16 graphs; this one's cache is {past_inputs[0].type}")
    # The prefill starts from an empty past: [B, Hkv, 0, D], Hkv and D read from the graph's inputs.
    feed = {i.name: np.zeros((B, i.shape[1], 0, i.shape[3]), dtype=dtype) for i in past_inputs}
    # Each output present.{i}.key is the next step's input past_key_values.{i}.key.
    present_names = [o.name.replace("present.", "past_key_values.", 1) for o in session.get_outputs()[1:]]
    out, step_ids = [ids], ids
    finished = np.zeros(B, dtype=bool)
    for _ in range(max_new_tokens):
        feed.update(input_ids=step_ids, attention_mask=mask)
        logits, *present = session.run(None, feed)  # logits [B, T, V]
        next_ids = logits[:, -1].argmax(-1)  # [B]
        next_ids = np.where(finished, pad_token_id, next_ids)
        finished |= np.isin(next_ids, list(eos_token_ids))
        out.append(next_ids[:, None])
        if finished.all():
            break
        feed.update(zip(present_names, present))
        step_ids = next_ids[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
    return np.concatenate(out, axis=1)
