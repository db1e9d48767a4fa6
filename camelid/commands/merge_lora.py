"""camelid merge-lora BASE ADAPTER OUT: fold a LoRA adapter into its base and write an HF folder
or (--to gguf) one GGUF file. `merge_lora` is the same as a function."""

from __future__ import annotations

from pathlib import Path

HELP = "fold a LoRA adapter into its base model and save it"


def merge_lora(base, adapter, out, to: str = "hf", dtype=None, gguf_dtype: str = "f16") -> Path:
    """Load `base` (any format camelid reads) with `adapter`, fold it in and write the merged
    model: an HF folder with the tokenizer (to="hf") or one GGUF file llama.cpp loads (to="gguf")."""
    from camelid.formats.gguf_write import save_gguf
    from camelid.load import load, save
    from camelid.text.gguf_vocab import tokenizer_gguf_fields
    from camelid.text.tokenizer import Tokenizer
    from camelid.transforms.lora import merge_and_unload, read_adapter_config

    if to not in ("hf", "gguf"):
        raise ValueError(f"merge_lora writes to 'hf' or 'gguf', got {to!r}")
    read_adapter_config(adapter)  # a bad adapter fails before the base is loaded
    tokenizer = Tokenizer.from_pretrained(base)
    # a float base comes back merged; a quantized one keeps the adapter beside it, dequantized here
    model = merge_and_unload(load(base, dtype=dtype, adapter=adapter, pack=False))
    if to == "gguf":
        return save_gguf(model, out, dtype=gguf_dtype, vocab=tokenizer_gguf_fields(tokenizer))
    save(model, out)
    tokenizer.save_pretrained(out)
    return Path(out)


def add_arguments(p) -> None:
    p.add_argument("base", help="the base model (name or path) the adapter was trained on")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder (--to hf) or .gguf file (--to gguf)")
    p.add_argument("--to", choices=["hf", "gguf"], default="hf")
    p.add_argument("--dtype", default=None, help="dtype of the merged weights (default float32)")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f16", help="tensor type with --to gguf")


def main(args) -> int:
    out = merge_lora(args.base, args.adapter, args.out, to=args.to, dtype=args.dtype, gguf_dtype=args.gguf_type)
    print(f"{args.base} + {args.adapter} -> {out}")
    return 0
