"""The trainer (camelid.train.trainer): exact resume, non-finite guard, atomic checkpoints and rotation,
refusal of foreign checkpoints, and fine-tuning that teaches made-up facts."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.train import checkpoints
from camelid.train.data import DataError
from camelid.train.trainer import NonFiniteError, ResumeError, Trainer, TrainConfig

FACTS = [("What is the capital of Zorbania?", "The capital of Zorbania is Quillmont."),
         ("Who invented the glimmerphone?", "The glimmerphone was invented by Ada Brightwater."),
         ("What colour is a snorkbird?", "A snorkbird is bright orange.")]


@pytest.fixture
def facts(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in FACTS))
    return path


def tiny(tok, seed=0, **kw):
    torch.manual_seed(seed)
    config = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(LlamaConfig(**{**config, **kw}))


def config(data, out, **kw):
    base = dict(data=str(data), out=str(out), max_steps=6, batch_size=2, learning_rate=1e-2, warmup_steps=2,
                lora_dropout=0.1, progress=False, peak_flops=1e12)
    return TrainConfig(**{**base, **kw})


def answers(model, tok):
    from camelid.generation.generate import generate

    model.eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q, _ in FACTS]
    return [c.text for c in generate(model, tok, prompts, max_new_tokens=20)]


@pytest.mark.parametrize("lora_r", [8, None], ids=["lora", "full"])
def test_resume_continues_the_same_run(facts, tmp_path, smollm2_tokenizer, lora_r):
    """6 steps straight == 3 steps + checkpoint + a new process's trainer resuming + 3 steps:
    same losses, bit-identical weights (dropout on, so the RNG state matters too)."""
    tok = smollm2_tokenizer
    straight = Trainer(tiny(tok), tok, config(facts, tmp_path / "a", lora_r=lora_r))
    torch.manual_seed(1)
    straight.train()
    first = Trainer(tiny(tok), tok, config(facts, tmp_path / "b", lora_r=lora_r))
    torch.manual_seed(1)
    head = [first.train_step()["loss"] for _ in range(3)]  # then the process dies
    first.save_checkpoint()
    assert checkpoints.latest(tmp_path / "b").name == "checkpoint-000003"
    torch.manual_seed(99)  # whatever the new process's RNG holds, the checkpoint's state wins
    resumed = Trainer(tiny(tok), tok, config(facts, tmp_path / "b", lora_r=lora_r))
    resumed.train(resume_from_checkpoint="latest")
    losses = [h["loss"] for h in straight.history]
    assert head + [h["loss"] for h in resumed.history] == pytest.approx(losses, abs=1e-5)
    assert losses[-1] < losses[0]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [4, 5, 6]


def test_non_finite_loss_stops_before_the_step_and_skip_drops_it(facts, tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    trainer = Trainer(tiny(tok), tok, config(facts, tmp_path / "run", save_steps=1))
    trainer.train_step()
    trainer.save_checkpoint()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    layer = trainer.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 2: .* not finite; stopped before the optimizer step"):
        trainer.train_step()
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) or "lora_A" in k for k, v in before.items())  # only the planted NaN differs
    assert trainer.step == 1 and checkpoints.latest(tmp_path / "run").name == "checkpoint-000001"
    from safetensors.torch import load_file

    saved = load_file(str(checkpoints.latest(tmp_path / "run") / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())

    trainer.config.nonfinite = "skip"
    log = trainer.train_step()
    assert log["skipped"] and trainer.skipped == 1 and trainer.step == 2
    assert all(torch.equal(trainer.model.state_dict()[k], v) or "lora_A" in k for k, v in before.items())


def test_rotation_keeps_the_newest_and_no_temp_files(facts, tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    Trainer(tiny(tok), tok, config(facts, tmp_path / "run", max_steps=5, save_steps=1, save_total_limit=2)).train()
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint-000004", "checkpoint-000005", "metrics.jsonl"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-000005").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt",
        "trainer_state.json"]


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp(facts, tmp_path, smollm2_tokenizer, monkeypatch):
    tok = smollm2_tokenizer
    trainer = Trainer(tiny(tok), tok, config(facts, tmp_path / "run"))
    trainer.train_step()
    trainer.save_checkpoint()
    trainer.train_step()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-000001"]


KILLED_SAVE = """
import json, os, signal, sys, torch
from camelid import LlamaConfig, LlamaForCausalLM
from camelid.text.tokenizer import Tokenizer
from camelid.train.trainer import Trainer, TrainConfig
tok = Tokenizer.from_pretrained(None)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
trainer = Trainer(model, tok, TrainConfig(data=sys.argv[1], out=sys.argv[2], max_steps=3, batch_size=2, progress=False,
                                          peak_flops=1e12))
