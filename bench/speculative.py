"""Speculative decoding speed on the default model, batch 1, greedy: plain decoding vs prompt lookup
vs a draft model, camelid and transformers, same prompts, same threads, one process.

    python bench/speculative.py [--threads 2] [--new 96] [--lookup 10] [--ngram 3] [--assistant-tokens 5]
                                [--draft bf16 | --draft layers:N] [--repeats 2]

Prompts (chat template): a repetitive one (copy code back with one fix: prompt lookup's case) and
a free-form one. The default draft is the same checkpoint in bfloat16: half the weight bytes, so
about twice the decode speed on CPUs with AVX512-BF16, and nearly always the same greedy token.
`--draft layers:N` uses the model's own first N layers (shared weights) instead; on this 135M model
that draft agrees too rarely to pay (see the printed acceptance).

Every camelid speculative run is checked token for token against plain greedy (the bench exits 1
otherwise). Verification is batched only where the model's linear layers give a row the same bits
whatever the row count (camelid.generation.speculative.rows_invariant; packed CPU linears do).
Each time is the best of --repeats runs after one short warm-up run per configuration (other
load on the machine only slows runs down).
"""

import argparse
import copy
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: transformers' GGUF loader draws bars

import torch  # noqa: E402
from torch import nn  # noqa: E402


def first_layers(model, n):
    """A LlamaForCausalLM made of the first n layers of `model`, sharing its weights."""
    from camelid import LlamaForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n
    with torch.device("meta"):
        draft = LlamaForCausalLM(config)
    draft.model.embed_tokens, draft.model.norm = model.model.embed_tokens, model.model.norm
    draft.lm_head = model.lm_head
    draft.model.layers = nn.ModuleList(model.model.layers[:n])
    return draft.eval()


def best_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


PROMPTS = {
    "repetitive": "Fix the typo in this code and show the whole corrected code:\n\nclass Stack:\n"
                  "    def __init__(self):\n        self.items = []\n\n"
                  "    def push(self, item):\n        self.items.append(item)\n\n"
                  "    def pop(self):\n        return self.itmes.pop()\n\n    def peek(self):\n"
                  "        return self.items[-1]\n\n    def is_empty(self):\n        return len(self.items) == 0\n",
    "free-form": "Explain how photosynthesis works.",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--lookup", type=int, default=10)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--assistant-tokens", type=int, default=5)
    ap.add_argument("--draft", default="bf16")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    from camelid import LlamaForCausalLM
    from camelid.formats.hub import pull
    from camelid.generation.generate import generate_tokens
    from camelid.generation.speculative import SpeculativeStats, rows_invariant, speculative_tokens
    from camelid.text.tokenizer import Tokenizer

    path = pull()
    tok = Tokenizer.from_pretrained(path)
    eos = tok.eos_token_ids
    model = LlamaForCausalLM.from_pretrained(path)
    if not rows_invariant(model, max(args.lookup, args.assistant_tokens) + 1):
        print("this machine's linear kernels round a row differently depending on the row count: speculative "
              "runs verify one decode step at a time (exact, not faster)")
    if args.draft == "bf16":  # a draft needs no row-invariance: its tokens are only proposals
        draft = LlamaForCausalLM.from_pretrained(path, dtype="bfloat16")
    else:
        draft = first_layers(model, int(args.draft.split(":")[1]))
    hf_kwargs = dict(gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **hf_kwargs).eval()
    if args.draft == "bf16":
        hf_draft = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.bfloat16,
                                                                     **hf_kwargs).eval()
    else:
        hf_draft = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=torch.float32, num_hidden_layers=int(args.draft.split(":")[1]), **hf_kwargs).eval()
    hf_draft.generation_config.num_assistant_tokens = args.assistant_tokens
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"

    def plain(m):
        return lambda ids, n: ([int(s.tokens) for s in generate_tokens(m, ids, max_new_tokens=n, eos_token_ids=eos)],
                               None)

    def spec(**drafter):
        def run(ids, n):
            stats = SpeculativeStats()
            out = [int(s.tokens) for s in speculative_tokens(model, ids, max_new_tokens=n, eos_token_ids=eos,
                                                             stats=stats, **drafter)]
            return out, stats
        return run

    def hf_run(**kwargs):
        def run(ids, n):
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos[0], **kwargs)
            new = out[0, ids.shape[1]:].tolist()
            ends = [i for i, t in enumerate(new) if t in eos]
            return (new[:ends[0] + 1] if ends else new), None  # transformers pads after the EOS
        return run

    runs = {"camelid greedy": plain(model),
            "camelid prompt lookup": spec(prompt_lookup_num_tokens=args.lookup, max_ngram_size=args.ngram),
            f"camelid draft {args.draft}": spec(draft_model=draft, num_assistant_tokens=args.assistant_tokens),
            "transformers greedy": hf_run(),
            "transformers prompt lookup": hf_run(prompt_lookup_num_tokens=args.lookup,
                                                 max_matching_ngram_size=args.ngram),
            f"transformers assistant {args.draft}": hf_run(assistant_model=hf_draft)}
    print(f"default model, float32, {args.threads} threads, up to {args.new} new tokens, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; lookup k={args.lookup} n<={args.ngram}, draft {args.draft} "
          f"k={args.assistant_tokens}; best of {args.repeats}")
    for prompt_name, text in PROMPTS.items():
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt")
        results = {}
        for name, run in runs.items():
            if prompt_name == next(iter(PROMPTS)):
                run(ids, 24)  # warm-up, once: the kernels for each row count get set up
            seconds, (out, stats) = best_time(lambda: run(ids, args.new), args.repeats)
            results[name] = (len(out) / seconds, out, stats)
        ref = results["camelid greedy"][1]
        print(f"\n{prompt_name} prompt ({ids.shape[1]} tokens), {len(ref)} new tokens")
        print(f"{'':36} {'tok/s':>7} {'speedup':>8} {'acceptance':>11} {'forwards':>9}  same tokens")
        for name, (rate, out, stats) in results.items():
            base = results["transformers greedy" if name.startswith("transformers") else "camelid greedy"][0]
            acc = f"{stats.acceptance_rate:11.2f}" if stats else f"{'':11}"
            fwd = f"{stats.target_forwards:9d}" if stats else f"{'':9}"
            print(f"{name:36} {rate:7.1f} {rate / base:7.2f}x {acc} {fwd}  {out == ref}")
        ours, theirs = results["camelid greedy"][0], results["transformers greedy"][0]
        for kind in ("prompt lookup", f"draft {args.draft}"):
            hf_name = "transformers " + kind.replace("draft", "assistant")
            print(f"camelid / transformers, {kind}: {results['camelid ' + kind][0] / results[hf_name][0]:.2f}x "
                  f"(greedy: {ours / theirs:.2f}x)")
        if any(out != ref for name, (_, out, stats) in results.items() if stats):
            raise SystemExit("a camelid speculative run differs from plain greedy")


if __name__ == "__main__":
    main()
