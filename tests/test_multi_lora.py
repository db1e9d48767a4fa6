"""Several LoRA adapters on one engine (camelid.transforms.multi_lora), chosen per request: each
adapter's logits are peft's (the oracle) on the same base and adapter; requests with different
adapters and none, in one batch, chunked and joining at different times, get to the bit what each
gets alone; the prefix cache never hands one adapter's blocks to another; bad adapters are refused."""

import json
import threading
import time

import pytest
import torch

from camelid import LlamaForCausalLM
from camelid.generation.engine import Engine
from camelid.transforms.multi_lora import attach_adapters

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ADAPTERS = {  # name: (rank, alpha, target modules)
    "attn": (4, 8, ["q_proj", "v_proj"]),
    "mlp": (8, 16, ["gate_proj", "down_proj"]),
    "all": (2, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A random base saved by transformers and three peft adapters on it with random (nonzero) B."""
    root = tmp_path_factory.mktemp("multi_lora")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      initializer_range=0.3)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        hf = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                     target_modules=targets))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        hf.save_pretrained(root / name)
    return root


@pytest.fixture
def model(folders):
    return LlamaForCausalLM.from_pretrained(folders / "base")  # packed and fused for CPU inference


def rand(n, seed):
    return torch.randint(1, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine, jobs, stagger=0.02):
    """(prompt, max_tokens, adapter) jobs from threads: (tokens, logprobs) each."""
    out = [None] * len(jobs)

    def one(i, prompt, n, adapter):
        time.sleep(stagger * i)
        done, toks, lps = threading.Event(), [], []

        def emit(e):
            if e.token is not None:
                toks.append(e.token)
                lps.append(e.logprob)
            if e.finish_reason is not None:
                done.set()

        engine.submit(prompt, n, min_tokens=n, logprobs=0, emit=emit, adapter=adapter)
        done.wait()
        out[i] = (toks, lps)

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def test_each_adapter_gives_peft_logits(folders, model):
    ids = torch.tensor([rand(40, 1)])
    routing = attach_adapters(model, {name: folders / name for name in ADAPTERS})
    with torch.no_grad():
        base = model(ids).logits
        for name in ADAPTERS:
            hf = transformers.AutoModelForCausalLM.from_pretrained(folders / "base", dtype=torch.float32)
            hf = peft.PeftModel.from_pretrained(hf, folders / name).eval()
            routing.rows = [routing.index(name)]
            try:
                ours = model(ids).logits
            finally:
                routing.rows = None
            theirs = hf(ids).logits
            assert (ours - base).abs().max() > 0.1  # the adapter changes the logits ...
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)  # ... as peft's does
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)  # no rows routed: the base model


def test_mixed_adapters_in_one_batch_equal_each_request_alone(folders, model):
    """12 requests over the base and three adapters, 4 slots, prefilled 64 tokens a step while the
    others decode, sharing a 130-token prefix: each (tokens, logprobs) equals the request alone."""
    adapters = {name: folders / name for name in ADAPTERS}
    system = rand(130, 99)
    jobs = [(system + rand(5 + 7 * i, 200 + i), 10, i % 4) for i in range(12)]
    alone = Engine(model, max_batch=1, max_prefill_chunk=1024, prefix_caching=False, adapters=adapters).start()
    try:
        want = [run(alone, [job])[0] for job in jobs]
    finally:
        alone.stop()
    engine = Engine(model, max_batch=4, max_prefill_chunk=64, adapters=adapters).start()
    try:
        got = run(engine, jobs)
    finally:
        engine.stop()
    assert [i for i in range(12) if got[i] != want[i]] == []
    assert len({tuple(w[0]) for w in want[:4]}) == 4  # the four models answer differently
    # the shared prefix is reused within each adapter only: 12 requests, 4 keys
    assert 0 < engine.stats["prefix_hits"] <= 8 * 128


def test_an_adapter_loaded_while_running_serves_the_next_requests(folders, model):
    engine = Engine(model, max_batch=2, adapters={"attn": folders / "attn"}).start()
    try:
        before = run(engine, [(rand(20, 3), 6, 0)])[0]
        index = engine.load_adapter("mlp", folders / "mlp")
        assert engine.adapter_names == ["attn", "mlp"] and index == 2
        assert engine.load_adapter("mlp", folders / "mlp") == 2  # the same folder again: the same adapter
        with pytest.raises(ValueError, match="'mlp' is empty or already loaded"):
            engine.load_adapter("mlp", folders / "all")
        with pytest.raises(FileNotFoundError, match="adapter_config.json"):
            engine.load_adapter("nope", folders / "missing")
        after = run(engine, [(rand(20, 3), 6, 0), (rand(20, 3), 6, 2)])
    finally:
        engine.stop()
    assert after[0] == before and after[1][0] != before[0]


def test_unknown_adapters_are_refused(folders, model):
    engine = Engine(model, adapters={"attn": folders / "attn"})
    with pytest.raises(ValueError, match="adapter 2 is not loaded"):
        engine.submit(rand(5, 1), 3, adapter=2)
    with pytest.raises(ValueError, match="no LoRA adapter named 'sql' is loaded \\(loaded: attn\\)"):
        engine.adapter_index("sql")


def test_an_adapter_for_another_base_is_refused_before_anything_changes(folders, model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((folders / "attn" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(dict(cfg, r=3)))
    (bad / "adapter_model.safetensors").write_bytes((folders / "attn" / "adapter_model.safetensors").read_bytes())
    routing = attach_adapters(model)
    names = list(routing.names)
    with pytest.raises(ValueError, match="the model needs \\(3, 64\\)"):
        routing.add("bad", bad)
    assert routing.names == names


# ---------------------------------------------------------------------- through the server
@pytest.fixture(scope="module")
def lora_server(smollm2_gguf, smollm2_tokenizer, tmp_path_factory):
    """The default model (Q4_1, camelid's kernels) serving an adapter made on its float weights."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from camelid.serve.app import create_app
    from camelid.transforms.lora import apply_lora, save_adapter
    from netutil import AppServer

    folder = tmp_path_factory.mktemp("sql")
    m = apply_lora(LlamaForCausalLM.from_pretrained(smollm2_gguf, pack=False), r=4, lora_alpha=8,
                   target_modules=["q_proj", "v_proj", "down_proj"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_adapter(m, folder / "sql")
    save_adapter(m, folder / "sql2")
    del m
    model = LlamaForCausalLM.from_pretrained(smollm2_gguf)
    s = AppServer(create_app(model, smollm2_tokenizer, model_name="smollm2", max_batch=4, runtime_lora=True,
                             adapters={"sql": folder / "sql"}))
    s.folder = folder
    yield s
    s.close()


def _chat(server, model, text, n=12):
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": n, "temperature": 0, "messages": [{"role": "user", "content": text}]})
    return r


@pytest.mark.slow
def test_requests_pick_adapters_by_model_name_and_mixed_batches_equal_alone(lora_server):
    import httpx

    s = lora_server
    ids = [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]
    assert ids == ["smollm2", "sql"]
    assert httpx.get(s.url + "/v1/models/sql").json()["parent"] == "smollm2"
    questions = ["Name a colour.", "What is SQL?", "Say hello.", "Count to three."]
    jobs = [(m, q) for q in questions for m in ("smollm2", "sql")]
    alone = [_chat(s, m, q).json()["choices"][0]["message"]["content"] for m, q in jobs]
    got = [None] * len(jobs)

    def one(i):
        got[i] = _chat(s, *jobs[i]).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == alone
    assert any(alone[i] != alone[i + 1] for i in range(0, len(jobs), 2))  # the adapter changes answers
    text = httpx.get(s.url + "/metrics").text
    assert 'max_lora="1"' in text and "vllm:lora_requests_info{" in text


@pytest.mark.slow
def test_unknown_adapter_names_get_404_and_runtime_loading(lora_server, smollm2_tokenizer):
    import httpx

    s = lora_server
    r = _chat(s, "sqll", "Hi")
    assert r.status_code == 404 and "'sqll' does not exist; this server serves 'smollm2', 'sql'" in \
        r.json()["error"]["message"]
    r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(s.folder / "nope")})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "sql2", "lora_path": str(s.folder / "sql2")})
    assert r.status_code == 200
    a, b = (_chat(s, m, "What is SQL?").json()["choices"][0]["message"]["content"] for m in ("sql", "sql2"))
    assert a == b  # the same adapter under two names
    assert _chat(s, "smollm2", "Hi").status_code == 200  # still up
