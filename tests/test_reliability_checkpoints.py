"""Issue 19, findings 1, 5 and 6: a kill at any step of a checkpoint save never loses a checkpoint;
a torn last line of metrics.jsonl does not block a resume; killed saves' temp files are swept."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from camelid.atomic import remove_stale_temps, temp_path
from camelid.train import checkpoints
from camelid.train.metrics import truncate_metrics


class Killed(BaseException):
    """The process died here: nothing after it runs (the injector makes every later step raise too)."""


class Injector:
    """Counts the transaction's steps (each rename, replace, fsync, rmtree) and dies at step `at`."""

    def __init__(self, monkeypatch, at):
        self.at, self.n, self.dead = at, 0, False
        for mod, name in ((os, "rename"), (os, "replace"), (os, "fsync"), (shutil, "rmtree")):
            real = getattr(mod, name)
            monkeypatch.setattr(mod, name, self.wrap(real, name == "rmtree"))

    def wrap(self, real, deletes):
        def step(*a, **k):
            if self.dead or self.n == self.at:
                if not self.dead and deletes:  # killed half-way through a deletion
                    first = sorted(Path(a[0]).iterdir())[:1] if Path(a[0]).is_dir() else []
                    for f in first:
                        f.unlink()
                self.dead = True
                raise Killed
            self.n += 1
            return real(*a, **k)
        return step


FILES = ("model.safetensors", "optimizer.pt", "trainer_state.json")


def write_ckpt(folder, tag):
    for f in FILES:
        (folder / f).write_text(f"{tag}:{f}")


def tag_of(folder):
    """The tag every file of a complete checkpoint folder carries, or None if it is partial/mixed."""
    tags = set()
    for f in FILES:
        p = folder / f
        if not p.is_file():
            return None
        tag, name = p.read_text().split(":")
        assert name == f
        tags.add(tag)
    return tags.pop() if len(tags) == 1 else None


def setup_run(out):
    for step in (1, 2):
        with checkpoints.writing(out, step) as tmp:
            write_ckpt(tmp, f"old{step}")


def save(out, step, keep=None):
    with checkpoints.writing(out, step) as tmp:
        write_ckpt(tmp, f"new{step}")
    checkpoints.rotate(out, keep, keep_also=checkpoints.checkpoint_dir(out, step))


def run_killed(monkeypatch, at, fn):
    """Run fn with a kill at step `at`; True when it got that far (the kill happened)."""
    with monkeypatch.context() as m:
        Injector(m, at)
        try:
            fn()
        except Killed:
            return True
    return False


def check(out, step, expect_tags, min_step):
    found = checkpoints.checkpoints(out)
    assert found, "every checkpoint was lost"
    for s, p in found:
        assert tag_of(p) is not None, f"{p.name} is partial"
    latest = checkpoints.latest(out)
    latest_step = found[-1][0]
    assert latest_step >= min_step, f"checkpoint {min_step} was lost: {[p.name for _, p in found]}"
    if latest_step == step:
        assert tag_of(latest) in expect_tags
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "cleanup left hidden folders"


@pytest.mark.parametrize("case", ["resave", "new_step", "new_step_rotated"])
def test_a_kill_at_every_step_of_a_save_and_of_cleanup_never_loses_a_checkpoint(tmp_path, monkeypatch, case):
    step, keep = {"resave": (2, None), "new_step": (3, None), "new_step_rotated": (3, 1)}[case]
    # resave: checkpoint-2 exists (a resumed run saves step 2 again): old2 or new2 must survive.
    # new_step: checkpoint-2 must survive; checkpoint-3, when found, is whole.
    expect = {"old2", "new2"} if step == 2 else {"new3"}
    at = 0
    while True:
        out = tmp_path / f"{case}-{at}"
        setup_run(out)
        if not run_killed(monkeypatch, at, lambda out=out: save(out, step, keep)):
            check(out, step, expect, min_step=2)
            assert checkpoints.latest(out).name == f"checkpoint-{step:06d}"
            break
        # the next run: cleanup, itself killed at each of its steps, then run again to the end
        c = 0
        while True:
            trial = tmp_path / f"{case}-{at}-c{c}"
            shutil.copytree(out, trial)
            killed = run_killed(monkeypatch, c, lambda trial=trial: checkpoints.cleanup(trial))
            checkpoints.cleanup(trial)
            check(trial, step, expect, min_step=2)
            if not killed:
                break
            c += 1
        at += 1
    assert at >= 6  # fsyncs of each file and the folder, rename(s), fsync of out, removal of the old copy


def test_cleanup_restores_the_old_copy_when_the_new_one_never_got_its_name(tmp_path):
    out = tmp_path / "run"
    setup_run(out)
    final = checkpoints.checkpoint_dir(out, 2)
    os.rename(final, out / ".checkpoint-000002.abcdef012345.old")  # a kill between the two renames
    tmp = out / ".checkpoint-000002.0123456789ab.tmp"
    tmp.mkdir()
    write_ckpt(tmp, "new2")
    checkpoints.cleanup(out)
    assert tag_of(final) == "old2" and checkpoints.latest(out) == final
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "checkpoint-000002"]


