"""Training data: JSONL records -> token ids with loss labels -> (packed) rows -> batches.

One record per line, in any of these shapes:

    {"text": "..."}                                           plain text: every token is learned
    {"prompt": "...", "completion": "..."}                    only the completion is learned
    {"instruction": "...", "input": "...", "output": "..."}   only the output ("response" also works)
    {"messages": [{"role": "user", "content": "..."}, ...]}   rendered with the chat template;
                                                              only assistant turns are learned

Instruction records are chat turns (user: instruction + input, assistant: output) when the
tokenizer has a chat template, and an Alpaca-style prompt otherwise. Labels are the token ids to
learn, -100 (ignored by the loss) for prompt tokens. Packing concatenates examples into rows of
max_seq_len; the row's attention_mask holds each token's document number (1, 2, ...; 0 padding),
so attention, RoPE positions and the loss never cross from one document into the next
(camelid.core.masks.attention_plan).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100
OVERLONG = ("truncate", "reject", "drop")
ALPACA = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
MAX_ERRORS = 20  # reported per file; the count of the rest follows


class DataError(ValueError):
    """A dataset problem, with the file and line numbers of every bad record."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the token to learn at each position, IGNORE where nothing is learned
    line: int = 0  # where it came from (1-based), for messages

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------- records

def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; every bad line is reported, then nothing runs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records, errors = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            problem = record_problem(record)
            if problem:
                errors.append(f"{path}:{n}: {problem}")
            else:
                records.append((n, record))
    _raise(errors)
    if not records:
        raise DataError(f"{path}: the dataset is empty (no records)")
    return records


def _raise(errors: list[str]) -> None:
    if errors:
        more = f"\n... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise DataError(f"{len(errors)} bad record(s):\n" + "\n".join(errors[:MAX_ERRORS]) + more)


def _is_text(v) -> bool:
    return isinstance(v, str) and bool(v)


def record_problem(record) -> str | None:
    """Why `record` is not a training example, or None."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
        if not any(m["role"] == "assistant" for m in msgs):
            return "'messages' has no assistant turn (nothing to learn)"
        return None
    if "text" in record:
        return None if _is_text(record["text"]) else "'text' must be a non-empty string"
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not _is_text(record.get("completion")):
            return "'prompt' must be a string and 'completion' a non-empty string"
        return None
    if "instruction" in record:
        response = record.get("output", record.get("response"))
        if not _is_text(record["instruction"]) or not _is_text(response):
            return "'instruction' and 'output' (or 'response') must be non-empty strings"
        if not isinstance(record.get("input", ""), str):
            return "'input' must be a string"
        return None
    return f"unknown record shape (keys {sorted(record)[:6]}): expected text, prompt/completion, " \
           "instruction/output or messages"


# ---------------------------------------------------------------------- records -> examples

def _chat_example(tokenizer, messages) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation; labels on the assistant turns only. The turns are
    found by rendering each prefix: the ids up to an assistant turn (with the generation prompt)
    must be a prefix of the ids that include it, which holds for every common template."""
    ids = tokenizer.apply_chat_template(messages)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else []
        upto = tokenizer.apply_chat_template(messages[:i + 1])
        if ids[:len(before)] != before or ids[:len(upto)] != upto or len(upto) <= len(before):
            raise DataError(f"the chat template does not render messages[:{i + 1}] as a prefix of the whole "
                            "conversation, so the assistant turns cannot be located")
        labels[len(before):len(upto)] = ids[len(before):len(upto)]
    return ids, labels


def _prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tokenizer.encode(prompt, parse_special=False)  # with BOS where the tokenizer adds one
    c = tokenizer.encode(completion, add_special_tokens=False, parse_special=False)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return p + c + eos, [IGNORE] * len(p) + c + eos


