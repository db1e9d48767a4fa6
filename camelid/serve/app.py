"""An OpenAI-compatible HTTP server on FastAPI + uvicorn, over the continuous-batching engine.

    camelid serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key K] [--max-batch 8] [--max-queue 64]

Routes: GET /health (no key needed), GET /v1/models, POST /v1/completions, POST
/v1/chat/completions (JSON, or server-sent events ending with `data: [DONE]` when "stream": true),
POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API, messages.py), GET
/metrics (Prometheus text: camelid's names and vLLM's), POST /reset_prefix_cache, and the
tokenizer's routes as vLLM and llama-server have them (POST /tokenize, /detokenize, GET
/tokenizer_info: what lm-eval's remote tokenizer probes), GET /v1/models/{id}. Errors are
OpenAI-shaped JSON (Anthropic-shaped on /v1/messages), never a 500 for bad input:

    400 the body is not JSON / not an object / nested too deep, or a field is invalid
    401 missing or wrong API key (compared in constant time; every route but /health)
    404 unknown route or model        413 body too large        429 queue full (Retry-After)
    503 shutting down

A client that disconnects has its requests cancelled: the engine frees their slots at its next
step. On SIGTERM the server stops accepting connections and requests; what is running may go on
for --shutdown-grace seconds (30), then ends with finish_reason "abort" (as vLLM names it): every
stream still gets its final chunk and [DONE], and the process exits soon after.

protocol.py checks requests and shapes answers, stream.py turns engine events into responses;
this file holds the routes and the program.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime.

import hmac
import time

from camelid.generation.engine import Engine
from camelid.serve import messages, protocol
from camelid.serve.protocol import APIError
from camelid.serve.stream import Server, respond


def create_app(model, tokenizer, model_name: str = "camelid", api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_tokens_limit: int | None = None, context: int | None = None,
               max_total_tokens: int | None = None, runtime_lora: bool = False, **engine_options):
    """The FastAPI app over one Engine; engine_options go to it (kv_cache_memory, max_prefill_chunk,
    prefix_caching, kv_cache, block_size, adapters: LoRA name -> folder). runtime_lora: POST
    /v1/load_lora_adapter may load adapters from the server's disk (off by default, as in vLLM)."""
    from fastapi import FastAPI, Request

    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, context=context, max_total_tokens=max_total_tokens,
                    **engine_options)
    server = Server(engine, tokenizer, model_name, limit=max_tokens_limit or engine.context,
                    vocab_size=model.config.vocab_size, eos=tokenizer.eos_token_ids)

    async def lifespan(app):
        engine.start()
        yield
        engine.stop(drain=False, timeout=30)  # the connections are closed: nobody reads what still runs

    app = FastAPI(title="camelid", lifespan=lifespan)
    app.state.engine = engine

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            if request.url.path != "/health" and api_key is not None:
                check_key(request, api_key)
            response = await call_next(request)
        except APIError as e:
            response = error(server, e, request)
        if "transfer-encoding" in request.headers and "content-length" in request.headers:
            # RFC 9112 6.1: a request with both may be smuggling one; the server must close the
            # connection after responding (uvicorn closes it on this header)
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error(server, e, request)

    @app.exception_handler(404)
    async def not_found(request, e):
        return error(server, APIError(404, f"no route {request.method} {request.url.path}", type="not_found_error"),
                     request)

    @app.exception_handler(405)
    async def not_allowed(request, e):
        return error(server, APIError(405, f"{request.method} is not allowed on {request.url.path}"), request)

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine._accepting else "shutting down"}

    def card(name):
        return {"id": name, "object": "model", "created": int(server.started), "owned_by": "camelid",
                "max_model_len": engine.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(model_name)] + [dict(card(a), parent=model_name, root=str(folder))
                                                                for a, folder in adapter_folders().items()]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str):
        protocol.check_model({"model": name}, model_name, engine.adapter_names)
        folders = adapter_folders()
        return dict(card(name), parent=model_name, root=str(folders[name])) if name in folders else card(name)

    def adapter_folders() -> dict:
        return dict(engine.routing.folders) if engine.routing is not None else {}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        """vLLM's admin route: {"lora_name", "lora_path"}; the adapter serves requests whose model is its name."""
        import asyncio

        if not runtime_lora:
            raise APIError(403, "loading adapters at runtime is off: start the server with --allow-runtime-lora",
                           type="permission_error")
        body = await protocol.read_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise APIError(400, "'lora_name' and 'lora_path' must be non-empty strings", "lora_name")
        if name == model_name:
            raise APIError(400, f"'lora_name' {name!r} is the served model's name", "lora_name")
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.load_adapter, name, path)
        except (OSError, ValueError) as e:
            raise APIError(400, f"cannot load adapter {name!r}: {e}", "lora_path")
        return {"status": "ok", "lora_name": name}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return protocol.tokenize(await protocol.read_body(request), server.tokenizer, engine.context)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return protocol.detokenize(await protocol.read_body(request), server.tokenizer)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = server.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": tok.chat_template, "model_max_length": engine.context,
                "vocab_size": len(tok)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(server, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat_completion(server, request)

    @app.post("/v1/messages")
    async def anthropic_messages(request: Request):
        body = await protocol.read_body(request)
        adapter = protocol.check_model(body, server.model_name, engine.adapter_names)
        return await messages.respond(server, request, body, adapter)

    @app.post("/v1/messages/count_tokens")
    async def anthropic_count_tokens(request: Request):
        body = await protocol.read_body(request)
        protocol.check_model(body, server.model_name, engine.adapter_names)
        return messages.count_tokens(server, body)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        engine.reset_prefix_cache()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from fastapi.responses import PlainTextResponse

        return PlainTextResponse(metrics_text(server), media_type="text/plain; version=0.0.4")

    return app


# ---------------------------------------------------------------------- what the routes do

def check_key(request, api_key: str) -> None:
    """Authorization: Bearer KEY (OpenAI's clients) or x-api-key: KEY (Anthropic's)."""
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key (Authorization: Bearer ... or x-api-key)",
                       type="authentication_error")


