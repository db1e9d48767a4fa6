"""camelid.evaluate.compare: two models on the same tokens, layer by layer.

Closed forms on tiny random models (a model against itself is exact; a copy with one layer's weight
perturbed parts at exactly that layer), transformers as the oracle (the same weights agree within
1e-4 at every hidden state), the default model against its int8 quantization checked against
figures computed here by other means (torch.distributions' KL, argmax), and the CLI.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.cli import main
from camelid.evaluate.compare import compare

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, 12 cats"]


@torch.no_grad()
def randomize_(model, seed=0):
    """Weights large enough that every layer moves the hidden state (norms around 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else noise * p.shape[-1] ** -0.5)
    return model


def tiny_model(**overrides):
    return randomize_(LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def batch():
    """Two left-padded rows: 5 and 8 real tokens."""
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    return ids, mask


def perturbed(model, layer: int, weight: str = "mlp.down_proj"):
    other = copy.deepcopy(model)
    w = other.model.layers[layer].get_submodule(weight).weight
    with torch.no_grad():
        w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
    return other


# ---------------------------------------------------------------------- closed forms

def test_a_model_against_itself_is_exact(tiny, batch):
    for b in (tiny, copy.deepcopy(tiny)):
        c = compare(tiny, b, *batch)
        for d in [*c.layers, c.logits]:
            assert (d.max_abs, d.mean_abs, d.rel_l2, d.cosine) == (0.0, 0.0, 0.0, 1.0), d
        assert c.top1_agreement == 1.0 and c.kl_mean == 0.0 and c.kl_max == 0.0
        assert c.tokens == 13 and len(c.layers) == TINY["num_hidden_layers"] + 1
        assert c.first_divergence(0.0) is None


@pytest.mark.parametrize("layer,weight", [(2, "mlp.down_proj"), (0, "self_attn.v_proj"), (3, "mlp.gate_proj")])
def test_first_divergence_is_the_perturbed_layer(tiny, batch, layer, weight):
    c = compare(tiny, perturbed(tiny, layer, weight), *batch)
    names = [d.name for d in c.layers]
    assert names == ["embed_tokens", "layers.0", "layers.1", "layers.2", "layers.3+norm"]
    for d in c.layers[:layer + 1]:  # the embeddings and every layer before the perturbed one: identical
        assert d.max_abs == 0.0 and d.rel_l2 == 0.0 and d.cosine == 1.0, d
    for d in [*c.layers[layer + 1:], c.logits]:
        assert d.max_abs > 1e-3 and d.rel_l2 > 1e-3 and d.cosine < 1.0, d
    for metric in ("rel_l2", "max_abs", "mean_abs", "cosine"):
        assert c.first_divergence(0.0, metric) is c.layers[layer + 1]
    assert c.first_divergence(0.0).name.startswith(f"layers.{layer}")
    assert c.first_divergence(10.0) is None  # every relative error is below 1000%
    assert 0.0 < c.kl_mean <= c.kl_max
    table = c.table(threshold=0.0)
    marked = [line for line in table.splitlines() if line.endswith("<- first divergence")]
    assert len(marked) == 1 and marked[0].split()[0] == c.layers[layer + 1].name
    assert table.splitlines()[-1] == f"first divergence (rel_l2 > 0): {c.layers[layer + 1].name}"


def test_diff_closed_forms():
    from camelid.evaluate.compare import diff

    a = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.1, 0.7]])
    assert diff("x", a, a) == diff("x", a, a.clone()) and diff("x", a, a).cosine == 1.0  # zero rows too
    d = diff("x", a, 2 * a)  # b - a = a; the zero row counts as agreeing (cosine 1)
    assert (d.max_abs, d.rel_l2) == (4.0, 1.0) and d.mean_abs == pytest.approx(7.8 / 6)
    assert d.cosine == pytest.approx(1.0)
    d = diff("x", torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    assert (d.max_abs, d.mean_abs, d.cosine, d.divergence("cosine")) == (2.0, 1.5, 0.0, 1.0)
    assert d.rel_l2 == pytest.approx(5 ** 0.5)


def test_lm_head_only_difference_is_found_at_the_logits(tiny, batch):
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    c = compare(tiny, other, *batch)
    assert all(d.max_abs == 0.0 for d in c.layers)
    assert c.first_divergence(0.0) is c.logits and c.logits.rel_l2 == pytest.approx(0.5, rel=1e-6)


def test_quantized_and_lora_models_compare(tiny, batch):
    from camelid.transforms.lora import apply_lora
    from camelid.transforms.quantize import quantize

    nf4 = compare(tiny, quantize(copy.deepcopy(tiny), bits=4, format="nf4"), *batch)
    assert nf4.first_divergence(0.0).name == "embed_tokens"  # the embedding table is quantized too
    assert all(0.0 < d.rel_l2 < 0.5 for d in nf4.layers)

    lora = apply_lora(copy.deepcopy(tiny), r=4, target_modules=["v_proj"])
    assert compare(tiny, lora, *batch).first_divergence(0.0) is None  # lora_B starts at zero
    with torch.no_grad():
        lora.model.layers[1].self_attn.v_proj.lora_B.weight.normal_(generator=torch.Generator().manual_seed(3))
    assert compare(tiny, lora, *batch).first_divergence(0.0).name == "layers.1"


def test_padded_positions_are_ignored(tiny):
    """Garbage at padded positions (any token id there) changes nothing."""
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :5] = 0
    other_ids = ids.clone()
    other_ids[1, :5] = (ids[1, :5] + 7) % TINY["vocab_size"]
    c = compare(tiny, perturbed(tiny, 1), ids, mask)
    d = compare(tiny, perturbed(tiny, 1), other_ids, mask)
    assert c == d and c.tokens == 11


