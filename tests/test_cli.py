import json
import re
import subprocess
import sys

import pytest

from camelid.cli import main


def test_info_preset_prints_published_parameters(capsys):
    assert main(["info", "llama-2-7b", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "MHA" in out and "KV cache" in out


def test_info_reads_a_config_folder(tmp_path, capsys):
    cfg = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=1, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MQA" in out and "linear" in out and "factor=2.0" in out


def test_info_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["info", "no-such-model"]) == 2
    assert "neither a config folder/file nor a preset" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10}))
    assert main(["info", str(tmp_path)]) == 2
    assert "hidden_size" in capsys.readouterr().err


def test_info_reads_a_packaged_name_a_gguf_file_and_a_folder(smollm2_gguf, tmp_path, capsys):
    """Issue 21, point 5: the default model's own name and its .gguf file failed ("neither a config
    folder/file nor a preset"; the GGUF parsed as JSON)."""
    for model in ("smollm2-135m-instruct", str(smollm2_gguf)):
        assert main(["info", model]) == 0
        out = capsys.readouterr().out
        assert out.startswith(model) and "hidden_size / intermediate_size        576 / 1,536" in out
    from camelid import LlamaConfig

    LlamaConfig.from_pretrained("smollm2-135m").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0 and "576 / 1,536" in capsys.readouterr().out


def test_threads_on_every_program_that_computes(tmp_path, capsys):
    """Issue 21, point 2: only bench had --threads."""
    import torch

    from camelid.cli import THREADED, build_parser

    parser = build_parser()
    for name in THREADED:
        assert parser.parse_args([name, *REQUIRED.get(name, []), "--threads", "1"]).threads == 1, name
    before = torch.get_num_threads()
    try:
        src = _tiny_checkpoint(tmp_path / "tiny")
        assert main(["bench", "--model", src, "--threads", "1", "--new", "2", "--prompt-len", "4"]) == 0
        assert torch.get_num_threads() == 1
        capsys.readouterr()
        assert main(["perplexity", src, str(tmp_path / "t.txt"), "--threads", "0"]) == 2
        assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


REQUIRED = {"generate": ["hi"], "convert": ["a", "b", "--to", "hf"], "quantize": ["a", "b", "--bits", "8"], "compare": ["a", "b"],
            "export": ["m", "out"], "eval": ["m", "--tasks", "x"], "finetune": ["--data", "d", "--out", "o"],
            "perplexity": ["m", "t.txt"]}


def test_help_does_not_import_torch():
    """Issue 21, point 8: `camelid --help` took 8 s on a busy machine (the package imported torch)."""
    code = "import sys; from camelid.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_version_without_a_command():
    out = subprocess.run([sys.executable, "-m", "camelid.cli", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert re.fullmatch(r"camelid \d+\.\d+\S*\n", out)


@pytest.mark.slow
def test_convert_the_default_model_to_q8_0_passes_against_the_formats_own_rounding(tmp_path, capsys, monkeypatch):
    """Issue 21, point 7: re-quantizing the Q4_1 source to Q8_0 drifts 1.06 in the logits, over a
    fixed 1.0: FAILED, exit 1, though every block is the gguf package's. The bound is now what the
    format loses by itself (the gguf package's quantizer on the same weights), greedy tokens too;
    a writer that loses more still fails."""
    out = tmp_path / "m.gguf"
    assert main(["convert", "smollm2-135m-instruct", str(out), "--to", "gguf", "--dtype", "q8_0"]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith(": ok") and "greedy tokens equal to it" in text
    import torch

    import camelid.formats.gguf_write as W

    real = W.save_gguf

    def lossy(model, path, **kw):  # a writer that loses more than Q8_0 does
        import copy

        model = copy.deepcopy(model)
        with torch.no_grad():
            w = model.model.layers[3].mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std() * 0.2)
        return real(model, path, **kw)

    monkeypatch.setattr(W, "save_gguf", lossy)
    assert main(["convert", "smollm2-135m-instruct", str(tmp_path / "bad.gguf"), "--to", "gguf",
                 "--dtype", "q8_0"]) == 1
    assert capsys.readouterr().out.rstrip().endswith("FAILED")


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "camelid.cli", "info", "smollm2-135m"],
                         capture_output=True, text=True, check=True).stdout
    assert "134,515,008" in out


def test_convert_gguf_to_hf_checks_logits(tmp_path, smollm2_gguf, capsys):
    transformers = __import__("pytest").importorskip("transformers")
    import torch

    from camelid import LlamaForCausalLM

    import re

    assert main(["convert", str(smollm2_gguf), str(tmp_path / "hf"), "--to", "hf"]) == 0
    # same weights; the GGUF load is stored column-major for decode, so GEMM rounding differs slightly
    diff = float(re.search(r"max \|logit diff\| (\S+)", capsys.readouterr().out).group(1))
    assert diff <= 1e-4
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (hf(ids).logits - LlamaForCausalLM.from_pretrained(smollm2_gguf, dtype="float32")(ids).logits).abs().max()
    assert diff <= 1e-4


