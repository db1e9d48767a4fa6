"""camelid.transforms.packed: the CPU inference layouts (the default on CPU loads): camelid's own
float tiles (TiledLinear) where its kernels are built, else oneDNN-packed linears. Every test runs
on both layouts (the `layout` fixture)."""

import pytest
import torch

import camelid
from camelid import LlamaConfig, LlamaForCausalLM
from camelid.transforms import packed

pytestmark = pytest.mark.skipif(not packed.available(), reason="torch built without oneDNN")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(autouse=True, params=["tiles", "onednn"])
def layout(request, monkeypatch):
    import camelid.kernels as kernels

    if request.param == "tiles" and not kernels.available():
        pytest.skip("camelid's kernels are not built here")
    if request.param == "onednn":
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


def tiny(tied=True, bias=False, dtype=torch.float32):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied, attention_bias=bias)).to(dtype).eval()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_model_computes_the_same_logits(tied, bias, layout):
    model = tiny(tied, bias)
    ids = torch.randint(0, 96, (3, 11))
    with torch.no_grad():
        ref = model(ids).logits
        packed.pack(model)
        out = model(ids).logits
    assert packed.is_packed(model)
    kind = packed.TiledLinear if layout == "tiles" else packed.PackedLinear
    assert sum(type(m) is kind for m in model.modules()) == 2 * 7 + 1
    assert (out - ref).abs().max() <= 1e-4


def test_rows_do_not_depend_on_the_batch_they_are_in():
    """The reason packing is the default: a row's logits are the same bits alone or in a batch
    of any size (MKL's sgemm rounds 1-3 rows differently from 4+)."""
    model = packed.pack(tiny())
    ids = torch.randint(0, 96, (16, 9))
    with torch.no_grad():
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(16)])
        for b in (2, 3, 4, 7, 16):
            assert torch.equal(model(ids[:b]).logits, alone[:b]), f"batch of {b}"


@pytest.mark.parametrize("shape", [(64, 128), (576, 1536), (2048, 2048), (4096, 2048)])
def test_one_row_rounds_like_many(shape):
    """oneDNN's one-row path rounds differently from 2+ rows for in_features > 1024; a one-row
    input is run as two rows so every row count gives the same bits."""
    torch.manual_seed(0)
    lin = packed.PackedLinear(torch.nn.Linear(shape[1], shape[0]))
    x = torch.randn(5, shape[1])
    with torch.no_grad():
        many = lin(x)
        assert all(torch.equal(lin(x[i:i + 1]), many[i:i + 1]) for i in range(5))
        assert torch.equal(lin(x[0]), many[0])  # a 1-D input too


def test_state_dict_is_dense_and_save_reload_round_trips(tmp_path):
    model = tiny(tied=True)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    packed.pack(model)
    state = model.state_dict()
    assert not any(v.is_mkldnn for v in state.values())
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    model.save_pretrained(tmp_path)
    again = camelid.load_pretrained(tmp_path, pack=False)
    for k, v in again.state_dict().items():
        assert torch.equal(v, ref[k]), k
    fresh = packed.pack(tiny(tied=True))
    fresh.load_state_dict({k: v + 1 for k, v in ref.items()})
    assert torch.equal(packed.dense_weight(fresh.lm_head), ref["lm_head.weight"] + 1)


def test_unpack_gives_trainable_linears_and_reties():
    model = tiny(tied=True)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        ref = model(ids).logits
    packed.unpack(packed.pack(model))
    assert not packed.is_packed(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, ref)


def test_counts_dtype_and_device_are_unchanged():
    model = tiny(tied=True)
    n = model.num_parameters()
    packed.pack(model)
    assert model.num_parameters() == n
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_gradients_still_reach_the_inputs():
    """A packed base stays frozen, but what flows through it (e.g. to a LoRA adapter) gets dx."""
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    lin(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    packed.PackedLinear(lin)(x).sum().backward()
    assert torch.allclose(x.grad, expected)


def test_training_a_packed_model_is_a_clear_error():
    model = packed.pack(tiny())
    with pytest.raises(RuntimeError, match="pack=False"):
        model.train()


def test_moving_a_packed_model_off_the_cpu_or_to_float16_is_a_clear_error():
    model = packed.pack(tiny())
    with pytest.raises(RuntimeError, match="unpack"):
        model.to(torch.float16)


def test_bfloat16_is_left_unpacked_where_onednn_cannot_run_it(monkeypatch, layout):
    if layout == "tiles":
        pytest.skip("camelid's tiles take bfloat16 on any x86 CPU")
    monkeypatch.setattr(packed, "bf16_supported", lambda: False)
    model = tiny(dtype=torch.bfloat16)
    assert not packed.can_pack(model) and not packed.is_packed(packed.pack(model))
    assert packed.can_pack(tiny())  # float32 packs on any x86 CPU


@pytest.mark.skipif(not packed.bf16_supported(), reason="oneDNN bfloat16 needs AVX-512 or AVX-NE-CONVERT")
def test_bfloat16_packs_too(layout):
    model = tiny(dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits.float()
        out = packed.pack(model)(ids).logits.float()
    assert packed.is_packed(model)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_pack_option_of_from_pretrained(tmp_path):
    tiny().save_pretrained(tmp_path)
    assert packed.is_packed(camelid.load_pretrained(tmp_path))  # the CPU default
    assert not packed.is_packed(camelid.load_pretrained(tmp_path, pack=False))
    assert not packed.is_packed(camelid.load_pretrained(tmp_path, dtype="float16"))  # no packed float16 path
    with pytest.raises(ValueError, match="pack=True"):
        camelid.load_pretrained(tmp_path, dtype="float16", pack=True)