# ---------------------------------------------------------------------- transformers, the oracle

# Padded rows: with plain RoPE, positions shifted by the padding change nothing (attention sees only
# their differences), so the padded case uses dynamic NTK RoPE past max_position_embeddings, whose
# frequencies follow the largest position: transformers agrees only given the positions the mask implies.
@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True])
def test_camelid_against_transformers_same_weights(tmp_path, padded):
    import transformers  # the oracle; a test dependency, so a missing one fails loudly instead of skipping

    config = {**TINY, "max_position_embeddings": 8, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}} \
        if padded else TINY
    hf = randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)), seed=5).eval()
    hf.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4], mask[1, :1] = 0, 0  # every row padded: the largest position is 8, not 9
    c = compare(ours, hf, ids, mask if padded else None)
    for d in [*c.layers, c.logits]:
        assert d.max_abs < 1e-4 and d.rel_l2 < 1e-5, d
    assert c.top1_agreement == 1.0 and c.kl_max < 1e-8 and c.tokens == (15 if padded else 20)


# ---------------------------------------------------------------------- the default model against int8

@pytest.fixture(scope="module")
def default_pair(smollm2_gguf):
    return LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="float32"), LlamaForCausalLM.from_pretrained(smollm2_gguf,
                                                                                            load_in_8bit=True,
                                                                                            bnb_8bit_quant_type="int8")


@pytest.mark.slow
def test_default_model_against_int8(default_pair, smollm2_tokenizer):
    a, b = default_pair
    batch = smollm2_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all()  # the prompts differ in length: padding is exercised
    c = compare(a, b, ids, mask)
    print(c.table(threshold=1e-4))

    # the same figures by other means
    real = mask.bool()
    with torch.no_grad():
        out_a = a(ids, attention_mask=mask, output_hidden_states=True)
        out_b = b(ids, attention_mask=mask, output_hidden_states=True)
    la, lb = out_a.logits[real].double(), out_b.logits[real].double()
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=la),
                                           torch.distributions.Categorical(logits=lb))
    assert c.tokens == int(mask.sum())
    assert c.kl_mean == pytest.approx(float(kl.mean()), rel=1e-6)
    assert c.kl_max == pytest.approx(float(kl.max()), rel=1e-6)
    assert c.top1_agreement == float((la.argmax(-1) == lb.argmax(-1)).double().mean())
    assert c.logits.max_abs == pytest.approx(float((la - lb).abs().max()), rel=1e-9)
    assert c.logits.mean_abs == pytest.approx(float((la - lb).abs().mean()), rel=1e-9)
    for d, ha, hb in zip(c.layers, out_a.hidden_states, out_b.hidden_states):
        ha, hb = ha[real].double(), hb[real].double()
        assert d.rel_l2 == pytest.approx(float(torch.linalg.norm(hb - ha) / torch.linalg.norm(ha)), rel=1e-9)
        assert d.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(ha, hb, dim=-1).mean()),
                                         rel=1e-9)

    # nonzero but small: int8 costs about 1% of each hidden state and keeps the argmax
    assert c.first_divergence(1e-4).name == "embed_tokens"  # the tied embedding is read from int8 codes
    assert all(1e-4 < d.rel_l2 < 0.1 and d.cosine > 0.99 for d in c.layers)
    assert 0.0 < c.kl_mean < 0.01 and c.top1_agreement >= 0.9


# ---------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_tokenizer):
    """a: a tiny model with the default tokenizer's vocabulary (tokenizer saved with it); b: the same
    with layer 1 perturbed (no tokenizer); short: one with a layer fewer."""
    root = tmp_path_factory.mktemp("compare")
    base = tiny_model(vocab_size=smollm2_tokenizer.vocab_size)
    base.save_pretrained(root / "a")
    smollm2_tokenizer.save_pretrained(root / "a")
    perturbed(base, 1).save_pretrained(root / "b")
    tiny_model(vocab_size=smollm2_tokenizer.vocab_size, num_hidden_layers=3).save_pretrained(root / "short")
    return root