# ---------------------------------------------------------------- finding 5: metrics.jsonl

def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl.*line 3"):
        truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_a_torn_metrics_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n'
    path.write_text(text)
    with pytest.raises(ValueError, match=r"metrics\.jsonl.*line 2"):
        truncate_metrics(path, 3)
    assert path.read_text() == text  # left as it was for the user to look at


def test_a_whole_metrics_file_is_truncated_without_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


# ---------------------------------------------------------------- finding 6: stale temp files

def test_remove_stale_temps_removes_only_the_named_targets_temps(tmp_path):
    stale = temp_path(tmp_path / "model.safetensors")
    stale.write_bytes(b"x")
    other = temp_path(tmp_path / "notes.txt")
    other.write_bytes(b"x")
    keep = [tmp_path / ".model.safetensors.swp", tmp_path / ".model.safetensors.nothex0000000000.tmp",
            tmp_path / "model.safetensors"]
    for p in keep:
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path, ["model.safetensors"]) == [stale]
    assert not stale.exists() and other.exists() and all(p.exists() for p in keep)


def tiny_model():
    from camelid import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_save_pretrained_sweeps_the_temps_a_killed_save_left(tmp_path):
    from camelid.formats.hf import save_pretrained

    out = tmp_path / "m"
    out.mkdir()
    stale = [temp_path(out / n) for n in ("model.safetensors", "config.json", "model-00002-of-00003.safetensors",
                                          "model.safetensors.index.json")]
    for p in stale:
        p.write_bytes(b"partial")
    unrelated = [out / ".hidden", temp_path(out / "tokenizer.json")]
    for p in unrelated:
        p.write_bytes(b"x")
    save_pretrained(tiny_model(), out)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in unrelated)


def test_save_gguf_sweeps_the_temps_a_killed_save_left(tmp_path):
    from camelid.formats.gguf_write import save_gguf

    stale = temp_path(tmp_path / "model.gguf")
    stale.write_bytes(b"partial")
    other = temp_path(tmp_path / "other.gguf")
    other.write_bytes(b"x")
    save_gguf(tiny_model(), tmp_path / "model.gguf", dtype="f32")
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [other.name]


# ---------------------------------------------------------------- through the trainer

def test_a_resave_killed_between_its_renames_then_a_resume_matches_an_unkilled_run(tmp_path, smollm2_tokenizer,
                                                                                    monkeypatch):
    """A resumed run saves step 2 again and is killed between its two renames (checkpoint-2 moved
    aside, the new copy not yet in place), and metrics.jsonl ends in a torn line; the next run
    resumes from checkpoint-2 and its losses are those of a run that was never killed."""
    import json

    from camelid import LlamaConfig, LlamaForCausalLM
    from camelid.train.trainer import TrainConfig, Trainer

    tok = smollm2_tokenizer
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                             + "\n" for q, a in [("Where do snorkbirds nest?", "In hollow teapots."),
                                                 ("What colour is a snorkbird?", "Bright orange.")]))

    def trainer(out):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True))
        return Trainer(model, tok, TrainConfig(data=str(facts), out=str(out), max_steps=4, batch_size=2,
                                               learning_rate=1e-2, warmup_steps=1, lora_dropout=0.1, progress=False,
                                               peak_flops=1e12))

    straight = trainer(tmp_path / "a")
    torch.manual_seed(1)
    straight.train()

    out = tmp_path / "b"
    first = trainer(out)
    torch.manual_seed(1)
    head = [first.train_step()["loss"] for _ in range(2)]
    first.save_checkpoint()
    again = trainer(out)
    again.load_checkpoint(checkpoints.latest(out))
    real_rename, dead = os.rename, []

    def rename(src, dst):
        if dead or (Path(src).name.startswith(".checkpoint-") and Path(src).name.endswith(".tmp")):
            dead.append(src)
            raise Killed
        return real_rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", rename)
        m.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            again.save_checkpoint()
    assert not checkpoints.checkpoints(out)  # the kill left checkpoint-2 only under its .old name
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # and a torn line

    resumed = trainer(out)
    torch.manual_seed(99)
    with pytest.warns(UserWarning, match="torn"):
        resumed.train(resume_from_checkpoint="latest")
    assert head + [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_full_disk_says_no_space_left_and_keeps_nothing_of_the_checkpoint(tmp_path):
    """A real full disk (a 256 KiB tmpfs): torch.save's '[enforce fail at inline_container.cc]'
    becomes OSError(ENOSPC) naming the checkpoint; no temp folder is left, the old one stays."""
    import errno
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with checkpoints.writing(disk, 1) as tmp:
            torch.save(torch.zeros(8), tmp / "small.pt")  # fits
        with pytest.raises(OSError, match="no space left on device writing checkpoint-0*2 ") as info:
            with checkpoints.writing(disk, 2) as tmp:
                torch.save(torch.zeros(1 << 20), tmp / "big.pt")  # 4 MiB: does not
        assert info.value.errno == errno.ENOSPC
        assert sorted(p.name for p in disk.iterdir()) == [checkpoints.checkpoint_dir(disk, 1).name]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # -l: a failed writer may hold a handle
