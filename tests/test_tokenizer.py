"""Tokenizer parity with independent references on a 300+ string corpus, and the transformers API."""

import base64
import json

import pytest
import torch

from camelid.text.streaming import IncrementalDecoder
from camelid.text.tokenizer import Tokenizer
from corpus import corpus

CORPUS = corpus()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 300


# ---------------------------------------------------------------------- the real model (GGUF vocab)

def test_gguf_tokenizer_matches_llama_cpp(smollm2_gguf, smollm2_tokenizer):
    """llama.cpp is the reference for a GGUF's tokenizer (pre-tokenizer 'smollm' included)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    bad = [s for s in CORPUS if smollm2_tokenizer.encode(s) != ref.tokenize(s.encode(), add_bos=False, special=True)]
    assert bad == []


@pytest.fixture(scope="module")
def smollm2_vocab_fields(smollm2_gguf):
    from camelid.formats.gguf_file import GGUFFile

    g = GGUFFile(smollm2_gguf)
    fields = {k: v for k, v in g.fields.items() if k.startswith("tokenizer.ggml.")}
    g.close()
    return fields


PRE_EXTRA = ["Hello   world  ", "a\n\n b", "x  \n", "1234567 89", "don't DON'T", "ÅÄÖ åäö", "(a|b).c!?",
             "x$+<=>^~|`y", "\u1f7d \u1fbe\u1fd3 \u2126\u212a ώ Ω K Kelvin Åström ᾶᾷ", "Ἀθῆναι ὦ φίλε",
             "…。，、।۔، mixed", "<sentinel:12> IMGIMGABZ", "CamelCase XMLHttpRequest iPhone"]


@pytest.mark.slow
@pytest.mark.parametrize("pre", sorted(set(__import__("camelid.text.gguf_vocab", fromlist=["x"]).WRITABLE_PRE)))
def test_every_llama_cpp_pre_tokenizer_splits_as_llama_cpp_does(pre, smollm2_vocab_fields, tmp_path):
    """Issue 19, finding 18: GGUFs with other pre-tokenizers (deepseek-llm, deepseek-coder, command-r,
    mpt, ...) were refused. Each name llama.cpp reads, on the default model's vocabulary written
    with that name: the same ids as llama-cpp-python on the corpus."""
    import gguf

    llama_cpp = pytest.importorskip("llama_cpp")
    f = smollm2_vocab_fields
    path = tmp_path / f"{pre}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(f["tokenizer.ggml.tokens"])
    w.add_token_types(f["tokenizer.ggml.token_type"])
    w.add_token_merges(f["tokenizer.ggml.merges"])
    w.add_bos_token_id(f["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(f["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ours = Tokenizer.from_gguf(path)
    bad = [s for s in CORPUS + PRE_EXTRA
           if ours.encode(s, add_special_tokens=False) != ref.tokenize(s.encode(), add_bos=False, special=True)]
    assert bad == []


def test_an_unknown_pre_tokenizer_is_named_with_the_known_ones():
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre", "tokenizer.ggml.tokens": ["a"],
              "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match="pre-tokenizer 'no-such-pre' is not supported; known: .*deepseek-llm"):
        Tokenizer.from_gguf(fields)


@pytest.fixture(scope="module")
def hf_real_pretokenizer(hf_smollm2_tokenizer):
    """transformers' tokenizer with SmolLM2's own pre-tokenizer (its tokenizer.json: digits one by
    one, then byte-level). transformers' GGUF loader does not map the file's 'smollm' pre-tokenizer."""
    from tokenizers import pre_tokenizers

    import copy
    tok = copy.deepcopy(hf_smollm2_tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


def test_ids_match_transformers_on_corpus(smollm2_tokenizer, hf_real_pretokenizer):
    bad = [s for s in CORPUS if smollm2_tokenizer.encode(s) != hf_real_pretokenizer.encode(s)]
    assert bad == []


def test_only_digit_strings_differ_from_transformers_gguf_loader(smollm2_tokenizer, hf_smollm2_tokenizer):
    """Where transformers' own GGUF loader differs, it is its missing digit rule, nothing else."""
    differ = [s for s in CORPUS if smollm2_tokenizer.encode(s) != hf_smollm2_tokenizer.encode(s)]
    assert all(any(c.isnumeric() for c in s) for s in differ)
    assert len(differ) < len(CORPUS) // 4


def test_decode_encode_round_trip(smollm2_tokenizer):
    bad = [s for s in CORPUS if smollm2_tokenizer.decode(smollm2_tokenizer.encode(s)) != s]
    assert bad == []


