"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end against transformers."""

from pathlib import Path

import pytest
import torch

from camelid import LlamaForCausalLM
from camelid.evaluate.perplexity import perplexity

GPL3 = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="float32")  # parity work: dequantized


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


def test_config_read_from_gguf(model):
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.vocab_size == 49152
    assert model.num_parameters() == 134_515_008  # the published count


def test_default_name_resolves_to_the_pinned_file(smollm2_gguf):
    from camelid.formats.hub import PACKAGED, resolve, sha256_file

    assert resolve("smollm2-135m-instruct") == smollm2_gguf
    assert sha256_file(smollm2_gguf) == PACKAGED["smollm2-135m-instruct"].sha256


@pytest.mark.slow
def test_logits_match_transformers(model, hf_model, smollm2_tokenizer):
    for prompt in ["The capital of France is", "def fibonacci(n):", "日本語とEnglish, 1234 numbers."]:
        ids = torch.tensor([smollm2_tokenizer.encode(prompt)])
        with torch.no_grad():
            diff = (model(ids).logits - hf_model(ids).logits).abs().max().item()
        assert diff <= 1e-3, (prompt, diff)


def greedy(model, ids, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids


def test_greedy_chat_answer_mentions_paris(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt")
    out = greedy(model, prompt, 12)
    answer = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@pytest.mark.skipif(not GPL3.is_file(), reason="needs /usr/share/common-licenses/GPL-3")
def test_perplexity_on_gpl3_matches_transformers(model, hf_model, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(GPL3.read_text(encoding="utf-8"))
    ours = perplexity(model, ids, context=512, stride=448)
    theirs = perplexity(hf_model, ids, context=512, stride=448, logits_fn=lambda x: hf_model(x).logits)
    assert ours.tokens == theirs.tokens == len(ids) - 1
    assert 1.0 < ours.value < 100.0  # an English legal text is not surprising to a language model
    assert abs(ours.value / theirs.value - 1) < 1e-3, (ours.value, theirs.value)

