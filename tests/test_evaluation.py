"""The lm-evaluation-harness adapter (camelid/evaluation.py): on small offline tasks written here,
`--model camelid` gives the scores of the harness's own transformers backend (`--model hf`) on
the same weights: accuracy and exact match equal, every loglikelihood within 1e-4."""

import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from camelid import LlamaConfig, LlamaForCausalLM  # noqa: E402
from camelid.cli import main as cli_main  # noqa: E402
from camelid.evaluate.harness import CamelidLM, rolling_windows, task_manager  # noqa: E402

TASKS = ["camelid_mc", "camelid_gen", "camelid_ppl"]
MULTIPLE_CHOICE = [
    {"question": "What is the capital of France?", "choices": ["Paris", "London", "Berlin", "Madrid"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten", "four"], "answer": 1},
    {"question": "What color is the sky on a clear day?", "choices": ["green", "red", "blue", "yellow"], "answer": 2},
    {"question": "Which animal says moo?", "choices": ["dog", "cat", "bird", "cow"], "answer": 3},
]
GENERATION = [  # the default model answers the first with " 4\n...", the second with "... Jupiter.\n..."
    {"question": "What is 2 + 2?", "answer": "4"},
    {"question": "What is the largest planet in the solar system?", "answer": "Jupiter"},
    {"question": "What is the opposite of hot?", "answer": "cold"},
]
TEXTS = [
    {"text": "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and the children played."},
    {"text": "Paris is the capital and largest city of France, on the river Seine."},
]
TASK_YAML = {
    "camelid_mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "camelid_gen": """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: " {{answer}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "camelid_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """Three harness tasks as YAML over local JSONL files (dataset_path: json): nothing is downloaded."""
    root = tmp_path_factory.mktemp("tasks")
    for name, rows in (("camelid_mc", MULTIPLE_CHOICE), ("camelid_gen", GENERATION), ("camelid_ppl", TEXTS)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           f"    test: {data}\ntest_split: test\n" + TASK_YAML[name])
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    """A random 2-layer model with the default model's tokenizer, as an HF folder both backends load.
    Its weights are large enough (std 0.3) that greedy text varies from token to token."""
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=smollm2_tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


MAX_LENGTH = 14  # small, so that every request type gets left-truncated (loglikelihood, rolling windows, prompts)


@pytest.fixture(scope="module")
def tiny_lms(tiny_dir):
    ours = CamelidLM(pretrained=str(tiny_dir), batch_size=3, max_length=MAX_LENGTH)
    theirs = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", batch_size=3, max_length=MAX_LENGTH)
    return ours, theirs


def run(lm, tasks_dir, tasks=TASKS, limit=None):
    return simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(tasks, tasks_dir), limit=limit,
                           log_samples=True)


def compare(ours, theirs, tasks=TASKS) -> float:
    """Assert equal task metrics and per-sample responses; return the largest loglikelihood difference."""
    worst = 0.0

    def same(a, b):
        nonlocal worst
        if isinstance(a, float):
            worst = max(worst, abs(a - b))
            assert a == pytest.approx(b, abs=1e-4)
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                same(x, y)
        else:
            assert a == b  # generated text, is-greedy flags

    for task in tasks:
        a, b = ours["results"][task], theirs["results"][task]
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            assert a.get(metric) == b.get(metric), (task, metric)
        for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            assert (metric in a) == (metric in b), (task, metric)
            if metric in a:
                assert a[metric] == pytest.approx(b[metric], rel=1e-5), (task, metric)
        assert len(ours["samples"][task]) == len(theirs["samples"][task]) > 0
        for x, y in zip(ours["samples"][task], theirs["samples"][task]):
            assert x["doc_id"] == y["doc_id"]
            same(x["resps"], y["resps"])
    return worst


# ---------------------------------------------------------------------- against the hf backend

@pytest.mark.slow
def test_tiny_model_scores_equal_the_hf_backend(tiny_lms, tasks_dir):
    """The three tasks through simple_evaluate, with max_length small enough to cut every kind of request."""
    ours, theirs = tiny_lms
    longest = max(sum(map(len, ours.encode_pair(f"Question: {d['question']}\nAnswer:", " " + c)))
                  for d in MULTIPLE_CHOICE for c in d["choices"])
    assert longest > MAX_LENGTH + 1  # the test does exercise left truncation
    assert compare(run(ours, tasks_dir), run(theirs, tasks_dir)) < 1e-4


def test_requests_equal_the_hf_backend(tiny_lms):
    """Request by request, the cases that tokenization gets wrong first: an empty context (the BOS
    token stands in), a context ending in a space, text that starts with the BOS token's text, a
    context longer than max_length; rolling windows over a long text; stop strings mid-token."""
    ours, theirs = tiny_lms
    story = ours.generate_until([Instance("generate_until", {}, ("The", {"until": [], "max_gen_toks": 5}), 0)])[0]
    pairs = [("", "Hello world"), ("The cat ", "sat on the mat"), ("<|im_start|>user\nHi", " there"),
             ("one two three " * 12, "four five"), ("", "<|im_start|>assistant"), ("a", " b"),
             ("The", story), ("The", story + " zebra")]  # greedy (its text re-encodes to the same tokens), then not
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = ours.loglikelihood(requests)
    assert [greedy for _, greedy in results[-2:]] == [True, False]
    for (a, greedy_a), (b, greedy_b) in zip(results, theirs.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b

    text = "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up and runs. " * 2
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([text, "Hi"])]
    assert len(list(rolling_windows(ours.encode(text), 1, MAX_LENGTH))) > 3
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), abs=1e-4)

    prompts = ["Question: What is 2 + 2?\nAnswer:", "Once upon a time", "A B C D E F G H I J K L M N O P Q R"]
    gens = [Instance("generate_until", {}, (p, {"until": ["e", "\n"], "max_gen_toks": 10}), i)
            for i, p in enumerate(prompts)]
    gens += [Instance("generate_until", {}, (p, {"until": ["zzz"], "max_new_tokens": 6}), i + 3)
             for i, p in enumerate(prompts)]
    texts = ours.generate_until(gens)
    assert texts == theirs.generate_until(gens)
    assert any(len(t) < len(u) and u.startswith(t) for t, u in zip(texts[:3], texts[3:])), texts  # cut by a stop


