"""Fine-tuning: a trainer for full, LoRA and QLoRA runs, with checkpoints that resume exactly.

    config = TrainConfig(data="train.jsonl", out="run/", lora_r=8, max_steps=100)
    trainer = Trainer(model, tokenizer, config)     # model: float (full / LoRA) or quantized (QLoRA)
    trainer.train(resume_from_checkpoint="latest")  # or a checkpoint folder, or None
    # finetune(...) in camelid.train.finetune: load, all of the above, save out/final/

Run in a process group of several ranks (camelid finetune --nproc N, torchrun), the model is
sharded with FSDP2 (camelid/train/fsdp.py) and each rank takes batch_size / world rows of every
micro-batch: the step's data, loss and update are those of one process, with 1/world of the
weights, gradients and optimizer state per rank; checkpoints are DCP folders that load at any
world size.

One optimizer step = gradient_accumulation_steps micro-batches of batch_size rows. The loss is
the mean over every learned token of the step (not a mean of micro-batch means, which would
weight short batches more). Before each optimizer step the loss and gradient norm are checked:
a non-finite value stops the run (nonfinite="stop") or drops that step's update ("skip"), so
NaN never reaches the weights or a checkpoint.

A checkpoint (camelid/train/checkpoints.py) holds the weights (full) or the adapter (LoRA, in peft's
layout), optimizer.pt, scheduler.pt, rng.pt and trainer_state.json (step, epoch, position in the
epoch's order, base fingerprint, LoRA settings). The data order of each epoch is a function of
(seed, epoch), so with those restored, k steps + resume + (N - k) steps equals N steps straight.
The bar, metrics.jsonl, TensorBoard and MFU are camelid/train/metrics.py's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from camelid.train import checkpoints, fsdp
from camelid.train.data import IGNORE, OVERLONG, collate, epoch_order, load_examples, rows
from camelid.train.metrics import RunLog, peak_matmul_flops, print_summary, step_flops
from camelid.transforms.lora import apply_lora, lora_layers, load_adapter, save_adapter

SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """The loss or gradient went NaN/inf; the optimizer step was not taken."""


class ResumeError(ValueError):
    """A checkpoint that does not belong to this run (another base model, rank or mode)."""


@dataclass
class TrainConfig:
    """Field names follow transformers' TrainingArguments where the concept is the same."""
    data: str
    out: str = "out"
    eval_data: str | None = None
    # what is trained: LoRA of rank lora_r on target_modules, or every weight when lora_r is None
    lora_r: int | None = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    # data
    max_seq_len: int = 512
    packing: bool = False
    overlong: str = "truncate"
    # optimisation
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    max_steps: int | None = None
    num_train_epochs: float = 1.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    nonfinite: str = "stop"
    seed: int = 0
    # bookkeeping
    logging_steps: int = 1
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 3
    tensorboard: bool = False
    progress: bool = True
    peak_flops: float | None = None  # for MFU; measured with a matmul when None

    def __post_init__(self):
        def check(ok, name, want):
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {want}, got {getattr(self, name)!r}")

        def pos_int(name, allow_none=False, zero=False):
            v = getattr(self, name)
            check((allow_none and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v >= (0 if zero else 1)),
                  name, f"a{' non-negative' if zero else ' positive'} integer{' or None' if allow_none else ''}")

        for name in ("batch_size", "gradient_accumulation_steps", "logging_steps", "max_seq_len"):
            pos_int(name)
        for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit", "lora_r"):
            pos_int(name, allow_none=True)
        pos_int("warmup_steps", zero=True)
        pos_int("seed", zero=True)
        for name in ("learning_rate", "num_train_epochs"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, "a positive number")
        for name in ("weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, name, "a number >= 0")
        check(self.lr_scheduler_type in SCHEDULES, "lr_scheduler_type", f"one of {SCHEDULES}")
        check(self.nonfinite in NONFINITE, "nonfinite", f"one of {NONFINITE}")
        check(self.overlong in OVERLONG, "overlong", f"one of {OVERLONG}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- schedules

def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """The learning-rate multiplier at each optimizer step: linear warmup from 0, then cosine or
    linear decay to 0 at total_steps, or constant."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return f


# ---------------------------------------------------------------------- resume checks

def fingerprint(model) -> str:
    """A short hash of the frozen base weights (a strided sample of each tensor) and the config,
    to refuse resuming on another base model."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    lora = {id(p) for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in lora:
            continue
        t = t.detach()
        flat = t.reshape(-1)[:: max(1, t.numel() // 4096)].float().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, model, tokenizer, config: TrainConfig):
        from camelid.transforms.quantize import is_quantized

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.out = Path(config.out)
        self.device = model.device
        self.rank, self.world = fsdp.rank_world()
        if self.world > 1 and config.batch_size % self.world:
            raise ValueError(f"TrainConfig.batch_size {config.batch_size} must be a multiple of the world size "
                             f"{self.world}: each rank takes batch_size / world rows of every micro-batch")
        if self.world > 1 and is_quantized(model):
            raise ValueError("FSDP shards float weights: QLoRA (a quantized base) runs in one process")
        # The data is read and checked before anything else: a bad file stops the run at once.
        self.train_examples, self.data_stats = load_examples(config.data, tokenizer, config.max_seq_len, config.overlong)
        self.eval_examples = (load_examples(config.eval_data, tokenizer, config.max_seq_len, config.overlong)[0]
                              if config.eval_data else None)
        self.train_rows = rows(self.train_examples, config.max_seq_len, pack=config.packing)
        self.base_fingerprint = fingerprint(model)  # before adapters exist
        torch.manual_seed(config.seed)  # as transformers' Trainer: the seed fixes LoRA's initial A (the
        random.seed(config.seed)        # same on every rank, which FSDP needs) and the dropout stream
        if config.lora_r is None:
            if is_quantized(model):
                raise ValueError("full fine-tuning needs a float model; a quantized base takes LoRA (QLoRA): set lora_r")
            from camelid.transforms.fuse import unfuse
            from camelid.transforms.packed import unpack

            unfuse(unpack(model)).requires_grad_(True)
        elif not lora_layers(model):
            apply_lora(model, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       target_modules=config.target_modules, use_rslora=config.use_rslora)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.template = None
        if self.world > 1:
            self.template = fsdp.meta_copy(model)  # the plain shape, to save gathered weights in
            fsdp.shard_model(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=config.learning_rate, betas=tuple(config.adam_betas), eps=config.adam_epsilon)
        batches = math.ceil(len(self.train_rows) / config.batch_size)
        self.steps_per_epoch = max(1, batches // config.gradient_accumulation_steps)
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_train_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.lr_scheduler_type, config.warmup_steps, self.total_steps))
        self.step, self.epoch, self.position, self.skipped = 0, 0, 0, 0
        self.history: list[dict] = []
        self._peak = config.peak_flops

    # ------------------------------------------------------------------ data
    def _next_microbatch(self) -> dict[str, torch.Tensor]:
        """The next batch_size rows of this epoch's order, moving to the next epoch at its end."""
        B = self.config.batch_size
        order = epoch_order(len(self.train_rows), self.config.seed, self.epoch)
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = epoch_order(len(self.train_rows), self.config.seed, self.epoch)
        picked = order[self.position:self.position + B]
        self.position += B
        return collate([self.train_rows[i] for i in picked], self._pad_id())

    def _pad_id(self) -> int:
        return next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0)

    def _loss_sum(self, batch) -> torch.Tensor:
        """Summed next-token cross-entropy over the batch's learned tokens."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            logits = self.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"]).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict:
        cfg = self.config
        self.model.train()
        micro = [self._next_microbatch() for _ in range(cfg.gradient_accumulation_steps)]
        n_learn = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        t0 = time.perf_counter()
        total = 0.0
        for b in micro:
            if self.world > 1:  # this rank's rows; FSDP averages the ranks' gradients, so scale by world
                b = {k: v[self.rank::self.world] for k, v in b.items()}
            loss = self._loss_sum(b) / max(n_learn, 1)
            (loss * self.world).backward()
            total += float(loss.detach())
        if self.world > 1:
            total = fsdp.all_sum(total, self.device if self.device.type == "cuda" else None)
        norm = fsdp.full_norm(torch.nn.utils.clip_grad_norm_(
            self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
        finite = math.isfinite(total) and math.isfinite(norm)
        lr = self.scheduler.get_last_lr()[0]
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.nonfinite == "stop":
                raise NonFiniteError(f"step {self.step + 1}: loss {total} / gradient norm {norm} is not finite; "
                                     f"stopped before the optimizer step (the weights and checkpoints are untouched)")
            self.skipped += 1
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = sum(int((b["attention_mask"] > 0).sum()) for b in micro)
        model_flops = step_flops(self.model.config, micro, lora=cfg.lora_r is not None)
        if self._peak is None:
            self._peak = peak_matmul_flops(self.device, torch.bfloat16 if cfg.bf16 else torch.float32)
        return {"step": self.step, "epoch": round(self.epoch + self.position / max(1, len(self.train_rows)), 4),
                "loss": total, "grad_norm": norm, "lr": lr, "tokens": tokens,
                "tokens_per_s": tokens / dt, "mfu": model_flops / dt / (self._peak * self.world), "skipped": not finite}

    @torch.no_grad()
    def evaluate(self, examples=None) -> float:
        """Mean next-token loss over the learned tokens of the eval set (or `examples`)."""
        examples = examples if examples is not None else self.eval_examples
        if not examples:
            raise ValueError("no eval data: pass eval_data in TrainConfig")
        self.model.eval()
        eval_rows = rows(examples, self.config.max_seq_len)
        loss, n = 0.0, 0
        for i in range(0, len(eval_rows), self.config.batch_size):
            b = collate(eval_rows[i:i + self.config.batch_size], self._pad_id())
            loss += float(self._loss_sum(b))
            n += int((b["labels"][:, 1:] != IGNORE).sum())
        return loss / n

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint=None) -> dict:
        """Run to total_steps; resume_from_checkpoint: None, "latest" (the newest in `out`, if
        any) or a checkpoint folder. Returns {"step", "loss", "eval_loss", "skipped", "seconds"}."""
        cfg = self.config
        lead = self.rank == 0  # one rank writes logs and metrics; every rank trains
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoints.cleanup(self.out)  # temp folders of a save that was killed
        self._barrier()
        if resume_from_checkpoint == "latest":
            resume_from_checkpoint = checkpoints.latest(self.out)
        elif resume_from_checkpoint is None and checkpoints.latest(self.out) is not None and self.step == 0:
            raise ResumeError(f"{self.out} already holds checkpoints of a run ({checkpoints.latest(self.out).name}); "
                              f"resume it (resume_from_checkpoint='latest', camelid finetune --resume) or choose "
                              f"another output folder")
        if resume_from_checkpoint is not None:
            self.load_checkpoint(resume_from_checkpoint)
        t_start, last = time.perf_counter(), {}
        if cfg.progress and lead:
            print_summary(self.model, self.data_stats, len(self.train_rows), self.total_steps)
        with RunLog(self.out, self.step, lead, self.total_steps, progress=cfg.progress,
                    tensorboard=cfg.tensorboard) as log:
            while self.step < self.total_steps:
                last = self.train_step()
                if cfg.eval_steps and self.eval_examples and self.step % cfg.eval_steps == 0:
                    last["eval_loss"] = self.evaluate()
                if self.step % cfg.logging_steps == 0 or "eval_loss" in last or self.step == self.total_steps:
                    self.history.append(last)
                    log.write(last)
                log.advance(last)
                if cfg.save_steps and self.step % cfg.save_steps == 0:
                    self.save_checkpoint()
        if not cfg.save_steps or self.step % cfg.save_steps:
            self.save_checkpoint()
        self.model.eval()  # ready for generation; train_step switches back
        result = {"step": self.step, "loss": last.get("loss"), "skipped": self.skipped,
                  "seconds": time.perf_counter() - t_start}
        if self.eval_examples:
            result["eval_loss"] = self.evaluate()
        return result

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "skipped": self.skipped,
                "total_steps": self.total_steps, "base_fingerprint": self.base_fingerprint,
                "lora": getattr(self.model, "lora_config", None), "config": self.config.to_dict(),
                "history": self.history[-100:]}

    def save_checkpoint(self) -> Path:
        """One process: the weights (HF folder) or adapter (peft layout) and optimizer.pt. Several
        ranks (FSDP): one DCP folder, sharded/, that every rank writes its part of."""
        with checkpoints.writing_ranks(self.out, self.step, self.rank, self.world) as tmp:
            if self.world > 1:
                fsdp.save_sharded(self.model, self.optimizer, tmp / fsdp.SHARDED, trainable_only=self.config.lora_r is not None)
            elif self.config.lora_r is None:
                self.model.save_pretrained(tmp)
            else:
                save_adapter(self.model, tmp)
            checkpoints.save_rng(tmp, self.rank, self.world)
            if self.rank == 0:
                if self.world == 1:
                    torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                version, internal, gauss = random.getstate()
                state = dict(self._state(), world_size=self.world, python_rng=[version, list(internal), gauss])
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str) + "\n")
        saved = checkpoints.checkpoint_dir(self.out, self.step)
        if self.rank == 0:
            checkpoints.rotate(self.out, self.config.save_total_limit, keep_also=saved)
        self._barrier()
        return saved

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def unsharded(self):
        """The trained model as a plain module: itself in one process; under FSDP a gathered CPU
        copy on rank 0 and None on the others (every rank must call this)."""
        return self.model if self.world == 1 else fsdp.gather_full(self.model, self.template)

    def load_checkpoint(self, directory) -> None:
        """Restore weights/adapter, optimizer, scheduler, RNG and data position; refuse a checkpoint
        of another base model, LoRA rank/targets or training mode before changing anything."""
        directory = Path(directory)
        state_file = directory / "trainer_state.json"
        if not state_file.is_file():
            raise ResumeError(f"{directory}: not a training checkpoint (no trainer_state.json)")
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state["base_fingerprint"] != self.base_fingerprint:
            raise ResumeError(f"{directory} was trained from another base model (fingerprint {state['base_fingerprint']}, "
                              f"this model {self.base_fingerprint})")
        mine = getattr(self.model, "lora_config", None)
        if (state["lora"] is None) != (mine is None):
            raise ResumeError(f"{directory} is a {'full' if state['lora'] is None else 'LoRA'} fine-tuning checkpoint; "
                              f"this run is {'full' if mine is None else 'LoRA'} fine-tuning")
        if mine is not None:
            diff = {k: (state["lora"].get(k), mine[k]) for k in ("r", "lora_alpha", "target_modules", "use_rslora")
                    if state["lora"].get(k) != mine[k]}
            if diff:
                raise ResumeError(f"{directory}: LoRA settings differ from this run (checkpoint, run): {diff}")
        sharded = directory / fsdp.SHARDED
        if self.world > 1 and not sharded.is_dir():
            raise ResumeError(f"{directory} was saved by one process; a run over {self.world} ranks resumes from "
                              f"the sharded (DCP) checkpoints that FSDP runs write")
        if sharded.is_dir():  # written by FSDP at any world size; resharded to this one as it is read
            fsdp.load_sharded(self.model, self.optimizer, sharded, trainable_only=mine is not None)
        else:
            with torch.no_grad():
                if mine is None:
                    # save_checkpoint wrote it with the model's own save_pretrained; its class reads it back
                    loaded = type(self.model).from_pretrained(directory, dtype=self.model.dtype, device=self.device,
                                                              pack=False)
                    self.model.load_state_dict(loaded.state_dict())
                else:
                    self._copy_adapter(directory, lora_layers(self.model))
            self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        checkpoints.load_rng(directory, self.rank)  # this rank's, or rank 0's at another world size
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        # This run's schedule at the saved step (its total steps may differ from the saved run's).
        lrs = [base * f(self.scheduler.last_epoch) for base, f in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        self.skipped, self.history = state.get("skipped", 0), state.get("history", [])

    def _copy_adapter(self, directory: Path, layers) -> None:
        from camelid.transforms.lora import adapter_tensors

        tensors = adapter_tensors(directory)
        for name, m in layers.items():
            for ab in ("lora_A", "lora_B"):
                getattr(m, ab).weight.copy_(tensors[f"{name}.{ab}.weight"])


__all__ = ["NonFiniteError", "ResumeError", "TrainConfig", "Trainer", "fingerprint", "load_adapter", "lr_lambda",
           "peak_matmul_flops"]
