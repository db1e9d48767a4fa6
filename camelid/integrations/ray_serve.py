"""camelid under Ray Serve: N replicas of the engine, each serving the routes of `camelid serve`
(OpenAI's and Anthropic's APIs, /metrics), behind Ray Serve's HTTP proxy, which spreads the
requests over them and restarts a replica that dies. Scale-out by an existing engine, not a
cluster layer of camelid's own.

    from ray import serve
    from camelid.integrations.ray_serve import deployment
    serve.run(deployment(model=None, num_replicas=2, num_cpus=1, max_batch=8), route_prefix="/")
    # the OpenAI client at http://127.0.0.1:8000/v1, as with `camelid serve`

    # or from the shell:  serve run camelid.integrations.ray_serve:build num_replicas=2 max_batch=8

Each replica loads the model itself (by name or path: nothing large crosses Ray's object store)
and runs torch on num_cpus threads. Options are `camelid serve`'s (camelid.serve.app.create_app):
max_batch, max_queue, context, kv_cache_memory, max_prefill_chunk, prefix_caching, kv_cache,
adapters ({name: folder}), api_key, model_name.
"""

from __future__ import annotations


def _replica_app(model, num_cpus: int, model_name: str | None, options: dict):
    """The ASGI app of one replica, built inside it: the model, its tokenizer, a started engine."""
    import torch

    from camelid.serve.app import _load_model, create_app
    from camelid.text.tokenizer import Tokenizer

    torch.set_num_threads(max(1, int(num_cpus)))
    llm = _load_model(model)
    name = model_name or (str(model) if model is not None else "smollm2-135m-instruct")
    app = create_app(llm, Tokenizer.from_pretrained(model), model_name=name, **options)
    app.state.engine.start()  # also when the ASGI lifespan is not run (start is idempotent)
    return app


def deployment(model=None, num_replicas: int = 2, num_cpus: float = 1, model_name: str | None = None,
               **options):
    """A Ray Serve application of `num_replicas` camelid replicas (bind()-ed, for serve.run)."""
    from ray import serve

    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")

    def builder():  # a plain function: Ray calls it on each replica to get the ASGI app
        return _replica_app(model, num_cpus, model_name, options)

    class CamelidReplica:
        """One replica: the routes come from the ASGI app the builder makes."""

    replica = serve.deployment(serve.ingress(builder)(CamelidReplica), name="camelid", num_replicas=num_replicas,
                               ray_actor_options={"num_cpus": num_cpus})
    return replica.bind()


def build(args: dict):
    """`serve run camelid.integrations.ray_serve:build key=value ...` (strings from the shell)."""
    args = dict(args)
    ints = ("num_replicas", "max_batch", "max_queue", "context", "max_prefill_chunk")
    for key in ints:
        if key in args:
            args[key] = int(args[key])
    if "num_cpus" in args:
        args["num_cpus"] = float(args["num_cpus"])
    if "prefix_caching" in args:
        args["prefix_caching"] = str(args["prefix_caching"]).lower() not in ("0", "false", "no")
    return deployment(**args)
