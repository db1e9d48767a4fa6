"""Issue 19, finding 7: tiny files that ask for a model larger than the machine are refused before
anything is built (the model is built on the meta device, and 10^8 decoder layers there alone would
run for hours), in well under a second, naming the sizes."""

import json
import time

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from camelid import CheckpointError, LlamaConfig, LlamaForCausalLM
from camelid.formats.common import MIN_BYTES_PER_PARAMETER, check_fits, machine_bytes


def huge_config(**over) -> dict:
    return dict(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=10**8,
                            num_attention_heads=4, num_key_value_heads=2).to_dict(), **over)


def test_hf_config_with_1e8_layers_is_refused_at_once(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(huge_config()))
    save_file({"model.embed_tokens.weight": torch.zeros(64, 64)}, str(tmp_path / "model.safetensors"))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=100000000.*more than this machine"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    assert time.monotonic() - start < 1.0


def test_gguf_with_1e8_blocks_is_refused_at_once(tmp_path):
    path = tmp_path / "huge.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(10**8)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(64)
    w.add_tensor("token_embd.weight", np.zeros((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert path.stat().st_size < 64 * 1024
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=100000000"):
        LlamaForCausalLM.from_pretrained(path)
    assert time.monotonic() - start < 1.0


def test_the_bound_is_the_machine_not_a_fixed_cap():
    """Just over the machine's memory at 4 bits a parameter is refused, just under it is not, and
    a real 8B config passes (on a machine with 8+ GiB): the bound is the machine, not a layer cap."""
    from camelid.core.accounting import parameter_count

    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    one, two = (parameter_count(LlamaConfig(**base, num_hidden_layers=n)) for n in (1, 2))
    per_layer, rest = two - one, 2 * one - two
    fits = int((machine_bytes() / MIN_BYTES_PER_PARAMETER - rest) // per_layer)
    check_fits(LlamaConfig(**base, num_hidden_layers=fits))
    with pytest.raises(CheckpointError, match="more than this machine"):
        check_fits(LlamaConfig(**base, num_hidden_layers=fits + 1))
    if machine_bytes() > 8 * 2**30:
        check_fits(LlamaConfig.from_pretrained("llama-3.1-8b"))


def test_a_safetensors_header_of_a_million_empty_entries_is_refused_at_once(tmp_path):
    """Issue 19, finding 7: a 67 MB header of 1M zero-size tensors was parsed whole (12-81 s,
    1.4+ GB) before the names failed; its size, in the file's first 8 bytes, is enough."""
    import struct

    (tmp_path / "config.json").write_text(json.dumps(huge_config(num_hidden_layers=1)))
    entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    raw = ("{" + ",".join(entry.format(i) for i in range(1_000_000)) + "}").encode()
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"its header is 5\d,\d{3},\d{3} bytes; a model of 1 layers needs at most"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    assert time.monotonic() - start < 1.0


def test_a_real_header_is_well_under_the_bound(tmp_path):
    from camelid.formats.hf import check_header_sizes

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                         mlp_bias=True))
    model.save_pretrained(tmp_path)
    check_header_sizes(tmp_path, model.config)
    size = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    assert size * 4 < 16 * 3 * 512  # a quarter of the bound at most, biases and all
