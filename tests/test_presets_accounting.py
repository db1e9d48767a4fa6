"""Presets against published parameter counts; FLOPs/memory accounting against closed forms."""

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM, accounting
from camelid.core.config import preset_config
from camelid.core.presets import PRESETS

# Published parameter counts (model cards / safetensors metadata of the official checkpoints).
PUBLISHED = {
    "llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672, "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192, "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496,
    "llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496, "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "codellama-7b": 6_738_546_688,
    "codellama-13b": 13_016_028_160, "codellama-34b": 33_743_970_304, "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384,
}


def test_every_preset_has_a_published_count():
    assert set(PRESETS) == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(name):
    config = preset_config(name)
    with torch.device("meta"):  # no memory: a 405B model builds instantly
        model = LlamaForCausalLM(config)
    assert model.num_parameters() == PUBLISHED[name]
    assert accounting.parameter_count(config) == PUBLISHED[name]


def test_preset_aliases_and_from_pretrained():
    assert preset_config("meta-llama/Llama-2-7b-hf") == preset_config("LLAMA-2-7B")
    cfg = LlamaConfig.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.rope_theta) == (3, True, 100000.0)
    l31 = preset_config("llama-3.1-8b")
    assert l31.rope_type == "llama3" and l31.eos_token_ids == [128001, 128008, 128009]
    assert preset_config("llama-3.2-1b").head_dim == 64


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="neither a config folder/file nor a preset.*llama-2-7b"):
        preset_config("llama-9000")


def tiny(**kw):
    base = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2)
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True},
                                {"head_dim": 16}, {"num_key_value_heads": 1}])
def test_parameter_count_closed_form_equals_model(kw):
    config = tiny(**kw)
    model = LlamaForCausalLM(config)
    assert accounting.parameter_count(config) == model.num_parameters() == \
        sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    emb = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - emb


def paddlenlp_flops(h, inter, layers, vocab, batch, s, recompute=False, granularity=None):
    """Transcription of PaddleNLP's caculate_llm_flops (MHA only), the reference for MHA."""
    qkvo = s * h**2 * 4
    core = s**2 * h * 2
    ffn = s * h * inter * 3 + s * inter
    per_layer = qkvo + core + ffn
    rc = 0
    if recompute:
        rc = {"full": per_layer, "full_attn": qkvo + core, "core_attn": core}[granularity]
    logits = s * h * vocab
    return 2 * batch * (layers * (per_layer * 3 + rc) + 3 * logits)


@pytest.mark.parametrize("granularity", ["none", "full", "full_attn", "core_attn"])
def test_training_flops_equal_paddlenlp_for_mha(granularity):
    c = preset_config("llama-2-7b")
    got = accounting.flops(c, 4096, 2, training=True, recompute=granularity).total
    want = paddlenlp_flops(4096, 11008, 32, 32000, 2, 4096, granularity != "none", granularity)
    assert got == want


def test_gqa_flops_count_the_smaller_kv_projections():
    c = preset_config("llama-3-8b")  # 32 q heads, 8 kv heads, head_dim 128
    f = accounting.flops(c, 1, 1)
    C, L = 4096, 32
    assert f.qkvo == L * 2 * (C * (4096 + 2 * 1024) + 4096 * C)
    # forward FLOPs/token at short context ~ 2 x the matmul parameters (the embedding lookup is free)
    matmul_params = accounting.parameter_count(c, exclude_embeddings=True) + c.vocab_size * C
    assert abs(f.per_token / (2 * matmul_params) - 1) < 0.001
    assert accounting.model_flops(c, 8) == 3 * accounting.flops(c, 8).total
    fwd = accounting.flops(c, 8)
    assert accounting.hardware_flops(c, 8) == 4 * fwd.total - fwd.logits  # lm_head is not recomputed


def test_mfu_and_bad_flops_arguments():
    c = tiny()
    per_token = accounting.model_flops(c, 16) / 16
    assert accounting.mfu(c, 16, tokens_per_second=1000, peak_flops=per_token * 2000) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="recompute 'partial'"):
        accounting.flops(c, 16, recompute="partial")
    with pytest.raises(ValueError, match="seq_len"):
        accounting.flops(c, 0)


def test_memory_estimates():
    c = preset_config("llama-2-7b")
    n = PUBLISHED["llama-2-7b"]
    assert accounting.weight_bytes(c, "float32") == 4 * n
    assert accounting.weight_bytes(c, "bfloat16") == 2 * n
    assert 0.25 * 2 * n < accounting.weight_bytes(c, "int4") < accounting.weight_bytes(c, "int8") < 2 * n
    # Llama-2-7B: 2 (k,v) x 32 layers x 32 heads x 128 dims x 2 bytes = 512 KiB per token
    assert accounting.kv_cache_bytes(c, 1, 1) == 512 * 1024
    assert accounting.kv_cache_bytes(preset_config("llama-2-70b"), 4, 4096) == 4 * 4096 * 2 * 80 * 8 * 128 * 2
    with pytest.raises(ValueError, match="dtype 'int3'"):
        accounting.weight_bytes(c, "int3")