def test_special_ids_and_eos_list(smollm2_tokenizer):
    t = smollm2_tokenizer
    assert (t.bos_token, t.eos_token, t.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (1, 2, 2)
    assert t.eos_token_ids == [2] and len(t) == t.vocab_size == 49152
    assert t.encode("<|im_start|>") == [1]
    assert 1 not in t.encode("<|im_start|>", parse_special=False)


def test_batch_call_pads_left_and_batch_decode(smollm2_tokenizer):
    t = smollm2_tokenizer
    prompts = ["The capital of France is", "Hi"]
    batch = t(prompts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch.attention_mask
    assert ids.shape == mask.shape and ids.dtype == torch.long
    short = len(t.encode("Hi"))
    assert mask[1].tolist() == [0] * (ids.shape[1] - short) + [1] * short  # left padding
    assert ids[1, 0].item() == t.pad_token_id
    assert t.batch_decode(ids, skip_special_tokens=True) == prompts
    right = t(prompts, padding=True, padding_side="right", return_tensors="pt")
    assert right.attention_mask[1, 0] == 1 and right.attention_mask[1, -1] == 0
    assert t(prompts, padding="max_length", max_length=12, return_tensors="pt")["input_ids"].shape == (2, 12)
    assert t(prompts, truncation=True, max_length=2)["input_ids"][0] == t.encode(prompts[0])[:2]
    assert t("Hi")["input_ids"] == t.encode("Hi")
    assert batch.to("cpu")["input_ids"] is not None


def test_bad_calls_are_clear_errors(smollm2_tokenizer):
    t = smollm2_tokenizer
    with pytest.raises(ValueError, match="token id 49152 is outside the vocabulary"):
        t.decode([5, 49152])
    with pytest.raises(ValueError, match="token id -1"):
        t.decode([-1])
    with pytest.raises(ValueError, match="padding=True"):
        t(["a", "a b c"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding_side"):
        t(["a"], padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="return_tensors 'np'"):
        t("a", return_tensors="np")
    with pytest.raises(TypeError, match="str"):
        t.encode(123)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        t.pad_token = "<no such token>"


def test_incremental_decoder_never_emits_half_a_character(smollm2_tokenizer):
    t = smollm2_tokenizer
    for text in ["emoji 😀👍🏽 ok 🇫🇷", "日本語のテキスト、中文测试。", "plain ascii text, with words", "é" * 7]:
        ids = t.encode(text)
        dec = IncrementalDecoder(t)
        pieces = [dec.add(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)
    # a byte-level token that holds part of a character yields nothing until it completes
    ids = t.encode("😀")
    assert len(ids) > 1
    dec = IncrementalDecoder(t)
    assert [dec.add(i) for i in ids][:-1] == [""] * (len(ids) - 1)


# ---------------------------------------------------------------------- other backends

@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    text = d / "train.txt"
    text.write_text("\n".join(CORPUS[:80] * 3 + ["the quick brown fox jumps over the lazy dog"] * 50), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "tokenizer"), vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return d / "tokenizer.model", spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def test_sentencepiece_model_file(spm_model, tmp_path):
    path, sp = spm_model
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    tok = Tokenizer.from_pretrained(tmp_path)
    for s in CORPUS:
        assert tok.encode(s, parse_special=False) == [1] + sp.encode(s)  # Llama 1/2 prepend BOS
        assert tok.decode(tok.encode(s, parse_special=False), skip_special_tokens=True) == sp.decode(sp.encode(s))


def test_sentencepiece_control_token_text_is_parsed_into_the_control_ids(spm_model, tmp_path):
    """`<s>` / `</s>` written in a text (a chat template's `{{ bos_token }}`) become the control
    ids and each piece between is encoded on its own, as transformers' legacy LlamaTokenizer
    defines it (its slow tokenizer in the installed transformers encodes nothing of this model, so
    the pieces are checked against SentencePiece itself)."""
    import re

    path, sp = spm_model
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    tok = Tokenizer.from_pretrained(tmp_path)
    texts = ["<s>[INST] hi there [/INST] fine</s><s>[INST] and you? [/INST]", "a</s>b", "</s>", "x <s> y",
             "<unk>?", *[s for s in CORPUS if "<" in s][:20]]
    for text in texts:
        want = [1]
        for k, part in enumerate(re.split("(<unk>|</s>|<s>)", text)):
            want += [{"<unk>": 0, "<s>": 1, "</s>": 2}[part]] if k % 2 else sp.encode(part) if part else []
        assert tok.encode(text) == (want[1:] if want[1:2] == [1] else want), text
    assert tok.encode("a</s>b")[2] == 2 and 2 not in tok.encode("a</s>b", parse_special=False)
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], chat_template=template)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1  # the template's specials, not spelled out


def test_gguf_llama_spm_vocab_matches_sentencepiece(spm_model):
    """A GGUF 'llama' vocabulary (pieces + scores, no merges) tokenizes as SentencePiece does."""
    _, sp = spm_model
    n = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
              "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0}
    tok = Tokenizer.from_gguf(fields)
    assert tok.add_bos_token and tok.bos_token_id == 1
    mismatched = [s for s in CORPUS if tok.encode(s, add_special_tokens=False, parse_special=False) != sp.encode(s)]
    assert mismatched == []
    assert all(tok.decode(sp.encode(s)) == sp.decode(sp.encode(s)) for s in CORPUS)


def test_tiktoken_llama3_format(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from camelid.text.backends import LLAMA3_PATTERN, LLAMA3_SPECIAL

    ranks = {bytes([b]): b for b in range(256)}
    for word in [b"th", b"he", b"the", b" the", b"in", b"ing", b" a", b"er", b" t", b"re", b"on"]:
        ranks.setdefault(word, len(ranks))
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = Tokenizer.from_pretrained(tmp_path)
    special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)}
    ref = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == len(ranks)
    for s in CORPUS[:120]:
        assert tok.encode(s, add_special_tokens=False) == ref.encode(s, disallowed_special=())
        assert tok.decode(tok.encode(s), skip_special_tokens=True) == s
    assert tok.encode("<|eot_id|>", add_special_tokens=False) == [special["<|eot_id|>"]]


def test_tiktoken_file_with_a_bad_line_names_it(tmp_path):
    (tmp_path / "tokenizer.model").write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="tokenizer.model:2"):
        Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_json_folder_with_configs(tmp_path, hf_real_pretokenizer):
    hf_real_pretokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert all(tok.encode(s) == hf_real_pretokenizer.encode(s) for s in CORPUS)
    assert tok.eos_token_ids == [0, 2] and tok.bos_token_id == 1
    assert tok.chat_template == hf_real_pretokenizer.chat_template


def test_missing_and_broken_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="neither a SentencePiece model nor tiktoken"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)