def test_cli_table(folders, capsys):
    """b first: it has no tokenizer, so a's encodes the prompts."""
    prompts = folders / "prompts.txt"
    prompts.write_text("Hello there\n\nOnce upon a time\n", encoding="utf-8")
    assert main(["compare", str(folders / "b"), str(folders / "a"), "--prompt", "The capital of France is",
                 "--prompts-file", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert "3 prompts" in out
    assert [line.split()[0] for line in out.splitlines() if "<- first divergence" in line] == ["layers.1"]
    assert out.splitlines()[-1] == "first divergence (rel_l2 > 0.0001): layers.1"
    assert "top-1 agreement" in out


@pytest.mark.slow
def test_cli_json_equals_the_api(folders, smollm2_tokenizer, capsys):
    a = str(folders / "a")
    assert main(["compare", a, a, "--load-in-8bit-b", "--prompt", "Hi", "--prompt", "The capital of France is",
                 "--json", "--metric", "max_abs", "--threshold", "0.5"]) == 0
    got = json.loads(capsys.readouterr().out)
    rows = [smollm2_tokenizer.encode(p) for p in ("Hi", "The capital of France is")]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    c = compare(LlamaForCausalLM.from_pretrained(a), LlamaForCausalLM.from_pretrained(a, load_in_8bit=True), ids, mask)
    first = c.first_divergence(0.5, "max_abs")
    assert got == {"a": a, "b": a, "prompts": 2, **c.to_dict(0.5, "max_abs")}
    assert got["first_divergence"] == {"threshold": 0.5, "metric": "max_abs",
                                       "name": first.name if first is not None else None}
    assert got["tokens"] == sum(map(len, rows)) and 0.0 < got["kl_mean"] and len(got["layers"]) == 5


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize("field,value", [("num_hidden_layers", 3), ("hidden_size", 32), ("vocab_size", 80)])
def test_architectures_must_agree(tiny, batch, field, value):
    other = tiny_model(**{field: value, **({"num_attention_heads": 2, "num_key_value_heads": 1}
                                           if field == "hidden_size" else {})})
    with pytest.raises(ValueError, match=f"{field} differ \\(a: {TINY[field]}, b: {value}\\)"):
        compare(tiny, other, torch.zeros(1, 4, dtype=torch.long))


def test_empty_input_ids(tiny):
    with pytest.raises(ValueError, match="input_ids is empty"):
        compare(tiny, tiny, torch.zeros(1, 0, dtype=torch.long))


def test_mask_of_another_shape(tiny, batch):
    with pytest.raises(ValueError, match=r"attention_mask \(2, 7\) must have input_ids' shape \(2, 8\)"):
        compare(tiny, tiny, batch[0], batch[1][:, 1:])


def test_mask_with_no_real_token(tiny, batch):
    with pytest.raises(ValueError, match="no real token"):
        compare(tiny, tiny, batch[0], torch.zeros_like(batch[1]))


def test_mask_that_is_not_zero_one(tiny, batch):
    with pytest.raises(ValueError, match="only 1 .* and 0"):
        compare(tiny, tiny, batch[0], 2 * batch[1])


def test_unknown_metric(tiny, batch):
    with pytest.raises(ValueError, match="metric must be one of"):
        compare(tiny, tiny, *batch).first_divergence(0.0, "l1")


def test_cli_empty_prompt(folders, capsys):
    assert main(["compare", str(folders / "a"), str(folders / "b"), "--prompt", "x", "--prompt", " "]) == 2
    assert "--prompt number 2 is empty" in capsys.readouterr().err


def test_cli_missing_prompts_file(folders, capsys):
    missing = folders / "nope.txt"
    assert main(["compare", str(folders / "a"), str(folders / "b"), "--prompts-file", str(missing)]) == 2
    assert f"--prompts-file {missing}: no such file" in capsys.readouterr().err


def test_cli_blank_prompts_file(folders, capsys):
    blank = folders / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    assert main(["compare", str(folders / "a"), str(folders / "b"), "--prompts-file", str(blank)]) == 2
    assert f"--prompts-file {blank} holds no prompt" in capsys.readouterr().err


def test_cli_missing_model(folders, capsys):
    missing = folders / "no-such-model"
    assert main(["compare", str(folders / "a"), str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_architectures_disagree(folders, capsys):
    assert main(["compare", str(folders / "a"), str(folders / "short")]) == 2
    assert "num_hidden_layers differ (a: 4, b: 3)" in capsys.readouterr().err


def test_cli_no_tokenizer(folders, capsys):
    b = str(folders / "b")
    assert main(["compare", b, b]) == 2
    assert f"neither {b} nor {b} has a tokenizer" in capsys.readouterr().err
