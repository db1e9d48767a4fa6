"""What routers and operators read from `camelid serve`: /metrics under vLLM's names and types
(parsed by prometheus_client, the oracle), the prefix cache's hits and POST /reset_prefix_cache,
and the paged engine's options (budget, chunk size) refused at start when they cannot work."""

import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")

from camelid import LlamaForCausalLM  # noqa: E402
from camelid.serve.app import create_app  # noqa: E402
from netutil import AppServer  # noqa: E402

SYSTEM = ("You are a careful assistant for a library of old maps. " * 12).strip()


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return LlamaForCausalLM.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def server(model, smollm2_tokenizer):
    s = AppServer(create_app(model, smollm2_tokenizer, model_name="smollm2", max_batch=4, context=1024,
                             kv_cache_memory="4096tokens", max_prefill_chunk=128))
    yield s
    s.close()


def chat(server, text, n=4):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "smollm2", "max_tokens": n, "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r.json()


def scrape(server) -> dict:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in parser.text_string_to_metric_families(r.text)}


def value(families, name, sample=None):
    (s,) = [s for s in families[name].samples if s.name == (sample or name)]
    return s.value


def test_metrics_carry_the_router_protocol_names_and_types(server):
    for q in ("Where is Lisbon?", "Name a river."):
        chat(server, q)
    m = scrape(server)
    kinds = {"vllm:num_requests_waiting": "gauge", "vllm:num_requests_running": "gauge",
             "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
             "vllm:time_to_first_token_seconds": "histogram", "vllm:time_per_output_token_seconds": "histogram",
             "vllm:inter_token_latency_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
             "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
             "vllm:gpu_prefix_cache_hit_rate": "gauge", "vllm:num_preemptions": "counter",
             "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter", "vllm:lora_requests_info": "gauge",
             "camelid_queue_depth": "gauge", "camelid_kv_cache_blocks": "gauge"}
    assert {n: m[n].type for n in kinds if n in m} == kinds
    assert value(m, "vllm:num_requests_waiting") == 0 and value(m, "vllm:num_requests_running") == 0
    assert 0 <= value(m, "vllm:kv_cache_usage_perc") <= 1
    assert {s.labels["model_name"] for s in m["vllm:num_requests_running"].samples} == {"smollm2"}
    ttft = m["vllm:time_to_first_token_seconds"]
    count = value(m, ttft.name, ttft.name + "_count")
    assert count >= 2 and value(m, ttft.name, ttft.name + "_sum") > 0
    inf = [s for s in ttft.samples if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
    assert [s.value for s in inf] == [count]
    buckets = [s.value for s in ttft.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert value(m, "vllm:time_per_output_token_seconds", "vllm:time_per_output_token_seconds_count") >= 6
    assert value(m, "vllm:generation_tokens", "vllm:generation_tokens_total") >= 8
    (lora,) = m["vllm:lora_requests_info"].samples
    assert set(lora.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}


def test_prefix_cache_hits_show_in_the_metrics_and_reset_forgets_them(server):
    def hits():
        return value(scrape(server), "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")

    first = chat(server, "What is a portolan chart?")
    h0 = hits()
    again = chat(server, "What is a portolan chart?")
    h1 = hits()
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    assert h1 - h0 >= 128  # the system prompt's blocks, at a multiple of 64 tokens
    r = httpx.post(server.url + "/reset_prefix_cache")
    assert r.status_code == 200
    third = chat(server, "What is a portolan chart?")
    assert hits() == h1 and third["choices"][0]["message"] == first["choices"][0]["message"]
    m = scrape(server)
    rate = value(m, "vllm:gpu_prefix_cache_hit_rate")
    assert rate == value(m, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") / value(
        m, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total")


def test_a_request_larger_than_the_context_of_a_small_budget_gets_400(model, smollm2_tokenizer):
    s = AppServer(create_app(model, smollm2_tokenizer, model_name="smollm2", context=256,
                             kv_cache_memory="256tokens"))
    try:
        r = httpx.post(s.url + "/v1/completions", timeout=60,
                       json={"model": "smollm2", "prompt": "map " * 200, "max_tokens": 100})
        assert r.status_code == 400 and "context length is 256" in r.json()["error"]["message"]
        ok = httpx.post(s.url + "/v1/completions", timeout=60, json={"model": "smollm2", "prompt": "A map",
                                                                     "max_tokens": 3})
        assert ok.status_code == 200
    finally:
        s.close()


@pytest.mark.parametrize("options, message", [
    ({"kv_cache_memory": "512tokens", "context": 1024}, "kv_cache_memory '512tokens' holds 512 tokens, fewer than"),
    ({"kv_cache_memory": "a lot"}, "kv_cache_memory must be bytes"),
    ({"max_prefill_chunk": 0}, "max_prefill_chunk must be at least 64 tokens, got 0"),
])
def test_engine_options_that_cannot_work_fail_at_start(model, smollm2_tokenizer, options, message):
    with pytest.raises(ValueError, match=message):
        create_app(model, smollm2_tokenizer, **options)


@pytest.mark.parametrize("flags, message", [
    (["--max-prefill-chunk", "0"], "max_prefill_chunk must be at least 64 tokens, got 0"),
    (["--kv-cache-memory", "100tokens"], "holds 96 tokens, fewer than one request of the context length 4096"),
    (["--lora", "sql"], "--lora takes NAME=DIR, got 'sql'"),
    (["--lora", "a=x", "a=y"], "the adapter name 'a' is given twice"),
    (["--lora", "a=/nonexistent/adapter"], "adapter_config.json"),
])
def test_serve_cli_refuses_bad_engine_flags_with_a_clear_message(smollm2_gguf, flags, message):
    p = subprocess.run([sys.executable, "-m", "camelid.cli", "serve", "--model", str(smollm2_gguf), "--port", "0",
                        *flags], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr


def test_runtime_adapter_loading_is_off_unless_asked(server):
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]
