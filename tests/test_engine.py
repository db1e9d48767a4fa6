"""The continuous-batching engine (camelid.generation.engine): requests that join and leave a running batch
get exactly what they get alone; cancel frees the slot; limits and bad requests are refused."""

import threading
import time

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.generation.engine import Engine, EngineStopped, QueueFull
from camelid.generation.sampling import SamplingParams
from camelid.transforms.packed import can_pack, pack


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    return pack(m) if can_pack(m) else m


def alone(model, prompt, n, **kw):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, **kw)
    return out[0, len(prompt):].tolist()


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def run_all(engine, jobs, stagger=0.01):
    """Submit (prompt, max_tokens, kwargs) jobs from threads, staggered; return (tokens, reason) each."""
    results = [None] * len(jobs)

    def run(i, prompt, n, kw):
        time.sleep(stagger * i)
        results[i] = engine.generate(prompt, n, **kw)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.mark.parametrize("context", [256, 64], ids=["roomy", "tight"])
def test_greedy_output_equals_each_request_alone(model, context):
    """More requests than slots, joining at different times; a tight context forces the rows to
    shift left and right in the cache. Every greedy output equals the request run alone."""
    ps = prompts(12)
    lengths = [int(n) for n in torch.randint(1, 20, (12,), generator=torch.Generator().manual_seed(1))]
    engine = Engine(model, max_batch=4, context=context).start()
    try:
        results = run_all(engine, [(p, n, {}) for p, n in zip(ps, lengths)])
    finally:
        engine.stop()
    for p, n, (tokens, reason) in zip(ps, lengths, results):
        assert tokens == alone(model, p, n) and reason == "length"
    assert engine.stats["finished"] == 12 and engine.running == 0


def test_seeded_sampling_equals_alone_and_eos_stops(model):
    p = prompts(1, seed=5)[0]
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20, seed=7)
    expected = alone(model, p, 15, do_sample=True, temperature=0.8, top_k=20, seed=7)
    engine = Engine(model, max_batch=2).start()
    try:
        (tokens, reason), = run_all(engine, [(p, 15, {"params": params})])
        assert tokens == expected
        eos = expected[3]
        (tokens, reason), = run_all(engine, [(p, 15, {"params": params, "eos_token_ids": [eos]})])
        assert tokens == expected[:expected.index(eos) + 1] and reason == "stop"
        (tokens, reason), = run_all(engine, [(p, 15, {"params": params, "eos_token_ids": [eos], "min_tokens": 15})])
        assert len(tokens) == 15 and eos not in tokens
    finally:
        engine.stop()


def test_logprobs_are_reported(model):
    engine = Engine(model, max_batch=2).start()
    events = []
    done = threading.Event()
    engine.submit(prompts(1)[0], 3, logprobs=2, emit=lambda e: (events.append(e), e.finish_reason and done.set()))
    done.wait(60)
    engine.stop()
    tokens = [e for e in events if e.token is not None]
    assert len(tokens) == 3 and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in tokens)
    assert all(e.top_logprobs[0][0] == e.token for e in tokens)  # greedy: the chosen one is the most likely


def test_cancel_frees_the_slot_at_the_next_step(model):
    engine = Engine(model, max_batch=1, context=256).start()
    first = threading.Event()
    finished = []

    def emit(e):
        if e.token is not None:
            first.set()
        if e.finish_reason:
            finished.append(e.finish_reason)

    handle = engine.submit(prompts(1)[0], 200, emit=emit)
    assert first.wait(60)
    engine.cancel(handle)
    tokens, reason = engine.generate(prompts(1, seed=3)[0], 4)  # gets the only slot once it is freed
    engine.stop()
    assert finished == ["abort"] and len(handle.generated) < 200 and reason == "length"
    assert engine.stats["aborted"] == 1 and engine.running == 0


