"""camelid finetune --data D.jsonl --out DIR: LoRA (default), QLoRA (--qlora) or full (--full)
fine-tuning with checkpoints; --nproc N (or torchrun) trains FSDP over N processes."""

from __future__ import annotations

HELP = "LoRA / QLoRA / full fine-tuning on a JSONL dataset, with checkpoints"


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="base model name or path (default: smollm2-135m-instruct)")
    p.add_argument("--data", required=True, help="training JSONL: text | prompt/completion | instruction/output | messages")
    p.add_argument("--eval", default=None, help="evaluation JSONL (same shapes)")
    p.add_argument("--out", required=True, help="run folder: checkpoint-*/, final/, metrics.jsonl")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run: the latest checkpoint in --out, or the folder given")
    g = p.add_argument_group("what is trained")
    g.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    g.add_argument("--qlora", action="store_true", help="LoRA on an NF4-quantized frozen base")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", default="all-linear",
                   help="comma-separated layer names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) "
                        "or all-linear (default)")
    g.add_argument("--dtype", default=None, help="weights' dtype (default float32; bf16 autocast is --bf16)")
    g.add_argument("--nproc", type=int, default=1,
                   help="FSDP over N processes (gloo on CPU, NCCL with a GPU each); batch-size must divide by N")
    g = p.add_argument_group("data")
    g.add_argument("--max-seq-len", type=int, default=512)
    g.add_argument("--packing", action="store_true", help="pack examples into rows (no attention across them)")
    g.add_argument("--overlong", choices=["truncate", "reject", "drop"], default="truncate",
                   help="examples longer than --max-seq-len (default truncate)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--nonfinite", choices=["stop", "skip"], default="stop",
                   help="a NaN/inf loss or gradient stops the run (default) or skips that step")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--logging-steps", type=int, default=1)
    g.add_argument("--eval-steps", type=int, default=None)
    g.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (and at the end)")
    g.add_argument("--save-total-limit", type=int, default=3, help="keep the newest N checkpoints")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    g.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    import json

    import torch.distributed as dist

    from camelid.distributed import init_from_env
    from camelid.train.finetune import finetune

    targets = args.target_modules if args.target_modules == "all-linear" else \
        [t.strip() for t in args.target_modules.split(",") if t.strip()]
    options = dict(
        eval_data=args.eval, lora_r=None if args.full else args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=targets, max_seq_len=args.max_seq_len, packing=args.packing,
        overlong=args.overlong, learning_rate=args.lr, weight_decay=args.weight_decay,
        lr_scheduler_type=args.schedule, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
        num_train_epochs=args.epochs, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_grad_norm=args.max_grad_norm, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        nonfinite=args.nonfinite, seed=args.seed, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, tensorboard=args.tensorboard,
        progress=not args.no_progress)
    if args.full and args.qlora:
        raise ValueError("--qlora trains a LoRA adapter on a 4-bit base; it cannot be combined with --full")
    torchrun = init_from_env()  # under torchrun: this process is one FSDP rank
    if torchrun and args.nproc > 1:
        raise ValueError("--nproc launches its own processes; under torchrun leave it out")
    result = finetune(args.model, args.data, args.out, qlora=args.qlora, resume=args.resume, dtype=args.dtype,
                      nproc=args.nproc, **options)
    if not torchrun or dist.get_rank() == 0:
        print(json.dumps(result))
    if torchrun:
        dist.destroy_process_group()
    return 0
