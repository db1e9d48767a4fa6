"""The benchmark files: the default model's shipped Q4_1 GGUF, and the Q4_0 / Q8_0 that llama.cpp's
own quantizer makes from camelid's f16 export of it (cached in $CAMELID_HOME/bench/)."""

from __future__ import annotations

import ctypes
from pathlib import Path


def make_files(source: Path | None = None) -> dict[str, Path]:
    """The shipped Q4_1 and llama.cpp's own Q4_0 / Q8_0 of camelid's f16 export (cached)."""
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
    for name, ftype in (("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0), ("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)):
        files[name] = out / f"smollm2-135m-{name}.gguf"
        if not files[name].is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, 2
            tmp = files[name].with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(files["f16"]).encode(), str(tmp).encode(), ctypes.byref(params)):
                raise RuntimeError(f"llama_model_quantize failed for {name}")
            tmp.rename(files[name])
    return files