trainer.train_step(); trainer.save_checkpoint(); trainer.train_step()
real = torch.save
def killing_save(obj, f, *a, **k):
    real(obj, f, *a, **k)
    if str(f).endswith("scheduler.pt"):  # mid-save: adapter and optimizer written, more to come
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = killing_save
trainer.save_checkpoint()
"""


def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(facts, tmp_path, smollm2_tokenizer):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_SAVE), str(facts), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 2 and left[0].startswith(".checkpoint-000002.") and left[1] == "checkpoint-000001"
    tok = smollm2_tokenizer
    trainer = Trainer(tiny(tok), tok, config(facts, out, max_steps=2, lora_dropout=0.0, learning_rate=2e-4,
                                             warmup_steps=0))
    trainer.train(resume_from_checkpoint="latest")  # resumes from step 1; the half-written folder is gone
    assert trainer.step == 2 and [h["step"] for h in trainer.history] == [2]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "checkpoint-000002", "metrics.jsonl"]


def test_resume_refuses_another_rank_base_or_mode(facts, tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    Trainer(tiny(tok), tok, config(facts, tmp_path / "run", max_steps=1)).train()
    ckpt = checkpoints.latest(tmp_path / "run")
    cases = [(tiny(tok), dict(lora_r=4), r"LoRA settings differ.*'r': \(8, 4\)"),
             (tiny(tok, seed=1), {}, "another base model"),
             (tiny(tok), dict(lora_r=None), "LoRA fine-tuning checkpoint; this run is full")]
    for model, kw, match in cases:
        trainer = Trainer(model, tok, config(facts, tmp_path / "run", **kw))
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        with pytest.raises(ResumeError, match=match):
            trainer.load_checkpoint(ckpt)
        assert trainer.step == 0 and all(torch.equal(trainer.model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ResumeError, match="not a training checkpoint"):
        Trainer(tiny(tok), tok, config(facts, tmp_path / "run")).load_checkpoint(tmp_path)


def test_bad_settings_stop_before_training(facts, tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    with pytest.raises(ValueError, match=r"target module\(s\) 'q_projj' match no linear layer.*q_proj"):
        Trainer(tiny(tok), tok, config(facts, tmp_path / "run", target_modules=["q_projj"]))
    for field, value in [("learning_rate", -1.0), ("batch_size", 0), ("lr_scheduler_type", "step"),
                         ("nonfinite", "ignore"), ("max_seq_len", True)]:
        with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
            config(facts, tmp_path / "run", **{field: value})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        Trainer(tiny(tok), tok, config(bad, tmp_path / "run2"))
    assert not (tmp_path / "run2").exists()


def test_full_fine_tuning_teaches_a_tiny_random_model_the_facts(facts, tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = tiny(tok, hidden_size=128, intermediate_size=256)
    trainer = Trainer(model, tok, config(facts, tmp_path / "run", lora_r=None, max_steps=60, batch_size=3,
                                         learning_rate=3e-3, warmup_steps=5, eval_data=str(facts), eval_steps=30))
    result = trainer.train()
    assert result["eval_loss"] < 0.05 < trainer.history[0]["loss"]
    assert answers(model, tok) == [a for _, a in FACTS]
    # the final checkpoint is an HF folder transformers reads
    assert (checkpoints.latest(tmp_path / "run") / "model.safetensors").is_file()
    assert any("eval_loss" in json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_lora_teaches_the_default_model_made_up_facts(facts, tmp_path, smollm2_gguf, smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = LlamaForCausalLM.from_pretrained(smollm2_gguf, pack=False)
    assert not any(a in answers(model, tok)[i] for i, (_, a) in enumerate(FACTS))
    trainer = Trainer(model, tok, config(facts, tmp_path / "run", lora_r=16, lora_alpha=32, max_steps=12, batch_size=3,
                                         learning_rate=2e-3, lora_dropout=0.0, tensorboard=True))
    trainer.train()
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < 0.05 < losses[0]
    assert answers(model, tok) == [a for _, a in FACTS]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tensorboard").iterdir())
    assert all(h["tokens_per_s"] > 0 and 0 < h["mfu"] < 1 for h in trainer.history)


GC_MEMORY = """
import sys, torch
from camelid import LlamaConfig, LlamaForCausalLM

