"""/v1/completions as the OpenAI legacy API defines it and lm-eval's API models use it: echo with
every prompt token's logprob and text_offset, batched prompts (strings, token-id lists), and the
tokenizer routes (/tokenize, /detokenize, /tokenizer_info) lm-eval's remote tokenizer probes; then
lm-eval's `local-completions` model scoring a multiple-choice task through the server with the
accuracies and loglikelihoods of `camelid eval` (CamelidLM) on the same weights."""

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from camelid import LlamaForCausalLM  # noqa: E402
from camelid.serve.app import create_app  # noqa: E402
from netutil import AppServer  # noqa: E402


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return LlamaForCausalLM.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def server(model, smollm2_tokenizer):
    """A float32 KV cache: the default float16 one rounds keys and values, which moves the default
    model's logprobs by ~0.01 (its int8-activation kernels turn any perturbation into that much:
    bfloat16 keys move them as much); scoring wants the logits of `camelid eval` to the bit."""
    s = AppServer(create_app(model, smollm2_tokenizer, model_name="smollm2", max_batch=4, max_prefill_chunk=64,
                             kv_cache="float32"))
    yield s
    s.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def prompt_logprobs(model, ids):
    """float64 log-softmax of the model's own logits over a whole prompt: token i's logprob given those before it."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = logits.log_softmax(-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))], lp


def test_echo_returns_the_prompt_with_each_tokens_logprob_and_offset(client, model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "The capital of France is Paris, and the capital of Italy is " + "Rome. " * 30  # > one 64-token chunk
    ids = tok.encode(text)
    want, lp = prompt_logprobs(model, ids)
    r = client.completions.create(model="smollm2", prompt=text, max_tokens=1, echo=True, logprobs=1, temperature=0)
    (c,) = r.choices
    got = c.logprobs
    assert c.text.startswith(text) and len(got.tokens) == len(ids) + 1
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    worst = max(abs(a - b) for a, b in zip(got.token_logprobs[1:len(ids)], want))
    assert worst < 1e-4, worst  # the same float32 computation, chunked: only float32's log-softmax rounding
    assert got.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    # text_offset: where each token's text begins in the returned text
    assert got.text_offset[0] == 0 and got.text_offset == sorted(got.text_offset)
    for i in range(len(ids)):
        assert c.text[got.text_offset[i]:].startswith(got.tokens[i])
    # top-1 of a prompt position is the model's argmax there
    for i in (1, 5, len(ids) - 1):
        (best,) = got.top_logprobs[i].values()
        assert best == pytest.approx(lp[i - 1].max().item(), abs=1e-4)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1


def test_without_echo_the_offsets_count_from_the_answer(client):
    r = client.completions.create(model="smollm2", prompt="One, two, three,", max_tokens=6, logprobs=2,
                                  temperature=0)
    (c,) = r.choices
    assert c.logprobs.text_offset[0] == 0 and len(c.logprobs.tokens) == 6
    assert "".join(c.logprobs.tokens) == c.text
    assert all(len(top) == 2 for top in c.logprobs.top_logprobs)


def test_batched_prompts_strings_and_token_lists_each_equal_alone(client, smollm2_tokenizer):
    prompts = ["The sky is", "Two plus two is", "A cat has"]
    alone = [client.completions.create(model="smollm2", prompt=p, max_tokens=5, temperature=0).choices[0].text
             for p in prompts]
    r = client.completions.create(model="smollm2", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [a for a in alone for _ in range(2)]
    ids = [smollm2_tokenizer.encode(p) for p in prompts]
    r = client.completions.create(model="smollm2", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == alone
    assert r.usage.prompt_tokens == sum(map(len, ids))


def test_streamed_echo_sends_the_prompt_first(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": "smollm2", "prompt": "Roses are red,", "max_tokens": 4, "echo": True, "stream": True,
            "temperature": 0}) as r:
        import json

        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                 if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    assert texts[0].startswith("Roses are red,")


def test_tokenizer_routes(server, smollm2_tokenizer):
    tok = smollm2_tokenizer
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("Hello world", add_special_tokens=False) and r["count"] == len(r["tokens"])
    assert httpx.post(server.url + "/tokenize", json={"content": "Hello world"}).json()["tokens"] == tok.encode(
        "Hello world")
    msgs = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    assert r["tokens"] == tok.apply_chat_template(msgs, add_generation_prompt=True)
    d = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert d["prompt"] == d["content"] == tok.decode(r["tokens"])
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    m = httpx.get(server.url + "/v1/models/smollm2").json()
    assert m["id"] == "smollm2" and m["object"] == "model"


@pytest.mark.parametrize("path, body, status, message", [
    ("/tokenize", {"prompt": 5}, 400, "'prompt' (or 'content') must be a string"),
    ("/detokenize", {"tokens": "abc"}, 400, "'tokens' must be a list of token ids"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": "smollm2", "prompt": ["a", ""]}, 400, "'prompt[1]' is empty"),
    ("/v1/completions", {"model": "smollm2", "prompt": [[1, 2], "x", 3]}, 400, "'prompt[2]' must be"),
    ("/v1/completions", {"model": "smollm2", "prompt": ["a"] * 65}, 400, "at most 64"),
    ("/v1/completions", {"model": "smollm2", "prompt": "a", "echo": "yes"}, 400, "'echo' must be bool"),
])
def test_bad_tokenizer_and_batch_requests(server, path, body, status, message):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status and message in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models/other").status_code == 404


@pytest.mark.slow
def test_lm_eval_local_completions_scores_as_camelid_eval(smollm2_gguf, smollm2_tokenizer, tmp_path):
    """lm-eval's own API client (local-completions: echo + logprobs, batched token-id prompts, the
    remote tokenizer over /tokenize) against `camelid eval`'s in-process model on the same weights:
    the float model (GGUF dequantized, packed), whose logits do not jump with the shape of a batch
    (the Q4_1 model's int8-activation kernels move them ~0.01 for a different padding: then only
    the accuracies could be compared)."""
    from test_evaluation import MULTIPLE_CHOICE, TASK_YAML  # the offline task both score

    from lm_eval import simple_evaluate

    from camelid.evaluate.harness import CamelidLM, task_manager
    from camelid.transforms.packed import pack

    model = pack(LlamaForCausalLM.from_pretrained(smollm2_gguf, pack=False))
    server = AppServer(create_app(model, smollm2_tokenizer, model_name="smollm2", max_batch=4, kv_cache="float32"))

    data = tmp_path / "mc.jsonl"
    import json

    data.write_text("".join(json.dumps(r) + "\n" for r in MULTIPLE_CHOICE))
    (tmp_path / "camelid_mc.yaml").write_text(f"task: camelid_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                              f"    test: {data}\ntest_split: test\n" + TASK_YAML["camelid_mc"])
    tasks = task_manager(["camelid_mc"], tmp_path)
    ours = simple_evaluate(model=CamelidLM(pretrained=model, tokenizer=smollm2_tokenizer, batch_size=4),
                           tasks=["camelid_mc"], task_manager=tasks, log_samples=True)
    try:
        api = simple_evaluate(model="local-completions", tasks=["camelid_mc"], task_manager=tasks, log_samples=True,
                              model_args=f"model=smollm2,base_url={server.url}/v1/completions,num_concurrent=2,"
                                         f"max_retries=1,tokenizer_backend=auto,batch_size=4")
    finally:
        server.close()
    a, b = ours["results"]["camelid_mc"], api["results"]["camelid_mc"]
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    worst = 0.0
    for x, y in zip(ours["samples"]["camelid_mc"], api["samples"]["camelid_mc"]):
        for (lx, gx), (ly, gy) in zip((r[0] for r in x["resps"]), (r[0] for r in y["resps"])):
            worst = max(worst, abs(lx - ly))
            assert gx == gy
    print(f"acc {b['acc,none']}, acc_norm {b['acc_norm,none']}, max |loglikelihood difference| {worst:.3g}")
    assert worst < 1e-4 and b["acc,none"] >= 0.5, worst