def error(server: Server, e: APIError, request=None):
    """The error response: Anthropic's shape on /v1/messages, OpenAI's elsewhere."""
    from fastapi.responses import JSONResponse

    server.counters["http_errors"] += 1
    anthropic = request is not None and request.url.path.startswith("/v1/messages")
    return JSONResponse(messages.error_body(e) if anthropic else e.body(), status_code=e.status, headers=e.headers)


async def completion(server: Server, request):
    body = await protocol.read_body(request)
    adapter = protocol.check_model(body, server.model_name, server.engine.adapter_names)
    ids, texts, lp, echo = protocol.completion_request(body, server.tokenizer)
    return await respond(server, request, body, None, chat=False, logprobs=lp is not None, top_logprobs=lp or 0,
                         prompts=list(zip(ids, texts)), echo=echo, adapter=adapter)


async def chat_completion(server: Server, request):
    body = await protocol.read_body(request)
    adapter = protocol.check_model(body, server.model_name, server.engine.adapter_names)
    r = protocol.chat_request(body, server.tokenizer)
    return await respond(server, request, body, r["prompt_ids"], chat=True, logprobs=r["logprobs"],
                         top_logprobs=r["top_logprobs"], constraint=r["constraint"], tool_mode=r["tool_mode"],
                         adapter=adapter)


