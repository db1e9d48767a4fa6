"""Fine-tuning in one call: load, train, save the result.

    finetune(model="smollm2-135m-instruct", data="train.jsonl", out="run/", lora_r=8)
    finetune(model, data, out, tokenizer=tok, max_steps=100)   # a model object and its tokenizer
    finetune("smollm2-135m-instruct", data, out, nproc=2)      # FSDP over 2 processes, launched here

It writes out/checkpoint-*/ as it goes (see camelid.train.trainer) and out/final/ at the end: the
adapter in peft's layout, or for full fine-tuning an HF folder, with the tokenizer either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from camelid.train import fsdp
from camelid.train.trainer import Trainer, TrainConfig
from camelid.transforms.lora import save_adapter


def finetune(model=None, data=None, out="out", tokenizer=None, qlora: bool = False, resume=None,
             dtype=None, nproc: int = 1, **options) -> dict:
    """Load `model` (a path or name; the default model when None), fine-tune on `data` (JSONL) and
    write out/checkpoint-*/ and out/final/ (the adapter in peft's layout, or a full HF folder with
    the tokenizer). qlora: the base is quantized to NF4 and frozen. nproc > 1: FSDP over that many
    processes (gloo on CPU, NCCL with a GPU each), launched here. Options: TrainConfig's fields."""
    from camelid.hf_compat import LlamaForCausalLM
    from camelid.text.tokenizer import Tokenizer

    config = TrainConfig(data=data, out=str(out), **options)  # a bad option fails before anything starts
    by_name = isinstance(model, (str, Path)) or model is None
    if nproc > 1:
        return _finetune_launched(model, data, out, qlora, resume, dtype, nproc, by_name, options)
    if tokenizer is None and not by_name:
        raise ValueError("pass tokenizer= along with a model object (a name or path brings its own)")
    tokenizer = tokenizer or Tokenizer.from_pretrained(model)
    if by_name:
        if qlora and config.lora_r is None:
            raise ValueError("qlora trains a LoRA adapter: set lora_r")
        rank, world = fsdp.rank_world()
        device = f"cuda:{torch.cuda.current_device()}" if world > 1 and torch.cuda.is_available() else None
        model = LlamaForCausalLM.from_pretrained(model, dtype=dtype, pack=False, load_in_4bit=qlora,
                                                 bnb_4bit_quant_type="nf4", device=device)
    trainer = Trainer(model, tokenizer, config)
    result = trainer.train(resume_from_checkpoint=resume)
    final = Path(out) / "final"
    plain = trainer.unsharded()  # every rank takes part; rank 0 gets the weights
    if trainer.rank == 0:
        if config.lora_r is None:
            plain.save_pretrained(final)
        else:
            save_adapter(plain, final)
        tokenizer.save_pretrained(final)
    result["final"] = str(final)
    return result


def _finetune_launched(model, data, out, qlora, resume, dtype, nproc, by_name, options) -> dict:
    """finetune(nproc=N): check what every rank would refuse, then run N processes of
    _finetune_rank and return rank 0's result."""
    import tempfile

    from camelid.distributed import launch

    if not by_name:
        raise ValueError("finetune(nproc > 1) loads the model in every process: pass a name or path, not a model object")
    if qlora:
        raise ValueError("FSDP shards float weights: QLoRA (a quantized base) runs with nproc=1")
    batch_size = options.get("batch_size", TrainConfig.batch_size)
    if batch_size % nproc:
        raise ValueError(f"batch_size {batch_size} must be a multiple of nproc {nproc}: each rank takes "
                         f"batch_size / nproc rows of every micro-batch")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        launch(_finetune_rank, nproc, dict(model=model, data=data, out=str(out), resume=resume, dtype=dtype, **options),
               str(result_file))
        return json.loads(result_file.read_text(encoding="utf-8"))


def _finetune_rank(rank, world, kwargs, result_file):
    """One FSDP rank of finetune(nproc=N); rank 0 reports the result."""
    result = finetune(**kwargs)
    if rank == 0:
        Path(result_file).write_text(json.dumps(result), encoding="utf-8")


__all__ = ["finetune"]