def test_batch_size_changes_no_score(tiny_lms):
    """Left-padded batches of any size give each request exactly (bit for bit) what it gets alone."""
    batched = tiny_lms[0]
    alone = CamelidLM(pretrained=batched.model, tokenizer=batched.tokenizer, batch_size=1, max_length=MAX_LENGTH)
    requests = [Instance("loglikelihood", {}, (c, " " + x), i) for i, (c, x) in
                enumerate([("Question: What?", "yes"), ("Hi", "there friend"), ("One two three four", "five"),
                           ("A", "b c d e f g h i j"), ("Hi", "the")])]
    assert alone.loglikelihood(requests) == batched.loglikelihood(requests)
    gens = [Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 5}), i)
            for i, (c, _) in enumerate(r.args for r in requests)]
    assert alone.generate_until(gens) == batched.generate_until(gens)


@pytest.mark.slow
def test_default_model_scores_equal_the_hf_backend(tmp_path, tasks_dir, smollm2_tokenizer):
    """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) in camelid, and the same weights
    saved as an HF folder for transformers: the same answers, accuracy and exact match."""
    from camelid.transforms.packed import pack

    model = LlamaForCausalLM.from_pretrained(pack=False)
    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    pack(model)  # camelid's default CPU inference layout, as from_pretrained() gives it
    ours = run(CamelidLM(pretrained=model, tokenizer=smollm2_tokenizer, batch_size=4), tasks_dir)
    del model
    theirs = run(HFLM(pretrained=str(tmp_path), device="cpu", dtype="float32", batch_size=4), tasks_dir)
    worst = compare(ours, theirs)
    for task in TASKS:
        print(task, {k: v for k, v in ours["results"][task].items() if "," in k and "stderr" not in k})
    print(f"max |loglikelihood difference| {worst:.3g}")
    assert ours["results"]["camelid_mc"]["acc,none"] >= 0.5  # a real model, not noise
    assert any(s["resps"][0][0] == " 4" for s in ours["samples"]["camelid_gen"])  # " 4\n..." cut at "\n"
    assert any("Jupiter" in s["resps"][0][0] and "." not in s["resps"][0][0] for s in ours["samples"]["camelid_gen"])


