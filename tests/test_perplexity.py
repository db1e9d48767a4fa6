import math

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.perplexity import perplexity


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
