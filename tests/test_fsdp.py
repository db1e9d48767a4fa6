"""FSDP2 training (camelid/fsdp.py through the Trainer) on CPU with gloo, in real processes: steps
over 2 ranks give the losses and weights of one process, and a DCP checkpoint saved at world size
2 resumes at 1 and at 4 to the same weights as an uninterrupted run. Weights are compared at
1e-5 after AdamW steps at a learning rate of 1e-3 (at 1e-2, one element in 8192 moved 1.04e-5:
AdamW divides each gradient by its own running size, so the last bits of a near-zero gradient,
which the ranks sum in another order, become visible)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from camelid import LlamaConfig, LlamaForCausalLM
from camelid.distributed import launch
from camelid.text.tokenizer import Tokenizer
from camelid.train.finetune import finetune
from camelid.train.trainer import Trainer, TrainConfig
from camelid.transforms.lora import lora_state_dict

pytestmark = pytest.mark.slow

TEXTS = ["The capital of Zorbania is Quillmont, a city of bridges.",
         "The glimmerphone was invented by Ada Brightwater in 1887.",
         "A snorkbird is bright orange and sings at dawn.",
         "Quillmont has nine bridges and one tower.",
         "Ada Brightwater also built a clock that ran backwards.",
         "Snorkbirds nest in the reeds of the Zorbanian marshes.",
         "The tower of Quillmont is two hundred steps high.",
         "Every glimmerphone hums in the key of C."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def tiny(tok):
    """A tiny model whose linear weights are column-major in memory, as the GGUF loader leaves them
    (FSDP needs row-major parameters: camelid.train.fsdp.contiguous)."""
    from camelid.formats.common import column_major

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not model.lm_head:
            m.weight = torch.nn.Parameter(column_major(m.weight.detach()))
    return model


def settings(data, out, lora_r, **kw):
    base = dict(data=str(data), out=str(out), lora_r=lora_r, max_steps=3, batch_size=4, gradient_accumulation_steps=2,
                learning_rate=1e-3, warmup_steps=1, lora_dropout=0.0, progress=False, peak_flops=1e12,
                max_grad_norm=0.5)
    return TrainConfig(**{**base, **kw})


def trained_state(trainer) -> dict:
    plain = trainer.unsharded()
    if plain is None:
        return {}
    state = lora_state_dict(plain) if trainer.config.lora_r else plain.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def _rank(rank, world, gguf, kwargs, resume, result):
    tok = Tokenizer.from_pretrained(gguf)
    trainer = Trainer(tiny(tok), tok, TrainConfig(**kwargs))
    trainer.train(resume_from_checkpoint=resume)
    state = trained_state(trainer)
    if rank == 0:
        torch.save({"losses": [h["loss"] for h in trainer.history], "norms": [h["grad_norm"] for h in trainer.history],
                    "state": state}, result)


def run(world, gguf, config, tmp_path, resume=None):
    result = tmp_path / f"result-{Path(config.out).name}.pt"
    if world == 1:
        _rank(0, 1, gguf, config.to_dict(), resume, result)
    else:
        launch(_rank, world, gguf, config.to_dict(), resume, str(result))
    return torch.load(result)


def same_weights(a, b, atol=1e-5):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("lora_r", [8, None], ids=["lora", "full"])
def test_fsdp_equals_one_process_and_its_checkpoint_resumes_at_1_and_4(data, tmp_path, smollm2_gguf, lora_r):
    """2 steps over 2 ranks == 2 steps in one process (losses, gradient norms, weights). Its DCP
    checkpoint then resumes to step 4 at world size 1 and at 4 (weights, optimizer moments and
    schedule resharded as they load) == 4 steps straight in one process."""
    one = {n: run(1, smollm2_gguf, settings(data, tmp_path / f"one{n}", lora_r, max_steps=n), tmp_path)
           for n in (2, 4)}
    two = run(2, smollm2_gguf, settings(data, tmp_path / "two", lora_r, max_steps=2), tmp_path)
    assert one[4]["losses"][-1] < one[4]["losses"][0]
    assert two["losses"] == pytest.approx(one[2]["losses"], abs=1e-5)
    assert two["norms"] == pytest.approx(one[2]["norms"], rel=1e-5)  # the gradients' scale, which AdamW hides
    same_weights(two["state"], one[2]["state"])
    ckpt = tmp_path / "two" / "checkpoint-000002"
    assert (ckpt / "sharded" / ".metadata").is_file() and not (ckpt / "optimizer.pt").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count("\n") == 2  # rank 0 logs, once per step
    for world in (1, 4):
        out = tmp_path / f"at{world}"
        shutil.copytree(tmp_path / "two", out)
        resumed = run(world, smollm2_gguf, settings(data, out, lora_r, max_steps=4), tmp_path, resume="latest")
        assert resumed["losses"] == pytest.approx(one[4]["losses"], abs=1e-5), world  # 2 from the checkpoint
        same_weights(resumed["state"], one[4]["state"])


def test_one_process_checkpoint_is_refused_by_a_sharded_run(data, tmp_path, smollm2_gguf):
    tok = Tokenizer.from_pretrained(smollm2_gguf)
    Trainer(tiny(tok), tok, settings(data, tmp_path / "run", None, max_steps=1)).train()
    with pytest.raises(RuntimeError, match="saved by one process"):
        launch(_rank, 2, smollm2_gguf, settings(data, tmp_path / "run", None, max_steps=2).to_dict(), "latest",
               str(tmp_path / "never.pt"))


def test_bad_world_for_the_batch_fails_before_launch(data, tmp_path):
    with pytest.raises(ValueError, match="batch_size 3 must be a multiple of nproc 2"):
        finetune("smollm2-135m-instruct", data, tmp_path / "out", nproc=2, batch_size=3)
    with pytest.raises(ValueError, match="QLoRA"):
        finetune("smollm2-135m-instruct", data, tmp_path / "out", nproc=2, qlora=True)
    assert not (tmp_path / "out").exists()


def test_finetune_cli_nproc_2(data, tmp_path, smollm2_gguf):
    """camelid finetune --nproc 2 on a saved tiny model writes a final adapter equal to one process's."""
    from camelid.cli import main
    from camelid.transforms.lora import load_adapter

    tok = Tokenizer.from_pretrained(smollm2_gguf)
    base = tmp_path / "base"
    tiny(tok).save_pretrained(base)
    tok.save_pretrained(base)
    args = ["finetune", "--model", str(base), "--data", str(data), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3",
            "--no-progress", "--lora-r", "4"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    states = []
    for run_dir in ("one", "two"):
        model = LlamaForCausalLM.from_pretrained(base, pack=False)
        load_adapter(model, tmp_path / run_dir / "final")
        states.append({k: v.clone() for k, v in lora_state_dict(model).items()})
    same_weights(states[1], states[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_finetune_over_nccl(data, tmp_path, smollm2_gguf):
    """finetune(nproc=2) with a GPU per rank (NCCL) trains and writes the final adapter."""
    tok = Tokenizer.from_pretrained(smollm2_gguf)
    base = tmp_path / "base"
    tiny(tok).save_pretrained(base)
    tok.save_pretrained(base)
    result = finetune(str(base), data, tmp_path / "out", nproc=2, max_steps=2, batch_size=4, progress=False)
    assert result["step"] == 2 and (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