def test_gguf_vocab_errors():
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
                             "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ValueError, match="tokenizer model 'wordpiece'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "wordpiece", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="bos_token_id 7 is outside"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
                             "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 7})


def test_incremental_decoder_is_linear_and_exact_on_invalid_utf8(smollm2_tokenizer):
    """3,000 lone continuation bytes (issue 19.12): every add re-decoded the whole run (4.5M ids).
    Now the decoded window stays short, and the pieces still join to the whole decode, also for
    random mixes of valid multi-byte characters and stray bytes."""
    import random

    t = smollm2_tokenizer
    byte_ids = [t.encode(ch, add_special_tokens=False) for ch in ("é", "😀")]
    stray = t.convert_tokens_to_ids("\u00a9")  # the byte-level piece of the lone byte 0xA9 (a continuation byte)
    assert t.decode([stray]) == "\ufffd"
    calls = []
    decode = t.decode
    counting = type("Counting", (), {"decode": lambda self, ids, skip=False: calls.append(len(ids)) or decode(ids, skip)})()
    dec = IncrementalDecoder(counting)
    pieces = [dec.add(stray) for _ in range(3000)] + [dec.flush()]
    assert "".join(pieces) == t.decode([stray] * 3000) and sum(calls) < 60 * 3000
    rng = random.Random(0)
    for _ in range(200):
        ids = []
        for _ in range(rng.randrange(1, 30)):
            ids += rng.choice([[stray], [stray] * rng.randrange(1, 12), *byte_ids, t.encode("ab", add_special_tokens=False)])
        dec = IncrementalDecoder(t)
        got = [dec.add(i) for i in ids] + [dec.flush()]
        assert "".join(got) == t.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("pre, whole", [("llama-bpe", True), ("llama3", True), ("default", False)])
def test_a_llama3_gguf_vocabulary_ignores_merges_and_adds_bos_by_default(pre, whole, tmp_path):
    """llama.cpp's Llama 3 pre-tokenizers (and Llama 3's tokenizer.json) set ignore_merges: a word
    that is itself a vocabulary token is that token, even where the merges cannot build it (588 of
    Llama 3's tokens; 'Cửa Việt' tokenized as llama.cpp does). Such a file also adds BOS when it does
    not say, and save_pretrained keeps the flag."""
    tokens = ["a", "b", "c", "ab", "abc", "<|begin_of_text|>"]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 3], "tokenizer.ggml.merges": ["a b"],
              "tokenizer.ggml.bos_token_id": 5}
    tok = Tokenizer.from_gguf(fields)
    assert tok.encode("abc", add_special_tokens=False) == ([4] if whole else [3, 2])
    assert tok.add_bos_token is whole and tok.encode("abc")[:1] == ([5] if whole else [3])
    saved = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path))
    assert saved.encode("abc", add_special_tokens=False) == tok.encode("abc", add_special_tokens=False)
