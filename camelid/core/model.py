"""The Llama model: RMSNorm -> RoPE -> Attention -> MLP -> DecoderLayer -> LlamaModel -> LlamaForCausalLM.

Module and parameter names are the Hugging Face checkpoint keys, so an HF state dict loads as is.
No I/O, sampling, quantization or distributed code lives here: those are transforms and loaders
that take this model as input (camelid/transforms/, camelid/formats/, composed by camelid/load.py);
camelid/hf_compat.py adds transformers' from_pretrained / generate / save_pretrained on top.

Notation: B batch, T query tokens in this call, S key/value slots (past + current),
H query heads, Hkv key/value heads, G = H // Hkv query heads per KV head, D head_dim,
C hidden_size, V vocab_size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from camelid.core.cache import KVCache, PagedView
from camelid.core.config import LlamaConfig
from camelid.core.masks import attention_plan, positions_from_mask
from camelid.core.rope import DYNAMIC_ROPE_TYPES, alibi_slopes, apply_rope, rope_cos_sin, rope_inv_freq

FUSED_QUERIES = 16  # new tokens per row up to which a step runs the fused decode layers
ACT_FNS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------- RMSNorm

class LlamaRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, with the statistics in float32 whatever the dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------- rotary embedding

class LlamaRotaryEmbedding(nn.Module):
    """Turns positions [B, T] into cos/sin [B, T, D] using the config's rope_type (see rope.py)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.dynamic = config.rope_type in DYNAMIC_ROPE_TYPES
        with torch.device("cpu"):  # real values even when the model is built on the meta device
            inv_freq, self.attention_scale = rope_inv_freq(config)
        # Not a buffer: model.to(bfloat16) must not round the frequencies.
        self._inv_freq = {inv_freq.device: inv_freq}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = next(iter(self._inv_freq.values())).to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        if self.dynamic:  # frequencies depend on the longest position in this call
            with torch.device("cpu"):
                inv_freq, scale = rope_inv_freq(self.config, seq_len=int(position_ids.max()) + 1)
            inv_freq = inv_freq.to(position_ids.device)
        else:
            inv_freq, scale = self.inv_freq(position_ids.device), self.attention_scale
        return rope_cos_sin(inv_freq, position_ids, scale, dtype)


# ---------------------------------------------------------------------- attention

def eager_attention(q, k, v, mask, is_causal, scale, dropout):
    """Reference attention. GQA without copying K/V: the G query heads that share a KV head are
    folded into the query-length axis, so one batched matmul serves the whole group.

        q (B, Hkv*G, T, D) -> (B, Hkv, G*T, D)  @  k^T (B, Hkv, D, S)  ->  (B, Hkv, G*T, S)
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    scores = (q.reshape(B, Hkv, G * T, D) @ k.transpose(-1, -2)).view(B, H, T, S).float() * scale
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = F.dropout(scores.softmax(-1), p=dropout, training=dropout > 0).to(v.dtype)
    return (probs.view(B, Hkv, G * T, S) @ v).view(B, H, T, D)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        C, H, Hkv, D, bias = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(C, H * D, bias=bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, C, bias=bias)
        self.qkv_proj = None  # q/k/v in one product, when camelid.transforms.fuse has fused them

    def project(self, x):
        """q (B, H, T, D), k and v (B, Hkv, T, D) of x (B, T, C)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x) if self.qkv_proj is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        return (q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2),
                k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2),
                v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2))

    def forward(self, x, rope, groups, cache=None, slots=None, kv_len=None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, slots, k, v, kv_len)  # (B, Hkv, S, D)
        if len(groups) == 1 and groups[0].whole:
            y = self.attend(q, k, v, groups[0].mask, groups[0].is_causal)
        else:  # each group on its own keys; queries that are padding stay 0 and are never read
            y = torch.zeros_like(q)
            for g in groups:
                qs, ks = slice(g.query_start, g.query_end), slice(g.key_start, g.key_end)
                y[g.rows, :, qs] = self.attend(q[g.rows, :, qs], k[g.rows, :, ks], v[g.rows, :, ks], g.mask, g.is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D) -> (B, T, C)

    def attend(self, q, k, v, mask, is_causal):
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # an additive (ALiBi) mask in the activations' dtype
        dropout = self.attention_dropout if self.training else 0.0
        if self.attn_implementation == "eager":
            return eager_attention(q, k, v, mask, is_causal, self.scale, dropout)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                              scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)


