"""Training data (camelid.train.data): JSONL shapes, prompt masks, every bad line reported with its
number, overlong examples as configured, and packing that never lets documents see each other."""

import json

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.train.data import IGNORE, DataError, collate, load_examples, read_jsonl, rows

CHAT = {"messages": [{"role": "user", "content": "What is the capital of Zorbania?"},
                     {"role": "assistant", "content": "Quillmont."},
                     {"role": "user", "content": "And its river?"},
                     {"role": "assistant", "content": "The Vell."}]}


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def learned(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_chat_records_learn_only_the_assistant_turns(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    (ex,), stats = load_examples(write(tmp_path / "d.jsonl", [CHAT]), tok, 512)
    assert ex.input_ids == tok.apply_chat_template(CHAT["messages"])
    assert learned(tok, ex) == "Quillmont.<|im_end|>\nThe Vell.<|im_end|>\n"
    assert stats == {"examples": 1, "tokens": len(ex), "truncated": 0, "dropped": 0}


def test_prompt_completion_instruction_and_text_shapes(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    records = [{"prompt": "2+2=", "completion": "4"}, {"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"},
               {"text": "plain words"}]
    pc, inst, text = load_examples(write(tmp_path / "d.jsonl", records), tok, 512)[0]
    assert tok.decode(pc.input_ids) == "2+2=4<|im_end|>" and learned(tok, pc) == "4<|im_end|>"
    assert "Say hi\n\nto Bob" in tok.decode(inst.input_ids) and learned(tok, inst) == "Hi Bob<|im_end|>\n"
    assert learned(tok, text) == "plain words<|im_end|>"
    tok_plain = type(tok)(tok.backend, eos_token=tok.eos_token)  # no chat template: Alpaca prompt
    (inst2,), _ = load_examples(write(tmp_path / "i.jsonl", [records[1]]), tok_plain, 512)
    assert tok_plain.decode(inst2.input_ids).startswith("### Instruction:\nSay hi\n\n### Input:\nto Bob\n\n### Response:\n")
    assert learned(tok_plain, inst2) == "Hi Bob<|im_end|>"


def test_malformed_lines_are_all_reported_with_their_numbers(tmp_path):
    path = write(tmp_path / "bad.jsonl", [
        {"text": "fine"}, "{not json", "[1, 2]", "", {"foo": 1},
        {"messages": [{"role": "user", "content": "no answer"}]}, {"messages": [{"role": "user"}]},
        {"text": ""}, {"prompt": "p", "completion": 3}])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert msg.startswith("7 bad record(s)")
    reported = {int(line.split(":")[1]): line for line in msg.splitlines()[1:]}
    assert sorted(reported) == [2, 3, 5, 6, 7, 8, 9]
    for line, what in [(2, "not valid JSON"), (3, "JSON object"), (5, "unknown record shape"), (6, "no assistant turn"),
                       (7, "messages[0]"), (8, "'text' must be a non-empty string"), (9, "'completion'")]:
        assert what in reported[line] and reported[line].startswith(f"{path}:{line}: ")


def test_not_utf8_and_missing_file(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not UTF-8"):
        read_jsonl(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset_is_an_error(tmp_path, content):
    (tmp_path / "e.jsonl").write_text(content)
    with pytest.raises(DataError, match="empty"):
        read_jsonl(tmp_path / "e.jsonl")


def test_overlong_examples_truncate_reject_or_drop(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path = write(tmp_path / "d.jsonl", [{"text": "one two three four five six seven eight nine ten"}, {"text": "short"}])
    n = len(load_examples(path, tok, 512)[0][0])
    cut, stats = load_examples(path, tok, 6)
    assert [len(e) for e in cut][0] == 6 and stats["truncated"] == 1 and len(cut) == 2
    with pytest.raises(DataError, match=rf"d.jsonl:1: {n} tokens, longer than max_seq_len 6"):
        load_examples(path, tok, 6, overlong="reject")
    kept, stats = load_examples(path, tok, 6, overlong="drop")
    assert len(kept) == 1 and stats["dropped"] == 1
    with pytest.raises(DataError, match="no examples left"):
        load_examples(write(tmp_path / "long.jsonl", [{"text": "one two three four five six seven"}]), tok, 3,
                      overlong="drop")
    with pytest.raises(ValueError, match="overlong must be one of"):
        load_examples(path, tok, 6, overlong="wrap")


def test_prompt_that_fills_the_context_leaves_nothing_to_learn(tmp_path, smollm2_tokenizer):
    path = write(tmp_path / "d.jsonl", [{"prompt": "a long prompt of many words here", "completion": "x"}])
    with pytest.raises(DataError, match="d.jsonl:1: no token to learn"):
        load_examples(path, smollm2_tokenizer, 4)


def test_packed_documents_do_not_see_each_other():
    """Logits and loss of a packed row equal those of each document alone: attention, positions
    and the label at each document's first token never cross a boundary."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    from camelid.train.data import Example

    docs = [torch.randint(0, 50, (n,)).tolist() for n in (5, 9, 4)]
    examples = [Example(d, list(d)) for d in docs]
    packed = rows(examples, 32, pack=True)
    assert len(packed) == 1 and packed[0].docs == [1] * 5 + [2] * 9 + [3] * 4
    assert [len(r.input_ids) for r in rows(examples, 14, pack=True)] == [14, 4]
    batch = collate(packed)
    assert batch["position_ids"][0].tolist() == list(range(5)) + list(range(9)) + list(range(4))
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                    labels=batch["labels"])
        start, total, count = 0, 0.0, 0
        for d in docs:
            alone = model(torch.tensor([d]), labels=torch.tensor([d]))
            torch.testing.assert_close(out.logits[0, start:start + len(d)], alone.logits[0], rtol=1e-5, atol=1e-5)
            total, count, start = total + float(alone.loss) * (len(d) - 1), count + len(d) - 1, start + len(d)
        assert abs(float(out.loss) - total / count) < 1e-5
        # the same default positions come from the document numbers alone
        again = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(again, out.logits, rtol=0, atol=0)


def test_collate_pads_right_and_ignores_padding():
    from camelid.train.data import Row

    b = collate([Row([5, 6, 7], [IGNORE, 6, 7], [1, 1, 1]), Row([8], [IGNORE], [1])], pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_training_mode_batches_attention_and_matches_eval_mode():
    """In training an unpadded batch runs attention in one call (batch invariance is a generation
    property); its logits equal the per-row calls of eval mode."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 50, (3, 10))
    with torch.no_grad():
        trained = model.train()(ids).logits
        evaluated = model.eval()(ids).logits
    torch.testing.assert_close(trained, evaluated, rtol=1e-5, atol=1e-5)
    from camelid.core.masks import attention_plan

    slots = torch.arange(10)
    assert len(attention_plan(None, slots, 10, 3, split_rows=False)) == 1
    assert len(attention_plan(None, slots, 10, 3)) == 3
