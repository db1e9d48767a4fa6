"""Tensor parallelism (camelid.transforms.tp) on CPU with gloo, in 2 and 4 real processes: logits
and greedy generation equal the single-process model for MHA, GQA and fewer KV heads than ranks;
per-rank weight bytes shrink; impossible splits fail before any weight moves."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.transforms.tp import TPError, check_plan, head_plan, resident_weight_bytes, tensor_parallel
from netutil import free_port, wait_until_up

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=4),
    "kv<ranks": dict(num_attention_heads=8, num_key_value_heads=2),
    "mqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "odd-vocab": dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=101),
}


def build(kind: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = {**dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, attention_bias=True),
           **CONFIGS[kind]}
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


IDS = torch.tensor([[5, 17, 99, 3, 64, 12, 7], [1, 2, 3, 4, 5, 6, 8]])


def _worker(rank, world, port, kind, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build(kind)
        whole = resident_weight_bytes(model)
        tensor_parallel(model)
        with torch.no_grad():
            logits = model(IDS).logits
        tokens = model.generate(IDS[:1], max_new_tokens=6)
        if rank == 0:
            torch.save({"logits": logits, "tokens": tokens, "bytes": resident_weight_bytes(model), "whole": whole}, out)
    finally:
        dist.destroy_process_group()


def run_tp(kind, world, tmp_path):
    out = str(tmp_path / f"{kind}-{world}.pt")
    mp.start_processes(_worker, args=(world, free_port(), kind, out), nprocs=world, start_method="spawn")
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tp_logits_and_greedy_equal_one_process(kind, world, tmp_path):
    got = run_tp(kind, world, tmp_path)
    model = build(kind)
    with torch.no_grad():
        expected = model(IDS).logits
    torch.testing.assert_close(got["logits"], expected, rtol=0, atol=1e-5)
    assert torch.equal(got["tokens"], model.generate(IDS[:1], max_new_tokens=6))
    ratio = got["bytes"] / got["whole"]
    print(f"{kind} world {world}: rank 0 holds {got['bytes']} of {got['whole']} weight bytes ({ratio:.2f}x)")
    assert ratio < (0.75 if world == 2 else 0.5) or kind == "odd-vocab"


def test_head_plans():
    assert head_plan(8, 4, 2, 1) == (slice(4, 8), slice(2, 4))
    assert head_plan(8, 2, 4, 3) == (slice(6, 8), slice(1, 2))  # KV head 1 replicated on ranks 2 and 3
    assert head_plan(4, 1, 4, 2) == (slice(2, 3), slice(0, 1))


@pytest.mark.parametrize("cfg, world, message", [
    (dict(num_attention_heads=6, num_key_value_heads=6, hidden_size=48), 4, "does not divide num_attention_heads 6"),
    (dict(num_attention_heads=12, num_key_value_heads=3, hidden_size=48), 4, "neither a divisor nor a multiple"),
    (dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=90), 4, "does not divide intermediate_size"),
    (dict(num_attention_heads=4, num_key_value_heads=4, alibi=True), 2, "ALiBi"),
])
def test_impossible_splits_fail_before_loading(cfg, world, message):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    config = LlamaConfig(**{**base, **cfg})
    with pytest.raises(TPError, match=message):
        check_plan(config, world)


def test_tensor_parallel_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group exists")
    with pytest.raises(TPError, match="needs torch.distributed initialised"):
        tensor_parallel(build("mha"))



@pytest.mark.slow
def test_generate_with_nproc_equals_one_process(tmp_path, smollm2_tokenizer, capsys):
    from camelid.cli import main

    tok = smollm2_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["generate", "Hello there", "--model", str(tmp_path / "m"), "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    alone = capsys.readouterr().out
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "camelid.cli", *args, "--nproc", "2"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == alone  # printed once (rank 0), the same text


def test_generate_nproc_that_cannot_split_fails_before_loading(smollm2_gguf, capsys):
    from camelid.cli import main

    assert main(["generate", "hi", "--nproc", "2"]) == 2  # SmolLM2-135M: 9 heads
    err = capsys.readouterr().err
    assert "world size 2 does not divide num_attention_heads 9" in err
    assert "this model splits over 3 processes" in err  # issue 21, point 8: which counts work


def _load_worker(rank, world, port, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import safetensors

        from camelid.load import load_tensor_parallel

        real, read = safetensors.safe_open, [0]

        class Counting:  # counts the tensor bytes the loader takes out of the files
            def __init__(self, *args, **kwargs):
                self.f = real(*args, **kwargs)

            def get_slice(self, name):
                whole = self.f.get_slice(name)

                class Slice:
                    def __getitem__(self, index):
                        t = whole[index]
                        read[0] += t.numel() * t.element_size()
                        return t
                return Slice()

        safetensors.safe_open = Counting
        model = load_tensor_parallel(path)
        with torch.no_grad():
            logits = model(IDS).logits
        if rank == 0:
            torch.save({"logits": logits, "bytes": resident_weight_bytes(model), "read": read[0]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_loading_reads_only_the_shard(tmp_path):
    """Each rank reads only its slices of the safetensors checkpoint (counted at safe_open), never
    the whole model, and the logits equal the whole model's."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                         num_attention_heads=8, num_key_value_heads=4)).eval()
    model.save_pretrained(tmp_path / "m")
    whole = resident_weight_bytes(model)
    with torch.no_grad():
        expected = model(IDS).logits
    out = str(tmp_path / "out.pt")
    mp.start_processes(_load_worker, args=(2, free_port(), str(tmp_path / "m"), out), nprocs=2, start_method="spawn")
    got = torch.load(out)
    torch.testing.assert_close(got["logits"], expected, rtol=0, atol=1e-5)
    print(f"world 2: rank 0 read {got['read'] / whole:.2f}x and holds {got['bytes'] / whole:.2f}x of the weight bytes")
    assert 0.4 * whole < got["read"] < 0.55 * whole and got["bytes"] < 0.55 * whole


