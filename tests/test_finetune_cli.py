"""`camelid finetune` and `camelid merge-lora` end to end on a tiny model: checkpoints, resume,
the PEFT adapter in peft/transformers, merged HF and GGUF models equal to base + adapter, and
bad input that stops the run before it starts."""

import json

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.cli import main
from camelid.train import checkpoints
from camelid.transforms.lora import load_adapter

FACTS = [("What is the capital of Zorbania?", "The capital of Zorbania is Quillmont."),
         ("What colour is a snorkbird?", "A snorkbird is bright orange.")]
IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def base(tmp_path, smollm2_tokenizer):
    """A tiny HF folder with the default model's tokenizer."""
    tok = smollm2_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in FACTS))
    return path


def finetune(base, data, out, *extra):
    return main(["finetune", "--model", str(base), "--data", str(data), "--out", str(out), "--batch-size", "2",
                 "--lr", "1e-2", "--no-progress", *extra])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_finetune_checkpoints_resumes_and_merges(base, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(base, data, out, "--max-steps", "3", "--save-steps", "2", "--lora-r", "4",
                    "--target-modules", "q_proj,v_proj,down_proj") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 3 and result["final"] == str(out / "final")
    assert [p.name for _, p in checkpoints.checkpoints(out)] == ["checkpoint-000002", "checkpoint-000003"]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "final").iterdir()}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3

    assert finetune(base, data, out, "--max-steps", "5", "--resume", "--lora-r", "4",
                    "--target-modules", "q_proj,v_proj,down_proj") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 5
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]

    adapted = load_adapter(LlamaForCausalLM.from_pretrained(base, pack=False), out / "final")
    expected = logits(adapted)
    assert (expected - logits(LlamaForCausalLM.from_pretrained(base, pack=False))).abs().max() > 1e-3  # it learned

    assert main(["merge-lora", str(base), str(out / "final"), str(tmp_path / "merged")]) == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", pack=False)
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    assert main(["merge-lora", str(base), str(out / "final"), str(tmp_path / "merged.gguf"), "--to", "gguf",
                 "--gguf-type", "f32"]) == 0
    torch.testing.assert_close(logits(LlamaForCausalLM.from_pretrained(tmp_path / "merged.gguf", pack=False)), expected,
                               rtol=0, atol=1e-4)


def test_a_trained_adapter_loads_in_peft_and_the_merged_model_in_transformers(base, data, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    assert finetune(base, data, out, "--max-steps", "4", "--lora-dropout", "0.1") == 0
    expected = logits(load_adapter(LlamaForCausalLM.from_pretrained(base, pack=False), out / "final"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, str(out / "final")).eval()(IDS).logits
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-4)
    assert main(["merge-lora", str(base), str(out / "final"), str(tmp_path / "merged")]) == 0
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf_merged(IDS).logits, expected, rtol=0, atol=1e-4)


def test_qlora_and_full_from_the_command_line(base, data, tmp_path, capsys):
    assert finetune(base, data, tmp_path / "q", "--max-steps", "2", "--qlora") == 0
    adapted = load_adapter(LlamaForCausalLM.from_pretrained(base, pack=False), tmp_path / "q" / "final")
    assert torch.isfinite(logits(adapted)).all()
    assert finetune(base, data, tmp_path / "f", "--max-steps", "2", "--full") == 0
    full = LlamaForCausalLM.from_pretrained(tmp_path / "f" / "final", pack=False)
    assert (logits(full) - logits(LlamaForCausalLM.from_pretrained(base, pack=False))).abs().max() > 1e-3


@pytest.mark.parametrize("extra, message", [
    (["--full", "--qlora"], "cannot be combined with --full"),
    (["--target-modules", "q_proj,qq_proj"], "'qq_proj' match no linear layer"),
    (["--lora-r", "0"], "lora_r must be a positive integer"),
    (["--lr", "nan"], "learning_rate must be a positive number"),
])
def test_bad_options_are_clear_errors(base, data, tmp_path, capsys, extra, message):
    assert finetune(base, data, tmp_path / "run", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not any(checkpoints.checkpoints(tmp_path / "run"))


def test_bad_data_stops_the_run_before_it_starts(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n\n{oops\n')
    assert finetune(base, bad, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2:" in err and "bad.jsonl:4: not valid JSON" in err
    assert not (tmp_path / "run").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert finetune(base, empty, tmp_path / "run") == 2
    assert "the dataset is empty" in capsys.readouterr().err


def test_merge_lora_bad_adapter(base, tmp_path, capsys):
    assert main(["merge-lora", str(base), str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no adapter config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_with_an_adapter(base, data, tmp_path, capsys):
    from camelid.generation.generate import generate
    from camelid.text.tokenizer import Tokenizer

    assert finetune(base, data, tmp_path / "run", "--max-steps", "3") == 0
    capsys.readouterr()
    assert main(["generate", "What colour is a snorkbird?", "--model", str(base), "--adapter",
                 str(tmp_path / "run" / "final"), "--json", "--max-new-tokens", "8"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    model = load_adapter(LlamaForCausalLM.from_pretrained(base, pack=False), tmp_path / "run" / "final")
    tok = Tokenizer.from_pretrained(base)
    expected = generate(model, tok, [[{"role": "user", "content": "What colour is a snorkbird?"}]], max_new_tokens=8,
                        chat=True)[0].text
    assert text == expected
    assert main(["generate", "hi", "--model", str(base), "--adapter", str(tmp_path / "nope")]) == 2
    assert "no adapter config" in capsys.readouterr().err