def metrics_text(server: Server) -> str:
    """Prometheus' text format: camelid's own names, and the gauges, counters and histograms that
    routers and dashboards read under vLLM's names (llm-d / the Gateway API Inference Extension,
    KServe and SkyServe place requests on queue depth, running requests and KV-cache usage)."""
    engine, counters = server.engine, server.counters
    sched = engine.scheduler
    s, blocks = sched.stats, sched.blocks
    usage = blocks.used / blocks.num_blocks
    label = {"model_name": server.model_name}
    out: list[str] = []

    def metric(name, kind, help, value, labels=None):
        out.append(f"# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{_labels(labels)} {_num(value)}\n")

    def histogram(name, help, h):
        lines = [f"# HELP {name} {help}\n# TYPE {name} histogram\n"]
        lines += [f"{name}_bucket{_labels({**label, 'le': le})} {n}\n" for le, n in h.cumulative()]
        lines += [f"{name}_sum{_labels(label)} {_num(h.sum)}\n", f"{name}_count{_labels(label)} {h.count}\n"]
        out.append("".join(lines))

    metric("camelid_queue_depth", "gauge", "requests waiting for a slot", engine.waiting.qsize())
    metric("camelid_running_sequences", "gauge", "sequences in the running batch", engine.running)
    metric("camelid_requests_total", "counter", "requests accepted by the engine", s["requests"])
    metric("camelid_requests_finished_total", "counter", "requests ended by stop or length", s["finished"])
    metric("camelid_requests_aborted_total", "counter", "requests cancelled (disconnect, stop string, shutdown)",
           s["aborted"])
    metric("camelid_generated_tokens_total", "counter", "tokens generated", s["tokens"])
    metric("camelid_prompt_tokens_total", "counter", "prompt tokens prefilled", s["prompt_tokens"])
    metric("camelid_time_to_first_token_seconds_sum", "counter", "summed time to first token", s["ttft_sum"])
    metric("camelid_time_to_first_token_seconds_count", "counter", "requests with a first token", s["ttft_count"])
    metric("camelid_engine_errors_total", "counter", "engine steps that failed", s["errors"])
    metric("camelid_http_errors_total", "counter", "error responses", counters["http_errors"])
    metric("camelid_client_disconnects_total", "counter", "clients that left mid-request", counters["disconnects"])
    metric("camelid_generation_tokens_per_second", "gauge", "tokens generated per second since start",
           s["tokens"] / max(time.time() - server.started, 1e-9))
    metric("camelid_kv_cache_blocks", "gauge", "KV blocks in the paged cache", blocks.num_blocks)
    metric("camelid_kv_cache_blocks_used", "gauge", "KV blocks held by requests", blocks.used)
    metric("camelid_kv_cache_blocks_peak", "gauge", "the most KV blocks held at once since start", s["peak_blocks"])
    metric("camelid_kv_cache_block_tokens", "gauge", "tokens per KV block", blocks.block_size)
    metric("camelid_preemptions_total", "counter", "requests preempted (recomputed) when KV blocks ran out",
           s["preemptions"])
    # vLLM's names, labelled with the served model as vLLM labels them
    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", engine.running,
           label)
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
           engine.waiting.qsize(), label)
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage, label)
    metric("vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage (the older name).",
           usage, label)
    metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions.", s["preemptions"], label)
    metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", s["prompt_tokens"], label)
    metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", s["tokens"], label)
    metric("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           s["prefix_queries"], label)
    metric("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", s["prefix_hits"],
           label)
    metric("vllm:gpu_prefix_cache_hit_rate", "gauge", "Prefix-cache hit rate: hits over queried prompt tokens.",
           s["prefix_hits"] / max(s["prefix_queries"], 1), label)
    names = engine.adapter_names

    def using(handles):
        return ",".join(sorted({names[h.adapter - 1] for h in handles if 0 < h.adapter <= len(names)}))

    metric("vllm:lora_requests_info", "gauge", "Running stats on LoRA requests.", server.started,
           {"running_lora_adapters": using(list(sched.rows)), "waiting_lora_adapters": using(list(sched.waiting)),
            "max_lora": str(len(names))})
    histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", sched.ttft)
    histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", sched.itl)
    histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", sched.itl)
    histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", sched.e2e)
    return "".join(out)


def _labels(labels: dict | None) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------- the program

def serve(model=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 8,
          max_queue: int = 64, model_name: str | None = None, adapter: str | None = None,
          max_tokens_limit: int | None = None, max_total_tokens: int | None = None, context: int | None = 4096,
          nproc: int = 1, shutdown_grace: float = 30.0, **engine_options) -> None:
    """Load `model` (name or path; the default model when None) and serve it until SIGTERM/SIGINT.
    nproc > 1: tensor parallel over that many processes; rank 0 serves, the others follow.
    engine_options: kv_cache_memory, max_prefill_chunk, prefix_caching, kv_cache (camelid.generation.engine)."""
    options = dict(host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                   model_name=model_name, max_tokens_limit=max_tokens_limit, max_total_tokens=max_total_tokens,
                   context=context, shutdown_grace=shutdown_grace, engine_options=engine_options)
    if shutdown_grace < 0:
        raise ValueError(f"shutdown_grace must be >= 0 seconds, got {shutdown_grace}")
    if nproc > 1:
        from camelid.distributed import launch
        from camelid.formats import checkpoint_config
        from camelid.transforms.tp import check_plan

        if adapter is not None or engine_options.get("adapters"):
            raise ValueError("--nproc serves a float model: merge the adapter first (camelid merge-lora)")
        check_plan(checkpoint_config(model), nproc)
        launch(_serve_rank, nproc, model, options, timeout=7 * 24 * 3600)
        return
    _serve(model, adapter=adapter, **options)


def _serve_rank(rank, world, model, options):
    from camelid.load import load_tensor_parallel

    llm = load_tensor_parallel(model)
    if rank == 0:
        _serve(model, llm=llm, **options)
    else:
        engine_options = {k: v for k, v in options["engine_options"].items() if k != "runtime_lora"}
        Engine(llm, max_batch=options["max_batch"], context=options["context"],  # rank 0's cache shapes
               **engine_options).follow()


def _serve(model=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 8,
           max_queue: int = 64, model_name: str | None = None, adapter: str | None = None,
           max_tokens_limit: int | None = None, max_total_tokens: int | None = None, context: int | None = 4096,
           llm=None, shutdown_grace: float = 30.0, engine_options=None) -> None:
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise RuntimeError("camelid serve needs FastAPI and uvicorn: pip install 'camelid[serve]'")
    import uvicorn

    from camelid.text.tokenizer import Tokenizer

    llm = _load_model(model, adapter, llm)
    tokenizer = Tokenizer.from_pretrained(model)
    engine_options = engine_options or {}
    name = model_name or (str(model) if model is not None else "smollm2-135m-instruct")
    app = create_app(llm, tokenizer, model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     max_tokens_limit=max_tokens_limit, max_total_tokens=max_total_tokens, context=context,
                     **engine_options)
    engine = app.state.engine
    blocks = engine.scheduler.blocks
    print(f"camelid serve: {name}, {max_batch} slots, context {engine.context}; KV cache {blocks.num_blocks} "
          f"blocks of {blocks.block_size} tokens ({engine.cache.nbytes() / 2**20:.0f} MiB"
          f"{', ' + engine.cache.kind if engine.cache.kind else ''}), prefill chunks of "
          f"{engine.scheduler.max_prefill_chunk} tokens, prefix caching {'on' if blocks.prefix_caching else 'off'}",
          flush=True)
    _run(app, engine, host, port, shutdown_grace)


def _run(app, engine, host, port, grace: float) -> None:
    """uvicorn, whose SIGTERM/SIGINT first starts the engine's shutdown clock (Engine.begin_shutdown):
    requests end by `grace`, so uvicorn's own graceful wait (a little longer) never cuts a stream."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.begin_shutdown(grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=grace + 10)
    Server(config).run()


def _load_model(model, adapter=None, llm=None):
    """The model to serve: `llm` when given (a tensor-parallel rank's shard), else `model` through
    the one loader, with `adapter` merged in before the CPU packing."""
    if llm is not None:
        return llm
    from camelid.hf_compat import LlamaForCausalLM
    from camelid.load import load

    return load(model, adapter=adapter, model_cls=LlamaForCausalLM)