# ---------------------------------------------------------------------- the harness's ways in

def test_registered_as_camelid(tiny_dir, tasks_dir):
    """`model="camelid"` resolves to the adapter, and model_args come as the harness's k=v string."""
    assert get_model("camelid") is CamelidLM
    results = simple_evaluate(model="camelid", model_args=f"pretrained={tiny_dir},max_length={MAX_LENGTH}",
                              batch_size="2", tasks=["camelid_mc"], limit=2,
                              task_manager=task_manager(["camelid_mc"], tasks_dir))
    assert results["results"]["camelid_mc"]["sample_len"] == 2
    assert 0 <= results["results"]["camelid_mc"]["acc,none"] <= 1


@pytest.mark.slow
def test_python_m_camelid_evaluation_is_the_lm_eval_command(tiny_dir, tasks_dir):
    """`python -m camelid.evaluate.harness ARGS` is `lm_eval ARGS` with `--model camelid` registered. In a
    fresh process the harness's own backends must still resolve after camelid registers (the
    harness lists them only into an empty registry)."""
    code = "import camelid.evaluate.harness; from lm_eval.api.registry import get_model; print(get_model('hf').__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["HFLM"], out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "camelid.evaluate.harness", "--model", "camelid", "--model_args",
                          f"pretrained={tiny_dir},max_length={MAX_LENGTH}", "--tasks", "camelid_mc", "--include_path",
                          str(tasks_dir), "--limit", "2", "--batch_size", "2"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "camelid_mc" in out.stdout and "acc_norm" in out.stdout


def test_camelid_eval_command(tiny_dir, tasks_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = cli_main(["eval", str(tiny_dir), "--tasks", "camelid_mc,camelid_ppl", "--include-path", str(tasks_dir),
                   "--limit", "2", "--batch-size", "2", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "camelid_mc" in printed and "acc_norm" in printed and "word_perplexity" in printed
    results = json.loads(out.read_text())["results"]
    assert results["camelid_mc"]["sample_len"] == 2
    assert math.isfinite(results["camelid_ppl"]["word_perplexity,none"])


# ---------------------------------------------------------------------- pieces and bad input

def test_rolling_windows_score_every_token_once():
    """The harness's documented example: tokens 0..9, prefix P, max_length 4 -> the model reads
    [P 0 1 2], [3 4 5 6], [5 6 7 8] and scores [0 1 2 3], [4 5 6 7], [8 9]."""
    windows = list(rolling_windows(list(range(10)), -1, 4))
    assert [(ctx + cont)[-5:-1] for ctx, cont in windows] == [[-1, 0, 1, 2], [3, 4, 5, 6], [5, 6, 7, 8]]
    assert [cont for _, cont in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(rolling_windows([7], -1, 4)) == [([-1], [7])]


def test_bad_model_args_are_named(tiny_dir, tiny_lms, tasks_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown trust_remote_code=True"):
        CamelidLM(pretrained=str(tiny_dir), trust_remote_code=True)
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        CamelidLM(pretrained=str(missing))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        CamelidLM(pretrained=str(tiny_dir), batch_size="auto")
    with pytest.raises(ValueError, match="tokenizer="):
        CamelidLM(pretrained=tiny_lms[0].model)
    with pytest.raises(ValueError, match="gen_kwargs num_beams not supported"):
        tiny_lms[0].generate_until([Instance("generate_until", {}, ("Hi", {"until": ["."], "num_beams": 4}), 0)])
    with pytest.raises(ValueError, match="max_gen_toks 14 leaves no room"):
        tiny_lms[0].generate_until([Instance("generate_until", {}, ("Hi", {"max_gen_toks": 14}), 0)])

    rc = cli_main(["eval", str(missing), "--tasks", "camelid_mc", "--include-path", str(tasks_dir)])
    assert rc == 2 and "no-such-model" in capsys.readouterr().err
    assert not missing.exists()
