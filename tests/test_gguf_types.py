"""Every GGML type camelid reads dequantizes to the gguf package's values, in PyTorch shape."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from camelid.formats.gguf import SUPPORTED_TYPES, tensor_data
from camelid.formats.gguf_file import GGUFError, GGUFTensor

# byte offsets of the float16 scale fields in one block of each K-quant (llama.cpp's block layout)
K_SCALES = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def blocks(qtype, rows, cols, rng):
    """Valid raw data for a rows x cols tensor of `qtype`, as uint8 [rows, row_bytes]."""
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == Q.F32:
        return values.view(np.uint8)
    if qtype == Q.F16:
        return values.astype(np.float16).view(np.uint8)
    if qtype == Q.F64:
        return values.astype(np.float64).view(np.uint8)
    if qtype in K_SCALES:  # no numpy quantizer for K-quants: random payload, finite scales
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for offset in K_SCALES[qtype]:
            raw[..., offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        return raw.reshape(rows, -1)
    return quantize(values, qtype)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=int), ids=lambda t: t.name)
def test_type_dequantizes_like_the_gguf_package(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 3, 512
    raw = blocks(qtype, rows, cols, rng)
    t = GGUFTensor(name="blk.0.ffn_up.weight", shape=(rows, cols), type=qtype, data=raw)
    got = tensor_data(t)
    want = (raw.view(np.float64) if qtype == Q.F64 else dequantize(raw, qtype)).reshape(rows, cols)
    assert tuple(got.shape) == (rows, cols)
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))


def test_every_legacy_and_k_quant_is_supported():
    names = {t.name for t in SUPPORTED_TYPES}
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
            "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"} <= names


def test_unsupported_type_is_a_clear_error():
    raw = np.zeros((1, GGML_QUANT_SIZES[Q.IQ2_XXS][1]), dtype=np.uint8)
    with pytest.raises(GGUFError, match="IQ2_XXS, which camelid does not read"):
        tensor_data(GGUFTensor(name="blk.0.ffn_up.weight", shape=(1, 256), type=Q.IQ2_XXS, data=raw))
