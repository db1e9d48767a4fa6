"""lm-evaluation-harness on camelid: the harness's tasks scored by camelid's batched forward and
batched generation.

    python -m camelid.evaluate.harness --model camelid --model_args pretrained=PATH,batch_size=8 --tasks hellaswag
    camelid eval PATH --tasks hellaswag,arc_easy --limit 100
    simple_evaluate(model="camelid", model_args={"pretrained": PATH}, tasks=[...])   # after importing this module

The harness finds models in its registry and has no plugin entry point, so importing this module
registers the model (`@register_model("camelid")`); `python -m camelid.evaluate.harness` takes exactly
the arguments of the `lm_eval` command and runs it after that import.

The three request types of lm_eval.api.model.LM:
  loglikelihood(context, continuation) -> (sum of log p(continuation tokens | context), all greedy?)
  loglikelihood_rolling(text)          -> sum of log p of every token of text, in windows of max_length
  generate_until(context, gen_kwargs)  -> the text generated until a stop string, EOS or max_gen_toks

Tokens are chosen as the harness's transformers backend (`--model hf`) chooses them, so the two
give the same scores: a continuation's tokens are those of encode(context + continuation) after
the first len(encode(context)) (trailing spaces of the context move to the continuation); an
empty context is the BOS token (EOS without one); inputs longer than max_length lose tokens on
the left. Rows are scored in left-padded batches, which camelid computes exactly as each row alone.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

import lm_eval.models  # noqa: F401  the harness's own models first: it lists them only into an empty registry
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from camelid.formats.hub import DEFAULT_MODEL
from camelid.generation.generate import generate_tokens
from camelid.generation.sampling import SamplingParams
from camelid.hf_compat import LlamaForCausalLM
from camelid.text.tokenizer import Tokenizer

# gen_kwargs a task may set besides until / max_gen_toks / do_sample / temperature
SAMPLING_KEYS = {"top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size", "seed"}
logger = logging.getLogger(__name__)
LM_HEAD_CHUNK = 1024  # positions per lm_head product when scoring: bounds the [positions, vocab] logits


@register_model("camelid")
class CamelidLM(LM):
    """The model arguments (`--model_args k=v,...`) are transformers' / the hf backend's names."""

    def __init__(self, pretrained=None, tokenizer=None, dtype=None, device=None, batch_size=1,
                 max_length: int | None = None, max_gen_toks: int = 256, load_in_8bit: bool = False,
                 load_in_4bit: bool = False, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"camelid model_args: unknown {', '.join(f'{k}={v!r}' for k, v in unknown.items())}; "
                             f"known: pretrained, tokenizer, dtype, device, batch_size, max_length, max_gen_toks, "
                             f"load_in_8bit, load_in_4bit, add_bos_token, prefix_token_id")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        if isinstance(pretrained, LlamaForCausalLM):  # an already loaded model (the Python API)
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer: pass tokenizer= (a Tokenizer or a path)")
            self.model, self.name = pretrained, type(pretrained).__name__
        else:
            self.model = LlamaForCausalLM.from_pretrained(pretrained, dtype=dtype, device=pick_device(device),
                                                          load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
            self.name = str(pretrained) if pretrained is not None else DEFAULT_MODEL
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else \
            Tokenizer.from_pretrained(tokenizer if tokenizer is not None else pretrained)
        self.model.eval()
        self._device = self.model.device
        self.max_length = _positive_int("max_length", max_length if max_length is not None
                                        else self.model.config.max_position_embeddings)
        self.add_bos_token = add_bos_token
        if add_bos_token is not None:
            self.tokenizer.add_bos_token = add_bos_token
        tk = self.tokenizer
        self.prefix_token_id = prefix_token_id if prefix_token_id is not None else (
            tk.bos_token_id if tk.bos_token_id is not None else tk.eos_token_id)
        if self.prefix_token_id is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token: pass prefix_token_id=")
        self.prefix_text = tk.decode([self.prefix_token_id])
        self.pad_token_id = tk.pad_token_id if tk.pad_token_id is not None else self.prefix_token_id
        self.eos_token_ids = sorted(set(tk.eos_token_ids) | set(self.model.config.eos_token_ids))

    # ------------------------------------------------------------------ tokens

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """As the hf backend: the tokenizer's special tokens (or add_bos_token), but never a second
        BOS in front of text that already starts with it."""
        if add_special_tokens is None:
            add_special_tokens = (False if self.prefix_text and text.startswith(self.prefix_text) else
                                  self.add_bos_token if self.add_bos_token is not None else True)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens), split where the context's own encoding ends, so a
        word that spans the boundary is tokenized as in the whole text."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            return (cont[:1], cont[1:]) if cont[:1] == [self.prefix_token_id] else ([self.prefix_token_id], cont)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]], progress: bool = True) -> list[tuple[float, bool]]:
        """(context, continuation) token pairs -> (sum of the continuation's log-probabilities,
        whether each continuation token is the most likely one).

        The model reads (context + continuation)[:-1], cut to its last max_length tokens. Requests
        with the same input (the choices of a multiple-choice question that differ only in their
        last token) share one forward. Inputs go longest first, in left-padded batches."""
        inputs = defaultdict(list)  # model input -> the requests that read their answer off it
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("a continuation encodes to no tokens: nothing to score")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length {self.max_length}")
            inputs[tuple((ctx + cont)[-(self.max_length + 1):-1])].append(i)
        order = sorted(inputs, key=len, reverse=True)
        results = [None] * len(pairs)
        for b in tqdm(range(0, len(order), self.batch_size), desc="camelid loglikelihood", disable=not progress):
            batch = order[b:b + self.batch_size]
            ids, mask = self.left_pad([list(x) for x in batch])
            x, _ = self.model.model(ids, attention_mask=mask)  # (B, T, C): final-normed hidden states
            for row, inp in enumerate(batch):
                for i in inputs[inp]:
                    cont = torch.tensor(pairs[i][1], device=x.device)
                    results[i] = self.continuation_logprob(x[row, -len(cont):], cont)
        return results

    def continuation_logprob(self, h: torch.Tensor, cont: torch.Tensor) -> tuple[float, bool]:
        """h (N, C): the hidden states that predict the N tokens of cont."""
        total, greedy = 0.0, True
        for s in range(0, len(cont), LM_HEAD_CHUNK):
            logp = self.model.lm_head(h[s:s + LM_HEAD_CHUNK]).float().log_softmax(-1)  # (n, V)
            target = cont[s:s + LM_HEAD_CHUNK]
            total += float(logp.gather(-1, target[:, None]).sum())
            greedy = greedy and bool((logp.argmax(-1) == target).all())
        return total, greedy

    def left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self.score([self.encode_pair(*req.args) for req in requests], progress=not disable_tqdm)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every token of each text scored once: the first window conditions on the prefix token,
        each later one on the max_length tokens before it (ending where its predictions end)."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            for window in rolling_windows(self.encode(req.args[0]), self.prefix_token_id, self.max_length):
                windows.append(window)
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self.score(windows, progress=not disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same gen_kwargs run together, longest prompt first, batch_size rows
        at a time (each row's tokens do not depend on its neighbours)."""
        groups = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="camelid generate_until", disable=disable_tqdm)
        for indices in groups.values():
            until, max_gen_toks, params = self.generation_args(requests[indices[0]].args[1])
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in max_length "
                                 f"{self.max_length}")
            prompts = {i: self.encode(requests[i].args[0])[-room:] for i in indices}
            order = sorted(indices, key=lambda i: len(prompts[i]), reverse=True)
            for b in range(0, len(order), self.batch_size):
                batch = order[b:b + self.batch_size]
                for i, text in zip(batch, self.generate([prompts[i] for i in batch], until, max_gen_toks, params)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def generation_args(self, gen_kwargs: dict) -> tuple[list[str], int, SamplingParams]:
        """The harness's gen_kwargs (transformers' names) -> stop strings, token budget, sampler."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        budget = [kwargs.pop(k, None) for k in ("max_gen_toks", "max_new_tokens")]  # the first given wins
        max_gen_toks = next((b for b in budget if b is not None), self.max_gen_toks)
        temperature = float(kwargs.pop("temperature", 0.0))
        do_sample = kwargs.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        unknown = set(kwargs) - SAMPLING_KEYS
        if unknown:
            raise ValueError(f"gen_kwargs {', '.join(sorted(unknown))} not supported by camelid; known: until, "
                             f"max_gen_toks, do_sample, temperature, {', '.join(sorted(SAMPLING_KEYS))}")
        if do_sample and "top_k" not in kwargs:
            kwargs["top_k"] = 50  # transformers' default when sampling, which the hf backend gets
        params = SamplingParams(do_sample=do_sample, temperature=temperature if do_sample else 0.0, **kwargs)
        return [s for s in until if s], _positive_int("max_gen_toks", max_gen_toks), params

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], until: list[str], max_gen_toks: int,
                 params: SamplingParams) -> list[str]:
        """One batch through camelid.generation.generate.generate_tokens. A row leaves the batch at EOS, at
        max_gen_toks or as soon as its text holds a stop string; its text ends before the first one."""
        ids, mask = self.left_pad(prompts)
        tokens: list[list[int]] = [[] for _ in prompts]
        done: set[int] = set()  # also generate_tokens' `halted`: rows a stop string ended leave the batch
        for step in generate_tokens(self.model, ids, mask, params=params, max_new_tokens=max_gen_toks,
                                    eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id, halted=done):
            for r, token in enumerate(step.tokens.tolist()):
                if r in done:
                    continue
                if step.reasons[r] == "stop":  # an EOS id: not part of the text
                    done.add(r)
                    continue
                tokens[r].append(token)
                if step.reasons[r] == "length" or \
                        any(s in self.tokenizer.decode(tokens[r], skip_special_tokens=True) for s in until):
                    done.add(r)
            if len(done) == len(prompts):
                break
        return [cut_at_stop(self.tokenizer.decode(t, skip_special_tokens=True), until) for t in tokens]

    # ------------------------------------------------------------------ what the harness reads

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype)}


def rolling_windows(tokens: list[int], prefix: int, max_length: int):
    """(context, continuation) pairs that score every token once: seq = [prefix] + tokens, and each
    window predicts up to max_length tokens of seq from the max_length tokens before its last one."""
    seq = [prefix] + tokens
    for start in range(1, len(seq), max_length):
        end = min(start + max_length, len(seq))
        yield seq[max(0, end - 1 - max_length):start], seq[start:end]


def pick_device(device) -> str:
    """As the hf backend: CUDA when there is one and no device is named, and the CPU for a CUDA
    device on a machine without CUDA (the harness's command line passes "cuda:0" by default)."""
    if device is not None and not (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return str(device)
    if device is not None:
        logger.warning("device %r: CUDA is not available here, so the model runs on the CPU", device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the earliest stop string."""
    return text[:min([i for s in until if (i := text.find(s)) != -1], default=len(text))]


def _positive_int(name: str, value) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        hint = " (camelid has no automatic batch size: pass a number)" if str(value).startswith("auto") else ""
        raise ValueError(f"{name} must be a positive integer, got {value!r}{hint}")
    return value


# ---------------------------------------------------------------------- running the harness

def evaluate(model=None, tasks=(), include_path=None, limit=None, num_fewshot=None, batch_size: int = 1,
             log_samples: bool = False, **model_args) -> dict:
    """lm_eval.simple_evaluate on camelid: `model` a name, path or loaded LlamaForCausalLM;
    `include_path` a folder of task YAML files (tasks of your own, next to the harness's)."""
    from lm_eval import simple_evaluate

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    manager = task_manager(tasks, include_path)
    lm = CamelidLM(pretrained=model, batch_size=batch_size, **model_args)
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=log_samples)


def task_manager(tasks: list[str], include_path=None):
    """The harness's TaskManager for `tasks`. Indexing the harness's own ~15,000 task files takes
    half a minute, so when include_path holds every task asked for, only it is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"include_path {str(include_path)!r} is not a folder")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        where = f"the harness's tasks or {include_path}" if include_path is not None else "the harness's tasks"
        raise ValueError(f"unknown task(s) {', '.join(missing)}: not in {where}")
    return manager


def report(results: dict, output=None) -> str:
    """The harness's results table; with `output`, the results also written there as JSON."""
    from lm_eval.utils import handle_non_serializable, make_table

    from camelid.atomic import atomic_write_text

    if output is not None:
        atomic_write_text(Path(output), json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    return make_table(results)


def main(argv: list[str] | None = None) -> None:
    """The `lm_eval` command, with camelid registered: `python -m camelid.evaluate.harness --model camelid ...`."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + (sys.argv[1:] if argv is None else list(argv))
    cli_evaluate()


if __name__ == "__main__":
    main()