@pytest.mark.slow
def test_serve_with_nproc_answers_like_one_process_and_stops_on_sigterm(tmp_path, smollm2_tokenizer):
    import signal
    import subprocess
    import sys

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    tok = smollm2_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "camelid.cli", "serve", "--nproc", "2", "--model", str(tmp_path / "m"),
                             "--port", str(port), "--served-model-name", "m", "--context", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(port, proc)
        for prompt in ["Hello there", "1, 2, 3,"]:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
            ids = tok.encode(prompt)
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, eos_token_id=tok.eos_token_ids)
            assert r["choices"][0]["text"] == tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------- NCCL (a GPU per rank)

def _nccl_worker(rank, world, kind, out):
    model = build(kind).to(f"cuda:{rank}")
    tensor_parallel(model)
    with torch.no_grad():
        logits = model(IDS.to(f"cuda:{rank}")).logits
    tokens = model.generate(IDS[:1].to(f"cuda:{rank}"), max_new_tokens=6)
    if rank == 0:
        torch.save({"logits": logits.cpu(), "tokens": tokens.cpu()}, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("kind", ["gqa", "kv<ranks"])
def test_tp_over_nccl_equals_one_gpu(kind, tmp_path):
    """launch picks NCCL with a GPU per rank; float32 on GPUs (TF32 off) within 1e-4 of one GPU."""
    from camelid.distributed import launch

    torch.backends.cuda.matmul.allow_tf32 = False
    out = tmp_path / "nccl.pt"
    launch(_nccl_worker, 2, kind, str(out))
    got = torch.load(out)
    model = build(kind).cuda()
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(IDS.cuda()).logits.cpu(), rtol=0, atol=1e-4)
    assert torch.equal(got["tokens"], model.generate(IDS[:1].cuda(), max_new_tokens=6).cpu())