def to_example(tokenizer, record: dict, line: int = 0) -> Example:
    if "messages" in record:
        ids, labels = _chat_example(tokenizer, record["messages"])
    elif "text" in record:
        return to_example(tokenizer, {"prompt": "", "completion": record["text"]}, line)
    elif "instruction" in record:
        response = record.get("output", record.get("response"))
        extra = record.get("input") or ""
        if tokenizer.chat_template:
            user = record["instruction"] + (f"\n\n{extra}" if extra else "")
            ids, labels = _chat_example(tokenizer, [{"role": "user", "content": user},
                                                    {"role": "assistant", "content": response}])
        else:
            prompt = ALPACA.format(instruction=record["instruction"], input=f"### Input:\n{extra}\n\n" if extra else "")
            ids, labels = _prompt_completion(tokenizer, prompt, response)
    else:
        ids, labels = _prompt_completion(tokenizer, record["prompt"], record["completion"])
    return Example(ids, labels, line)


def load_examples(path, tokenizer, max_seq_len: int, overlong: str = "truncate") -> tuple[list[Example], dict]:
    """Examples of a JSONL file and counts {"examples", "tokens", "truncated", "dropped"}.
    overlong: what to do with an example longer than max_seq_len: "truncate" (keep its first
    max_seq_len tokens), "reject" (an error naming the lines), or "drop" (skip it)."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    examples, errors, stats = [], [], {"examples": 0, "tokens": 0, "truncated": 0, "dropped": 0}
    for line, record in read_jsonl(path):
        ex = to_example(tokenizer, record, line)
        if len(ex) > max_seq_len:
            if overlong == "reject":
                errors.append(f"{path}:{line}: {len(ex)} tokens, longer than max_seq_len {max_seq_len}")
                continue
            if overlong == "drop":
                stats["dropped"] += 1
                continue
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len], line)
            stats["truncated"] += 1
        if all(t == IGNORE for t in ex.labels[1:]):
            errors.append(f"{path}:{line}: no token to learn within max_seq_len {max_seq_len} (the prompt fills it)")
            continue
        examples.append(ex)
    _raise(errors)
    if not examples:
        raise DataError(f"{path}: no examples left (all {stats['dropped']} longer than max_seq_len {max_seq_len})")
    stats["examples"], stats["tokens"] = len(examples), sum(len(e) for e in examples)
    return examples, stats


# ---------------------------------------------------------------------- examples -> rows -> batches

@dataclass
class Row:
    """One sequence of a batch: several documents when packed (doc numbers 1, 2, ...)."""
    input_ids: list[int]
    labels: list[int]
    docs: list[int]


def rows(examples: list[Example], max_seq_len: int, pack: bool = False) -> list[Row]:
    """One row per example, or (pack=True) examples concatenated in order into rows of at most
    max_seq_len tokens. The first token of each packed document learns nothing: it would be
    predicted from the end of the previous document."""
    out: list[Row] = []
    for ex in examples:
        if not pack or not out or len(out[-1].input_ids) + len(ex) > max_seq_len:
            out.append(Row([], [], []))
        row = out[-1]
        doc = (row.docs[-1] + 1) if row.docs else 1
        row.input_ids += ex.input_ids
        row.labels += [IGNORE] + ex.labels[1:]
        row.docs += [doc] * len(ex)
    return out


def collate(batch: list[Row], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, labels (-100 on padding), attention_mask (document numbers,
    0 on padding) and position_ids (restarting at each document)."""
    T = max(len(r.input_ids) for r in batch)
    ids = torch.full((len(batch), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    docs = torch.zeros((len(batch), T), dtype=torch.long)
    pos = torch.zeros((len(batch), T), dtype=torch.long)
    for b, r in enumerate(batch):
        n = len(r.input_ids)
        ids[b, :n], labels[b, :n], docs[b, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), torch.tensor(r.docs)
        d = docs[b, :n]
        starts = torch.ones(n, dtype=torch.bool)
        starts[1:] = d[1:] != d[:-1]
        idx = torch.arange(n)
        pos[b, :n] = idx - torch.where(starts, idx, 0).cummax(0).values
    return {"input_ids": ids, "labels": labels, "attention_mask": docs, "position_ids": pos}


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of rows in an epoch: a function of (seed, epoch) alone, so a resumed run that
    knows its epoch and position sees the same batches as one that never stopped."""
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
