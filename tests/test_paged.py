"""The engine on a paged KV cache: the block manager's bookkeeping (prefix keys, LRU eviction), and
greedy output equal to each request alone across chunked prefill, preemption and prefix-cache hits;
budgets and chunk sizes that cannot work are refused with the field named."""

import threading
import time

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.generation.blocks import BlockManager
from camelid.generation.engine import Engine, parse_budget
from camelid.transforms.packed import can_pack, pack


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=1024)).eval()
    return pack(m) if can_pack(m) else m


def alone(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def reference(model, ps, n, **kw):
    """Each prompt alone in an engine of one row, prefilled in one chunk, no prefix cache."""
    engine = Engine(model, max_batch=1, max_prefill_chunk=1024, prefix_caching=False, **kw).start()
    try:
        return [run_all(engine, [(p, n)], logprobs=True)[0] for p in ps]
    finally:
        engine.stop()


def rand(n, seed):
    return torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_all(engine, jobs, stagger=0.02, logprobs=False):
    """(prompt, max_tokens) jobs submitted from threads, staggered; the tokens of each, or with
    logprobs=True (tokens, the logprob of each): floats that show a difference of one ulp in the
    logits, where a greedy token only shows the ones that flip a near tie."""
    results = [None] * len(jobs)

    def run(i, prompt, n):
        time.sleep(stagger * i)
        done, tokens, lps = threading.Event(), [], []

        def emit(e):
            if e.token is not None:
                tokens.append(e.token)
                lps.append(e.logprob)
            if e.finish_reason is not None:
                done.set()

        engine.submit(prompt, n, min_tokens=n, logprobs=0 if logprobs else None, emit=emit)
        done.wait()
        results[i] = (tokens, lps) if logprobs else tokens

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


# ---------------------------------------------------------------------- the block manager
def test_block_manager_keys_full_prompt_blocks_and_reuses_them():
    bm = BlockManager(8, 16)
    prompt = list(range(1, 50))  # 3 full blocks + 1 token
    table = bm.allocate(bm.blocks_for(len(prompt)))
    assert table == [0, 1, 2, 3] and bm.used == 4
    bm.register(table, prompt, 3)
    # the last token's block is never a hit (its logits must be computed); a prompt that only
    # shares two blocks finds two; a change in block 0 changes every digest after it
    assert bm.lookup(prompt) == [0, 1, 2]
    assert bm.lookup(prompt[:32] + [7] * 20) == [0, 1]
    assert bm.lookup([9] + prompt[1:]) == []
    assert bm.lookup(prompt[:48]) == [0, 1]  # 48 tokens: the third block holds the last token
    bm.release(table)
    assert bm.used == 0 and bm.available == 8 and bm.lookup(prompt) == [0, 1, 2]  # still findable


def test_block_manager_evicts_the_least_recently_used_prefix_first():
    bm = BlockManager(4, 16)
    a, b = [1] * 33, [2] * 33
    ta = bm.allocate(2)
    bm.register(ta, a, 2)
    bm.release(ta)
    tb = bm.allocate(2)  # the two never-used blocks
    bm.register(tb, b, 2)
    bm.release(tb)
    assert bm.lookup(a) == ta and bm.lookup(b) == tb
    bm.take(bm.lookup(a))  # a is used again: b's blocks are now the oldest
    bm.release(ta)
    new = bm.allocate(2)
    assert sorted(new) == sorted(tb) and bm.lookup(b) == [] and bm.lookup(a) == ta
    assert bm.allocate(3) is None and bm.used == 2  # nothing taken when there are too few
    bm.reset()
    assert bm.lookup(a) == [] and bm.available == 2


def test_block_manager_held_blocks_are_not_evicted():
    bm = BlockManager(2, 16)
    t = bm.allocate(2)
    bm.register(t, [5] * 40, 2)
    assert bm.allocate(1) is None
    bm.take(bm.lookup([5] * 40))  # a second request holds both too
    bm.release(t)
    assert bm.available == 0 and bm.allocate(1) is None


# ---------------------------------------------------------------------- engine output
def test_chunked_prefill_equals_each_prompt_alone(model):
    """Prompts of 100-400 tokens prefilled 64 tokens a step beside the decode rows of the others."""
    ps = [rand(n, seed=i) for i, n in enumerate([400, 130, 257, 64, 100, 333])]
    want = reference(model, ps, 12)
    engine = Engine(model, max_batch=3, max_prefill_chunk=64).start()
    try:
        got = run_all(engine, [(p, 12) for p in ps], logprobs=True)
    finally:
        engine.stop()
    assert [i for i in range(len(ps)) if got[i] != want[i]] == []
    assert [t for t, _ in want] == [alone(model, p, 12) for p in ps]
    assert engine.stats["prompt_tokens"] >= sum(map(len, ps))


def test_preemption_when_blocks_run_out_keeps_every_output(model):
    """A budget of 320 tokens for 4 requests that each grow to 150: the last admitted are preempted
    (recomputed, their generated tokens replayed) and still decode what they decode alone."""
    ps = [rand(60, seed=10 + i) for i in range(4)]
    want = reference(model, ps, 90)
    engine = Engine(model, max_batch=4, kv_cache_memory="320tokens", max_prefill_chunk=64, context=320).start()
    try:
        got = run_all(engine, [(p, 90) for p in ps], stagger=0.0, logprobs=True)
    finally:
        engine.stop()
    assert engine.stats["preemptions"] > 0
    assert engine.stats["peak_blocks"] <= 20
    assert [i for i in range(4) if got[i] != want[i]] == []
    assert [t for t, _ in want] == [alone(model, p, 90) for p in ps]


def test_prefix_hits_reuse_blocks_and_keep_outputs(model):
    """Requests that share a 200-token system prompt: the ones after the first start their prefill
    after the cached blocks (at a multiple of 64 tokens) and get the tokens they get alone."""
    system = rand(200, seed=99)
    ps = [system + rand(5 + i, seed=200 + i) for i in range(5)]
    want = reference(model, ps, 8)
    engine = Engine(model, max_batch=2).start()
    try:
        first = run_all(engine, [(ps[0], 8)], logprobs=True)
        rest = run_all(engine, [(p, 8) for p in ps[1:]], logprobs=True)
        hits = engine.stats["prefix_hits"]
        engine.reset_prefix_cache()
        time.sleep(0.2)
        again = run_all(engine, [(ps[1], 8)], logprobs=True)
    finally:
        engine.stop()
    assert first + rest == want and again[0] == want[1]
    assert [t for t, _ in want] == [alone(model, p, 8) for p in ps]
    assert hits == 4 * 192  # 200 tokens = 12 full blocks; hits end at a multiple of 64
    assert engine.stats["prefix_hits"] == hits  # none after the reset


def test_prefix_caching_off_gives_no_hits(model):
    p = rand(150, seed=5)
    engine = Engine(model, max_batch=2, prefix_caching=False).start()
    try:
        a = engine.generate(p, 4, min_tokens=4)[0]
        b = engine.generate(p, 4, min_tokens=4)[0]
    finally:
        engine.stop()
    assert a == b == alone(model, p, 4) and engine.stats["prefix_hits"] == 0


def test_int8_kv_blocks_decode_batch_invariant(model):
    """The int8 KV cache per block: a request decodes the same tokens beside others as alone."""
    ps = [rand(n, seed=40 + n) for n in (70, 20, 130)]
    engine = Engine(model, max_batch=1, kv_cache="int8", max_prefill_chunk=64).start()
    try:
        solo = [engine.generate(p, 10, min_tokens=10)[0] for p in ps]
    finally:
        engine.stop()
    engine = Engine(model, max_batch=3, kv_cache="int8", max_prefill_chunk=64).start()
    try:
        together = run_all(engine, [(p, 10) for p in ps], stagger=0.0)
    finally:
        engine.stop()
    assert together == solo
    assert engine.cache.block_nbytes() < Engine(model, max_batch=1).cache.block_nbytes()


# ---------------------------------------------------------------------- budgets and bad values
@pytest.mark.parametrize("chunk", [0, -1, 48])
def test_a_chunk_size_below_one_aligned_chunk_is_refused(model, chunk):
    with pytest.raises(ValueError, match="max_prefill_chunk must be at least 64"):
        Engine(model, max_prefill_chunk=chunk)


def test_beside_decoding_rows_the_chunk_fits_the_measured_stall():
    """The chunk budget from the measured costs: no decode rows, the whole max_prefill_chunk;
    beside them, what takes at most STALL decode steps, in multiples of 64, at least 64."""
    from camelid.generation.scheduler import STALL, Chunk, Scheduler, Step

    s = Scheduler(300, 4, 8, 1024, max_prefill_chunk=512)
    assert s.chunk_budget(True) == 512  # nothing measured yet
    decode_only = Step([], [object()], [1], [True], [])
    s.observe(decode_only, 0.010)  # a decode step: 10 ms
    with_chunk = Step([Chunk(None, 0, 100, False)], [object()], [1], [True], [])
    s.observe(with_chunk, 0.010 + 100 * 0.0002)  # 0.2 ms a prompt token on top
    assert s.decode_cost == pytest.approx(0.010) and s.token_cost == pytest.approx(0.0002)
    assert s.chunk_budget(False) == 512
    assert s.chunk_budget(True) == 64 * int(STALL * 0.010 / 0.0002 // 64)  # 100 tokens fit: 64
    s.token_cost = 0.00001  # a fast machine: 2000 tokens fit, capped at max_prefill_chunk
    assert s.chunk_budget(True) == 512
    s.token_cost = 0.01  # a slow one: none fit, still one aligned chunk
    assert s.chunk_budget(True) == 64


def test_a_chunk_size_is_rounded_down_to_the_alignment(model):
    assert Engine(model, max_prefill_chunk=100).scheduler.max_prefill_chunk == 64


def test_a_budget_smaller_than_one_request_of_the_context_is_refused_at_start(model):
    with pytest.raises(ValueError, match="kv_cache_memory '64tokens' holds 64 tokens, fewer than one request of "
                                         "the context length 1024"):
        Engine(model, kv_cache_memory="64tokens")
    engine = Engine(model, kv_cache_memory="64tokens", context=64)
    assert engine.scheduler.blocks.num_blocks == 4
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        engine.submit(rand(60, 1), 10)
    engine.submit(rand(50, 1), 14)  # 64 tokens fit


@pytest.mark.parametrize("budget, match", [
    ("8tokens", "holds no KV block of 16 tokens"),
    ("1000tokens", "holds 992 tokens, fewer than one request"),
    ("100", "holds no KV block"),
    ("0", "must be positive"),
    ("lots", "must be bytes .* or tokens"),
    ("12 parsecs", "must be bytes .* or tokens"),
])
def test_bad_kv_cache_memory_is_refused_at_start(model, budget, match):
    with pytest.raises(ValueError, match=f"kv_cache_memory.*{match}|{match}"):
        Engine(model, kv_cache_memory=budget)


def test_parse_budget_units():
    assert parse_budget("512MiB") == (512 * 2**20, "bytes")
    assert parse_budget("2GB") == (2 * 10**9, "bytes")
    assert parse_budget(4096) == (4096, "bytes")
    assert parse_budget("65536tokens") == (65536, "tokens")


def test_a_memory_budget_buys_the_blocks_it_can_hold(model):
    one = Engine(model, kv_cache_memory="16tokens", context=16).cache.block_nbytes()
    assert Engine(model, kv_cache_memory=10 * one + one // 2, context=160).scheduler.blocks.num_blocks == 10


# ---------------------------------------------------------------------- the default model
@pytest.mark.slow
def test_chunked_prefill_prefix_hits_and_preemption_on_the_default_model(smollm2_gguf):
    """The default model's near ties flip at the first ulp of difference, so this is where a chunk,
    a prefix hit or a preemption that changes any bit shows: a 300-token system prompt shared by 6
    requests, prefilled 64 tokens a step, under a budget that forces preemptions."""
    m = LlamaForCausalLM.from_pretrained(smollm2_gguf)
    system = [1] + rand(299, seed=7)
    ps = [system + rand(3 + 2 * i, seed=70 + i) for i in range(6)]
    want = reference(m, ps, 20)
    engine = Engine(m, max_batch=4, max_prefill_chunk=64, kv_cache_memory="512tokens", context=512).start()
    try:
        got = run_all(engine, [(p, 20) for p in ps], stagger=0.05, logprobs=True)
    finally:
        engine.stop()
    assert [i for i in range(6) if got[i] != want[i]] == []
    assert [t for t, _ in want] == [alone(m, p, 20) for p in ps]
    assert engine.stats["prefix_hits"] > 0 and engine.stats["preemptions"] > 0
