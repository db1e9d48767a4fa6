import math

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.evaluate.perplexity import perplexity


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64)).eval()


def reference_nll(model, ids, context, stride):
    """Token by token: token t (t >= 1) scored once, given the tokens from the start of the
    window that scores it; windows score `stride` tokens each and hold at most `context`."""
    total = 0.0
    for t in range(1, len(ids)):
        chunk_end = min(1 + ((t - 1) // stride + 1) * stride, len(ids))
        begin = max(0, chunk_end - context)
        with torch.no_grad():
            logp = model(torch.tensor([ids[begin:t]])).logits[0, -1].log_softmax(-1)
        total -= logp[ids[t]].item()
    return total


@pytest.mark.parametrize("context,stride", [(16, 15), (16, 8), (16, 5), (16, 1), (64, 63), (7, 3)])
def test_perplexity_equals_token_by_token_reference(tiny, context, stride):
    ids = torch.randint(0, 50, (41,), generator=torch.Generator().manual_seed(1)).tolist()
    p = perplexity(tiny, ids, context=context, stride=stride)
    assert p.tokens == 40
    assert p.nll == pytest.approx(reference_nll(tiny, ids, context, stride), rel=1e-5)
    assert p.value == pytest.approx(math.exp(p.nll / 40))


def test_uniform_model_has_vocab_perplexity(tiny):
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return type("O", (), {"logits": torch.zeros(*x.shape, 50)})()
    assert perplexity(Uniform(), list(range(30)), context=8).value == pytest.approx(50.0)


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny, [1, 2, 3], context=8, stride=8)
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(tiny, [1], context=8)


def test_kl_divergence_against_closed_forms(tiny):
    from camelid.evaluate.perplexity import kl_divergence

    ids = torch.randint(0, 50, (41,), generator=torch.Generator().manual_seed(2)).tolist()
    same = kl_divergence(tiny, tiny, ids, context=16, stride=5)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.model.nll == pytest.approx(perplexity(tiny, ids, context=16, stride=5).nll, rel=1e-6)

    class Uniform(torch.nn.Module):  # KL(p || uniform) = log V - H(p) at each position
        config, device = tiny.config, torch.device("cpu")

        def forward(self, x):
            return type("O", (), {"logits": torch.zeros(*x.shape, 50)})()

    d = kl_divergence(Uniform(), tiny, ids, context=16, stride=5)
    expected = 0.0
    for begin, start, end in [(max(0, min(s + 5, 41) - 16), s, min(s + 5, 41)) for s in range(1, 41, 5)]:
        with torch.no_grad():
            logp = tiny(torch.tensor([ids[begin:end]])).logits[0, start - begin - 1:-1].log_softmax(-1)
        expected += float((math.log(50) + (logp.exp() * logp).sum(-1)).sum())
    # float32 log-softmax over 50 classes, 40 positions, two evaluation orders: log V - H(p) loses
    # ~4 digits to cancellation (H ~ log V), so 1e-4 relative, not 1e-5 (missed on an AVX-512 CPU)
    assert d.kl == pytest.approx(expected, rel=1e-4) and d.model.value == pytest.approx(50.0)
    assert d.mean_kl == pytest.approx(expected / 40, rel=1e-4)


def test_kl_divergence_needs_one_vocabulary(tiny):
    from camelid.evaluate.perplexity import kl_divergence

    other = LlamaForCausalLM(LlamaConfig(vocab_size=51, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4)).eval()
    with pytest.raises(ValueError, match="vocabularies differ"):
        kl_divergence(other, tiny, [1, 2, 3], context=8)