# ---------------------------------------------------------------------- MLP

class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=bias)
        self.up_proj = nn.Linear(C, I, bias=bias)
        self.down_proj = nn.Linear(I, C, bias=bias)
        self.act_fn = ACT_FNS[config.hidden_act]
        self.gate_up_proj = None  # gate and up in one product, when camelid.transforms.fuse has fused them

    def forward(self, x):
        gate, up = self.gate_up_proj(x) if self.gate_up_proj is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act_fn(gate) * up)


# ---------------------------------------------------------------------- decoder layer

class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, groups, cache=None, slots=None, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, groups, cache, slots, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------- the model

class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = None if config.alibi else LlamaRotaryEmbedding(config)
        self.alibi_slopes = alibi_slopes(config.num_attention_heads) if config.alibi else None
        self.gradient_checkpointing = False
        self.fused_decode = None  # every layer of a decode step in one native call (camelid.transforms.native)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                cache: KVCache | None = None, cache_position=None, output_hidden_states=False):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        x = inputs_embeds.to(self.norm.weight.dtype)  # the compute dtype (bfloat16 tables, float32 math)
        B, T, _ = x.shape
        if cache_position is None:
            cache_position = torch.arange(T, device=x.device)
        kv_len = int(cache_position[-1]) + 1 if cache is not None else T
        if cache is not None and (kv_len > cache.max_seq_len or B != cache.batch_size):
            raise ValueError(f"KV cache of batch {cache.batch_size} x {cache.max_seq_len} slots cannot hold "
                             f"batch {B} up to slot {kv_len}")
        if cache is None and cache_position.shape[0] != kv_len:
            raise ValueError("cache_position must be 0..T-1 when no KV cache is given")
        if attention_mask is not None and attention_mask.shape != (B, attention_mask.shape[1]) or \
                attention_mask is not None and attention_mask.shape[1] < kv_len:
            raise ValueError(f"attention_mask must be [batch, >= {kv_len}], got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = (positions_from_mask(attention_mask, cache_position) if attention_mask is not None
                            else cache_position[None].expand(B, T))

        plan = attention_plan(attention_mask, cache_position, kv_len, B, self.alibi_slopes, split_rows=not self.training)
        return self.run(x, position_ids, plan, cache, cache_position, kv_len, output_hidden_states=output_hidden_states)

    def run(self, x, position_ids, plan, cache=None, slots=None, kv_len=None, rope=None, output_hidden_states=False):
        """The one decoder-layer loop, tensors in and out: embeddings x (B, T, C) at RoPE positions
        (B, T), attending as `plan` says (core/masks.py), writing K/V at cache `slots` of the first
        `kv_len`. `forward`, speculative verification, export and the engine all come through here.
        rope: precomputed (cos, sin) instead of the positions' own (speculative decoding computes
        them one position at a time, as decode steps do). Returns the final-normed hidden states
        and, with output_hidden_states, every layer's input plus that final state."""
        if rope is None and self.rotary_emb is not None:
            rope = self.rotary_emb(position_ids, x.dtype)
        key_start = None if output_hidden_states else self._fused_decode_rows(x, plan, cache, slots, kv_len, rope)
        if key_start is not None:  # a decode step, every layer one native call
            B, T, C = x.shape  # float32 inside (a bfloat16 model's weights, cache and output stay bfloat16)
            cos, sin = (t.expand(B, T, -1).reshape(B * T, -1).float().contiguous() for t in rope)
            h = self.fused_decode(x.reshape(B * T, C).float().contiguous(), cache, slots.to(torch.long), key_start,
                                  cos, sin)
            return self.norm(h.view(B, T, C).to(x.dtype)), None
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                if cache is not None:
                    raise ValueError("gradient checkpointing is for training; it cannot fill a KV cache")
                x = checkpoint(layer, x, rope, plan, use_reentrant=False)
            else:
                x = layer(x, rope, plan, cache, slots, kv_len)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.norm(x)
        if output_hidden_states:  # as transformers: the last entry is the final-normed state the lm_head reads
            hidden_states[-1] = x
        return x, (tuple(hidden_states) if output_hidden_states else None)


    def _fused_decode_rows(self, x, plan, cache, slots, kv_len, rope):
        """The first key slot of each row when this call can run the layers' fused decode steps
        (at most FUSED_QUERIES new tokens per row at the last slots, float32 or bfloat16 on CPU, a
        plain KVCache of that dtype or float16, every query attending causally to its own row's keys, no
        gradient), else
        None: the PyTorch layers run. A prompt's prefill (slot 0 on) always runs them, whatever its
        length and wherever its slots start (the engine prefills a joining prompt at the current slot), so
        a prompt alone, in a batch and joining a running engine is prefilled by the same code."""
        if self.fused_decode is None or torch.compiler.is_compiling():
            return None  # decided before any shape is read: tracing must not guard on T
        routing = self.__dict__.get("adapter_routing")
        if routing is not None and routing.active:
            return None  # rows with LoRA adapters (camelid.transforms.multi_lora): the PyTorch layers
        B, T, _ = x.shape
        paged = isinstance(cache, PagedView)
        if paged and (not cache.decode or cache.pool.quantized):
            return None  # a prefill chunk, or int8 blocks: the PyTorch layers
        if (T > FUSED_QUERIES or cache is None or (type(cache).update is not KVCache.update and not paged) or rope is None
                or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or self.training
                or torch.is_grad_enabled() or slots is None or slots.numel() != T
                or cache.k[0].dtype not in (x.dtype, torch.float16) or not cache.k[0].is_contiguous()
                or torch.compiler.is_compiling() or int(slots[0]) == 0 or int(slots[-1]) != kv_len - 1
                or (T > 1 and not bool((slots[1:] - slots[:-1] == 1).all()))):
            return None
        if not self.fused_decode.ready():
            return None
        starts = [kv_len] * B  # a row in no group has only padding: no keys
        for g in plan:
            if not g.causal:
                return None
            for r in range(B)[g.rows]:
                starts[r] = g.key_start
        if any(start == int(slots[0]) for start in starts):
            return None  # a row with no keys before its queries is a prompt's prefill (the engine's, at a later slot)
        return torch.tensor(starts, dtype=torch.long)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.cache_dtype: str | None = None  # the KV cache kind decoding uses by default (core/cache.py)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                cache: KVCache | None = None, cache_position=None, logits_to_keep: int = 0,
                output_hidden_states: bool = False) -> CausalLMOutput:
        """logits [B, T, V] in float32 when the model is; with `labels` (-100 = ignore), the mean
        next-token cross-entropy, labels shifted inside as in transformers."""
        x, hidden_states = self.model(input_ids, attention_mask, position_ids, inputs_embeds, cache,
                                      cache_position, output_hidden_states)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=hidden_states)

    # ------------------------------------------------------------------ conveniences
    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # a float tensor whatever transform holds the linears

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (linears may hold packed or quantized weights)."""
        return self.model.norm.weight.dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied lm_head counts once), as transformers counts them."""
        params = {id(p): p for p in self.parameters()}
        if self.config.tie_word_embeddings:  # tied, even where lm_head holds its own (packed) copy
            params.pop(id(self.lm_head.weight), None)
            params[id(self.model.embed_tokens.weight)] = self.model.embed_tokens.weight
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in the backward pass instead of storing its activations."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    def set_attn_implementation(self, name: str) -> "LlamaForCausalLM":
        if name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {name!r} is not one of {ATTN_IMPLEMENTATIONS}")
        for layer in self.model.layers:
            layer.self_attn.attn_implementation = name
        return self


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of token t+1 given tokens <= t, over labels that are not ignore_index."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the logits' [batch, seq] "
                         f"{tuple(logits.shape[:2])}")
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)
