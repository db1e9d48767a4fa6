"""Fine-tuning speed on the default model: camelid vs transformers + peft, same weights, same
batch, same threads, in one run.

    python bench/train.py [--threads 2] [--batch 4] [--seq 256] [--steps 4]

Each row times full optimizer steps (forward, backward, AdamW) on one fixed batch after a warm-up
step, and prints tokens/s, MFU against the measured float32/bfloat16 matmul peak of this machine
(model FLOPs: 3x forward for full fine-tuning, 2x forward for LoRA, whose frozen weights get no
gradient),
and camelid's ratio to the peer in the same configuration (> 1: camelid faster).
"""

import argparse
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def steps_per_s(model, ids, steps, bf16, forward):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import peft
    import transformers

    from camelid import LlamaForCausalLM
    from camelid.core.accounting import flops
    from camelid.formats.hub import pull
    from camelid.train.trainer import peak_matmul_flops
    from camelid.transforms.lora import apply_lora

    path = pull()
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()

    def ours(mode, gc=False):
        m = LlamaForCausalLM.from_pretrained(path, pack=False)
        if mode == "lora":
            apply_lora(m, r=16, lora_alpha=32, target_modules=TARGETS)
        else:
            m.requires_grad_(True)
        if gc:
            m.gradient_checkpointing_enable()
        return m, lambda x: m(x, labels=x).loss

    def theirs(mode, gc=False):
        m = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        if mode == "lora":
            m = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
        if gc:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if mode == "lora":
                m.enable_input_require_grads()
        return m, lambda x: m(input_ids=x, labels=x).loss

    config = LlamaForCausalLM.from_pretrained(path, pack=False).config
    f = flops(config, args.seq, args.batch, training=True)
    step_flops = f.total
    lora_flops = 2 * f.forward  # frozen weights: forward + input gradients, no weight gradients
    peaks = {False: peak_matmul_flops("cpu", torch.float32, n=2048), True: peak_matmul_flops("cpu", torch.bfloat16, n=2048)}
    print(f"{args.batch} x {args.seq} tokens per step, {args.threads} threads; matmul peak here: "
          f"float32 {peaks[False] / 1e9:.0f} GFLOP/s, bfloat16 {peaks[True] / 1e9:.0f} GFLOP/s")
    print(f"{'configuration':<34}{'camelid tok/s':>14}{'MFU':>7}{'peer tok/s':>12}{'MFU':>7}{'ratio':>7}")
    for mode, gc, bf16 in [("lora", False, False), ("lora", True, False), ("lora", False, True), ("full", False, False)]:
        built = [build(mode, gc) for build in (ours, theirs)]
        rates = [0.0, 0.0]
        for _ in range(args.rounds):  # alternate the engines, keep each one's best: less drift between them
            for i, (model, forward) in enumerate(built):
                rates[i] = max(rates[i], steps_per_s(model, ids, args.steps, bf16, forward))
        del built
        name = f"{mode}{' +grad ckpt' if gc else ''}{' bf16 autocast' if bf16 else ' float32'}"
        work = step_flops if mode == "full" else lora_flops
        mfu = [r * work / peaks[bf16] for r in rates]
        print(f"{name:<34}{rates[0] * tokens:>14.0f}{100 * mfu[0]:>6.1f}%{rates[1] * tokens:>12.0f}"
              f"{100 * mfu[1]:>6.1f}%{rates[0] / rates[1]:>6.2f}x")


if __name__ == "__main__":
    main()