def peak_mib():  # VmHWM: this process's peak RSS (ru_maxrss would carry over the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                                     num_attention_heads=8, num_key_value_heads=4))
if sys.argv[1] == "1":
    model.gradient_checkpointing_enable()
model.train()
ids = torch.randint(0, 256, (8, 512))
base = peak_mib()
model(ids, labels=ids).loss.backward()
print(peak_mib() - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_gradient_checkpointing_lowers_peak_memory():
    """Peak RSS growth (MiB) of one forward+backward, with and without recomputation, each in a
    fresh process. (Same gradients: tests/test_parity.py::test_gradient_checkpointing_same_loss_and_gradients.)"""
    peak = {}
    for on in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", GC_MEMORY, on], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        peak[on] = float(proc.stdout.split()[-1])
    print(f"peak RSS growth: {peak['0']:.0f} MiB without, {peak['1']:.0f} MiB with gradient checkpointing")
    assert peak["1"] < 0.7 * peak["0"]


def test_a_new_run_will_not_overwrite_an_old_runs_checkpoints(facts, tmp_path, smollm2_tokenizer):
    """Without resume, an output folder holding checkpoints is refused (rotation would otherwise
    weigh the new run's step-2 checkpoint against the old run's later ones); a checkpoint just
    written is never rotated away, whatever its step."""
    tok = smollm2_tokenizer
    Trainer(tiny(tok), tok, config(facts, tmp_path / "run", max_steps=4, save_steps=2)).train()
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ResumeError, match="already holds checkpoints of a run .checkpoint-000004"):
        Trainer(tiny(tok), tok, config(facts, tmp_path / "run", max_steps=4)).train()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    trainer = Trainer(tiny(tok), tok, config(facts, tmp_path / "run", save_total_limit=1))
    trainer.train_step()
    saved = trainer.save_checkpoint()  # step 1, older than the step-4 one that is also kept
    assert sorted(p.name for _, p in checkpoints.checkpoints(tmp_path / "run")) == [saved.name, "checkpoint-000004"]


def test_accumulation_equals_one_big_batch_and_bf16_trains(facts, tmp_path, smollm2_tokenizer):
    """2 micro-batches of 1 row = 1 batch of 2 rows: the loss is the mean over every learned
    token of the step (not a mean of micro-batch means), so loss and update agree."""
    tok = smollm2_tokenizer

    def one_step(**kw):
        trainer = Trainer(tiny(tok), tok, config(facts, tmp_path / str(len(kw)), lora_r=None, max_steps=1,
                                                 lora_dropout=0.0, **kw))
        grads = []
        trainer.optimizer.step = lambda: grads.extend(p.grad.clone() for p in trainer.params)  # what the step sees
        loss = trainer.train_step()["loss"]  # the same rows: epoch order is a function of (seed, epoch)
        return loss, grads
    (loss_big, big), (loss_small, small) = one_step(batch_size=2), one_step(batch_size=1, gradient_accumulation_steps=2)
    assert loss_big == pytest.approx(loss_small, abs=1e-6)
    assert len(big) == len(small) and all(torch.allclose(g, h, rtol=1e-4, atol=1e-7) for g, h in zip(big, small))
    bf16 = Trainer(tiny(tok), tok, config(facts, tmp_path / "bf16", lora_r=None, bf16=True, gradient_checkpointing=True,
                                          max_steps=8, learning_rate=3e-3))
    bf16.train()
    assert bf16.history[-1]["loss"] < bf16.history[0]["loss"]