def test_queue_limit_and_shutdown(model):
    engine = Engine(model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(3):
        engine.submit(prompts(1)[0], 4)  # one would take the free slot, two wait
    with pytest.raises(QueueFull, match="max_queue 2"):
        engine.submit(prompts(1)[0], 4)
    engine.start()
    engine.stop(drain=False)
    with pytest.raises(EngineStopped):
        engine.submit(prompts(1)[0], 4)


@pytest.mark.parametrize("prompt, n, kw, match", [
    ([], 4, {}, "prompt is empty"),
    ([1, 2], 0, {}, "max_tokens must be at least 1"),
    ([1] * 250, 10, {}, "exceeds the context length 256"),
    ([1, 999], 4, {}, "token id 999 is outside the vocabulary"),
    ([1, 2], 4, {"logprobs": 50}, "top_n must be an int in"),
    ([1, 2], 4, {"params": SamplingParams(logit_bias={5000: 1.0})}, "logit_bias"),
])
def test_bad_requests_are_refused_before_queueing(model, prompt, n, kw, match):
    engine = Engine(model, max_batch=1)
    with pytest.raises(ValueError, match=match):
        engine.submit(prompt, n, **kw)
    assert engine.waiting.empty() and engine.stats["requests"] == 0


def test_total_token_limit(model):
    engine = Engine(model, max_batch=2, max_total_tokens=50)  # not started: bookings stay
    engine.submit([1] * 10, 20)  # 30 booked
    with pytest.raises(QueueFull, match="30 tokens are booked"):
        engine.submit([1] * 10, 11)
    engine.submit([1] * 10, 10)  # exactly 50
    with pytest.raises(ValueError, match="exceeds the server's total token limit 50"):
        Engine(model, max_total_tokens=50).submit([1] * 30, 21)
    engine.start()
    engine.stop(drain=True)
    assert engine.booked == 0 and engine.stats["finished"] == 2


@pytest.mark.parametrize("bad", [
    SamplingParams(do_sample=True, temperature=1e-3, logit_bias={5: 1e38}),  # logits overflow to inf: NaN probs
    SamplingParams(do_sample=True, temperature=0.5, logit_bias={5: 3e38, 6: 3e38}),
], ids=["bias-over-temperature", "two-huge-biases"])
def test_a_request_whose_sampling_fails_ends_alone(model, bad):
    """Issue 19, finding 2: one request's sampling values that make its distribution non-finite
    end that request with "error"; the requests decoding beside it finish as they would alone."""
    ps = prompts(5, seed=3)
    engine = Engine(model, max_batch=6).start()
    try:
        jobs = [(p, 12, {}) for p in ps[:4]] + [(ps[4], 12, {"params": bad})]
        results = run_all(engine, jobs, stagger=0.0)
        for p, (tokens, reason) in zip(ps[:4], results[:4]):
            assert tokens == alone(model, p, 12) and reason == "length"
        tokens, reason = results[4]
        assert reason.startswith("error") and "non-finite" in reason
        (tokens, reason), = run_all(engine, [(ps[0], 5, {})])  # the engine keeps serving
        assert tokens == alone(model, ps[0], 5) and reason == "length"
    finally:
        engine.stop()


@pytest.mark.parametrize("t", [1e-39, 5e-324, 1e-6])
def test_a_vanishing_temperature_decodes_greedily(model, t):
    """A temperature under 1e-5 (a subnormal one included) is greedy decoding, as in vLLM: logits / t
    would overflow to inf, and the distribution is the argmax's to within float32 anyway."""
    p = prompts(1, seed=4)[0]
    assert SamplingParams(do_sample=True, temperature=t).greedy
    assert alone(model, p, 8, do_sample=True, temperature=t, seed=1) == alone(model, p, 8)
    engine = Engine(model, max_batch=2).start()
    try:
        (tokens, reason), = run_all(engine, [(p, 8, {"params": SamplingParams(do_sample=True, temperature=t)})])
        assert tokens == alone(model, p, 8) and reason == "length"
    finally:
        engine.stop()


def test_begin_shutdown_refuses_new_requests_and_aborts_the_rest_at_the_grace(model):
    """Issue 19, finding 4: SIGTERM's shutdown lets running requests go on for a grace, then ends
    them (and those still waiting) with an "abort" event instead of leaving them cut."""
    engine = Engine(model, max_batch=1, context=256).start()
    ends, first = [], threading.Event()

    def emit(e):  # called on the engine thread: 10 ms a token makes the request outlast the grace
        if e.token is not None:
            first.set()
            time.sleep(0.01)
        if e.finish_reason:
            ends.append(e.finish_reason)

    running = engine.submit(prompts(1)[0], 200, min_tokens=200, emit=emit)
    waiting = engine.submit(prompts(1, seed=5)[0], 200, emit=emit)  # no free slot: it waits
    assert first.wait(60)
    t = time.monotonic()
    engine.begin_shutdown(grace=0.3)
    with pytest.raises(EngineStopped, match="shutting down"):
        engine.submit(prompts(1)[0], 4)
    while len(ends) < 2 and time.monotonic() - t < 30:
        time.sleep(0.01)
    engine.begin_shutdown(grace=0)  # a second call changes nothing
    engine.stop()
    assert ends == ["abort", "abort"] and 0.3 <= time.monotonic() - t
    assert 0 < len(running.generated) < 200 and waiting.generated == [] and engine.running == 0


@pytest.mark.slow
def test_prompts_joining_a_running_engine_decode_as_alone_on_the_default_model(smollm2_gguf):
    """Prompts that join while others decode are prefilled at the engine's current slot; that
    prefill must be the one a prompt alone gets (the PyTorch layers), not the fused decode step
    (whose float order differs by a few ulps, enough to flip the default model's near ties: 10 of
    16 outputs differed before)."""
    import random

    m = LlamaForCausalLM.from_pretrained(smollm2_gguf)
    ps = [[1, 2, 3] + prompts(1, seed=i)[0][:6] for i in range(16)]
    want = [alone(m, p, 24, min_new_tokens=24) for p in ps]
    engine = Engine(m, max_batch=8).start()
    try:
        rng, results = random.Random(1), [None] * 16
        delays = [rng.random() * 0.3 for _ in ps]

        def run(i):
            time.sleep(delays[i])
            results[i] = engine.generate(ps[i], 24, min_tokens=24, eos_token_ids=m.config.eos_token_ids)[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        engine.stop()
    assert [i for i in range(16) if results[i] != want[i]] == []
