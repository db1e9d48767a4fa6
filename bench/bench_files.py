"""What the benchmark scripts share: the files (the default model's shipped Q4_1 GGUF, and the
Q4_0 / Q8_0 / Q4_K_M that llama.cpp's own quantizer makes from camelid's f16 export of it, cached
in $CAMELID_HOME/bench/) and the llama.cpp measurement. SmolLM2's rows are 576 long, not a multiple
of 256, so llama.cpp's Q4_K_M of it is Q5_0 for most layers, Q4_K / Q6_K for ffn_down, Q8_0 for
the table."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path


def make_files(source: Path | None = None) -> dict[str, Path]:
    """The shipped Q4_1 and llama.cpp's own Q4_0 / Q8_0 / Q4_K_M of camelid's f16 export (cached)."""
    import llama_cpp

    from camelid.formats.hub import cache_dir, pull

    source = source or pull()

    out = cache_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    files = {"q4_1": source, "f16": out / "smollm2-135m-f16.gguf"}
    if not files["f16"].is_file():
        from camelid import LlamaForCausalLM
        from camelid.text.gguf_vocab import save_gguf

        save_gguf(LlamaForCausalLM.from_pretrained(source, dtype="float32", pack=False), files["f16"], dtype="f16",
                  tokenizer=source)
    for name, ftype in (("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0), ("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
                        ("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        files[name] = out / f"smollm2-135m-{name}.gguf"
        if not files[name].is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, 2
            tmp = files[name].with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(files["f16"]).encode(), str(tmp).encode(), ctypes.byref(params)):
                raise RuntimeError(f"llama_model_quantize failed for {name}")
            tmp.rename(files[name])
    return files


def llama_cpp_figures(ll, new: int) -> tuple[float, float, float]:
    """(time to first token s, prefill tok/s at 512 tokens, greedy decode tok/s) of a llama_cpp.Llama,
    on the same random prompts camelid.evaluate.benchmark.measure uses."""
    from camelid.evaluate.benchmark import prompts, timed

    short, long = prompts(ll.n_vocab())
    toks = short[0].tolist()
    ttft, _ = timed(lambda: (ll.reset(), ll.eval(toks)))
    pre, _ = timed(lambda: (ll.reset(), ll.eval(long[0].tolist())))
    ll.reset()
    ll.eval(toks)
    start = time.perf_counter()
    for _ in range(new):
        ll.eval([int(ll.sample(temp=0.0))])
    return ttft, long.shape[1] / pre, new / (time.perf_counter() - start)