def test_convert_bad_input(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "not a file, a folder" in capsys.readouterr().err
    assert main(["convert", "x", str(tmp_path / "out"), "--to", "hf", "--dtype", "q8_0"]) == 2
    assert "--dtype 'q8_0' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_hf_to_gguf_and_a_failing_tolerance(tmp_path, capsys):
    import torch

    from camelid import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "hf")
    for dtype in ("f32", "f16", "q8_0"):
        out = tmp_path / f"m-{dtype}.gguf"
        assert main(["convert", str(tmp_path / "hf"), str(out), "--to", "gguf", "--dtype", dtype]) == 0, dtype
        assert out.read_bytes()[:4] == b"GGUF"
        assert ": ok" in capsys.readouterr().out
    # the same conversion fails when the tolerance is set below what q8_0 costs
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "x.gguf"), "--to", "gguf", "--dtype", "q8_0",
                 "--tolerance", "1e-9"]) == 1
    assert "FAILED" in capsys.readouterr().out


# "What is the capital of France?" alone is a near tie for the 135M model: with the float16 KV cache
# (llama.cpp's default) it answers "L'Étoile, la Cité, ...", exactly as llama.cpp does on the same file.
QUESTION = "What is the capital of France? Answer in one word."


def test_generate_streams_the_answer(smollm2_gguf, capsys):
    assert main(["generate", "--model", str(smollm2_gguf), QUESTION,
                 "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_json_and_stop(smollm2_gguf, capsys):
    import json as _json

    assert main(["generate", "--model", str(smollm2_gguf), QUESTION, "--json",
                 "--max-new-tokens", "16", "--stop", "Paris"]) == 0
    result = _json.loads(capsys.readouterr().out)
    assert result["finish_reason"] == "stop" and "Paris" not in result["text"]


def test_generate_bad_sampling_flag_is_a_clear_error(smollm2_gguf, capsys):
    assert main(["generate", "--model", str(smollm2_gguf), "hi", "--temperature", "0.5", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_repl_keeps_history_and_resets(smollm2_gguf, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n/reset\n\n/exit\n"))
    assert main(["chat", "--model", str(smollm2_gguf), "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out and "(history cleared)" in captured.err


def test_generate_with_prompt_lookup_gives_the_greedy_text(smollm2_gguf, capsys):
    import json as _json

    prompt = "Repeat exactly: one two three four five six seven eight nine ten"
    texts = []
    for extra in ([], ["--prompt-lookup", "8"]):
        assert main(["generate", "--model", str(smollm2_gguf), prompt, "--json", "--max-new-tokens", "24", *extra]) == 0
        texts.append(_json.loads(capsys.readouterr().out)["text"])
    assert texts[0] == texts[1] and "five" in texts[0]
    assert main(["generate", "--model", str(smollm2_gguf), "hi", "--prompt-lookup", "4", "--temperature", "0.7"]) == 2
    assert "greedy" in capsys.readouterr().err


def _tiny_checkpoint(path):
    import torch

    from camelid import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(path)
    return str(path)


EIGHT = "q8_0" if __import__("camelid.kernels", fromlist=["available"]).available() else "int8"  # load_in_8bit's default


@pytest.mark.parametrize("flags, kind", [([], "packed"), (["--load-in-8bit"], EIGHT.replace("q8_0", "q8_0 g32")),
                                          (["--no-pack"], "unpacked")])
def test_bench_prints_every_figure(tmp_path, capsys, flags, kind):
    model = _tiny_checkpoint(tmp_path / "tiny")
    assert main(["bench", "--model", model, "--new", "3", "--prompt-len", "16", "--threads", "1", *flags]) == 0
    out = capsys.readouterr().out
    assert f"{kind} linears" in out
    assert "TTFT s" in out and "prefill tok/s" in out and "decode b8" in out and "peak MiB" in out
    figures = out.splitlines()[2].split()
    assert figures[0] == "camelid" and all(float(x) > 0 for x in figures[1:]), out
    assert "GB/s" in out


def test_bench_profile_prints_the_decode_step_by_kind_of_work(tmp_path, capsys):
    model = _tiny_checkpoint(tmp_path / "tiny")
    assert main(["bench", "--model", model, "--new", "4", "--prompt-len", "16", "--threads", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("decode step, batch 1"):]
    for row in ("matrix products", "attention", "other torch ops", "Python", "total without the profiler"):
        assert row in table, table
    shares = [float(line.split()[-1].rstrip("%")) for line in table.splitlines()[1:9]]
    assert abs(sum(shares) - 100) < 0.5, table


def test_bench_weight_bytes_count_quantized_codes(tmp_path):
    from camelid import LlamaForCausalLM
    from camelid.evaluate.benchmark import weight_bytes

    path = _tiny_checkpoint(tmp_path / "tiny")
    fp32 = weight_bytes(LlamaForCausalLM.from_pretrained(path, pack=False))
    int8 = weight_bytes(LlamaForCausalLM.from_pretrained(path, load_in_8bit=True))
    assert 0.2 * fp32 < int8 < 0.5 * fp32


@pytest.mark.parametrize("flags, message", [
    (["--new", "0"], "--new and --prompt-len must be positive"),
    (["--prompt-len", "-3"], "--new and --prompt-len must be positive"),
    (["--prompt-len", "64"], "no room"),
])
def test_bench_bad_input(tmp_path, capsys, flags, message):
    assert main(["bench", "--model", _tiny_checkpoint(tmp_path / "tiny"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_quantize_writes_a_checkpoint_that_reloads_quantized(tmp_path, capsys):
    from camelid import LlamaForCausalLM

    src = _tiny_checkpoint(tmp_path / "tiny")
    assert main(["quantize", src, str(tmp_path / "q4"), "--bits", "4", "--group-size", "64"]) == 0
    assert "'group_size': 64" in capsys.readouterr().out
    model = LlamaForCausalLM.from_pretrained(tmp_path / "q4")
    assert model.quantization_config["format"] == "int4"
    assert main(["quantize", src, str(tmp_path / "q8"), "--bits", "8"]) == 0
    assert LlamaForCausalLM.from_pretrained(tmp_path / "q8").quantization_config["format"] == EIGHT
    assert main(["quantize", src, str(tmp_path / "q8i"), "--bits", "8", "--format", "int8"]) == 0
    assert LlamaForCausalLM.from_pretrained(tmp_path / "q8i").quantization_config["format"] == "int8"


def test_quantize_writes_the_tokenizer_so_generate_reads_the_output(tmp_path, smollm2_tokenizer, capsys):
    """Issue 21, point 4: the quantized folder had no tokenizer: generate / chat / serve on it
    failed after loading it ("no tokenizer.json or tokenizer.model")."""
    import torch

    from camelid import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(tmp_path / "src")
    smollm2_tokenizer.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "q8"), "--bits", "8"]) == 0
    assert (tmp_path / "q8" / "generation_config.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "q8"), "--max-new-tokens", "3", "Hello"]) == 0
    assert capsys.readouterr().out.strip()
    # a source without a tokenizer: the weights are written, and a note says what is missing
    assert main(["quantize", _tiny_checkpoint(tmp_path / "bare"), str(tmp_path / "q8b"), "--bits", "8"]) == 0
    assert "has no tokenizer to copy" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--bits", "8", "--group-size", "32"], "no --group-size"),
    (["--bits", "4", "--format", "q8_0"], "is 8-bit"),
    (["--bits", "4", "--group-size", "48"], "unsupported group_size 48"),
    (["--bits", "4", "--dst-exists"], "not an empty folder"),
])
def test_quantize_bad_input_writes_nothing(tmp_path, capsys, flags, message):
    src, dst = _tiny_checkpoint(tmp_path / "tiny"), tmp_path / "out"
    if "--dst-exists" in flags:
        flags = [f for f in flags if f != "--dst-exists"]
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    assert main(["quantize", src, str(dst), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not dst.exists() or sorted(p.name for p in dst.iterdir()) == ["keep.txt"]


def test_perplexity_and_kl_divergence(smollm2_gguf, capsys):
    text = "/usr/share/common-licenses/GPL-3"
    assert main(["perplexity", str(smollm2_gguf), text, "--max-tokens", "160", "--context", "64"]) == 0
    plain = capsys.readouterr().out
    assert "159 tokens scored" in plain and "perplexity" in plain
    assert main(["perplexity", str(smollm2_gguf), text, "--max-tokens", "160", "--context", "64",
                 "--kl-reference", str(smollm2_gguf)]) == 0
    same = capsys.readouterr().out
    assert "mean KL 0.00000 nats, top-1 agreement 100.00%" in same and "+0.00%" in same
    assert main(["perplexity", str(smollm2_gguf), text, "--max-tokens", "160", "--context", "64",
                 "--load-in-8bit", "--kl-reference", str(smollm2_gguf)]) == 0
    q8 = capsys.readouterr().out
    assert "mean KL 0.0" in q8 and "mean KL 0.00000" not in q8


def test_perplexity_bad_input(smollm2_gguf, tmp_path, capsys):
    assert main(["perplexity", str(smollm2_gguf), str(tmp_path / "missing.txt")]) == 2
    assert "no such text file" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello world, hello world")
    assert main(["perplexity", str(smollm2_gguf), str(tmp_path / "t.txt"), "--context", "8", "--stride", "8"]) == 2
    assert "0 < stride < context" in capsys.readouterr().err
    assert main(["perplexity", str(smollm2_gguf), str(tmp_path / "t.txt"), "--max-tokens", "-5"]) == 2
    assert "--max-tokens must be at least 2" in capsys.readouterr().err


def test_generate_with_an_int8_kv_cache(smollm2_gguf, capsys):
    # float weights: int8 keys/values on top of the file's 4-bit weights and int8 activations
    # (the default) answer this one differently
    assert main(["generate", "--model", str(smollm2_gguf), "What is the capital of France?", "--max-new-tokens", "12",
                 "--kv-cache", "int8", "--dtype", "float32"]) == 0
    assert "Paris" in capsys.readouterr().out
