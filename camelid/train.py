"""Fine-tuning: a trainer for full, LoRA and QLoRA runs, with checkpoints that resume exactly.

    config = TrainConfig(data="train.jsonl", out="run/", lora_r=8, max_steps=100)
    trainer = Trainer(model, tokenizer, config)     # model: float (full / LoRA) or quantized (QLoRA)
    trainer.train(resume_from_checkpoint="latest")  # or a checkpoint folder, or None
    finetune(model="smollm2-135m-instruct", data="train.jsonl", out="run/", lora_r=8)  # all of the above

Run in a process group of several ranks (camelid finetune --nproc N, torchrun), the model is
sharded with FSDP2 (camelid/fsdp.py) and each rank takes batch_size / world rows of every
micro-batch: the step's data, loss and update are those of one process, with 1/world of the
weights, gradients and optimizer state per rank; checkpoints are DCP folders that load at any
world size.

One optimizer step = gradient_accumulation_steps micro-batches of batch_size rows. The loss is
the mean over every learned token of the step (not a mean of micro-batch means, which would
weight short batches more). Before each optimizer step the loss and gradient norm are checked:
a non-finite value stops the run (nonfinite="stop") or drops that step's update ("skip"), so
NaN never reaches the weights or a checkpoint.

A checkpoint (camelid/checkpoints.py) holds the weights (full) or the adapter (LoRA, in peft's
layout), optimizer.pt, scheduler.pt, rng.pt and trainer_state.json (step, epoch, position in the
epoch's order, base fingerprint, LoRA settings). The data order of each epoch is a function of
(seed, epoch), so with those restored, k steps + resume + (N - k) steps equals N steps straight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoints, fsdp
from .accounting import flops
from .data import IGNORE, OVERLONG, collate, epoch_order, load_examples, rows
from .lora import apply_lora, lora_layers, load_adapter, save_adapter

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


def peak_matmul_flops(device, dtype: torch.dtype, n: int = 1024, repeat: int = 8) -> float:
    """FLOP/s of a square matmul here: the denominator of MFU when the hardware peak is not given."""
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # not randn: the run's RNG stream stays untouched
    a @ a  # warm up
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        a @ a
    sync()
    return 2 * n ** 3 * repeat / (time.perf_counter() - t)


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
        from .quantize import is_quantized

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
            from .fuse import unfuse
            from .packed import unpack

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
        # forward + backward: 3x forward for full fine-tuning, 2x for LoRA (frozen weights get no gradient)
        passes = 3 if cfg.lora_r is None else 2
        model_flops = sum(passes * flops(self.model.config, b["input_ids"].shape[1], b["input_ids"].shape[0]).forward
                          for b in micro)
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
        from tqdm.auto import tqdm

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
        metrics_path = self.out / "metrics.jsonl"
        if lead:
            self._truncate_metrics(metrics_path)
        writer = self._tensorboard() if lead else None
        t_start, last = time.perf_counter(), {}
        if cfg.progress and lead:
            from .lora import print_trainable_parameters

            print_trainable_parameters(self.model)
            print(f"{self.data_stats['examples']} examples ({self.data_stats['tokens']} tokens, "
                  f"{self.data_stats['truncated']} truncated, {self.data_stats['dropped']} dropped) in "
                  f"{len(self.train_rows)} rows; {self.total_steps} steps")
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and lead), desc="train",
                   unit="step")
        try:
            with open(metrics_path, "a", encoding="utf-8") if lead else contextlib.nullcontext() as metrics:
                while self.step < self.total_steps:
                    last = self.train_step()
                    if cfg.eval_steps and self.eval_examples and self.step % cfg.eval_steps == 0:
                        last["eval_loss"] = self.evaluate()
                    if self.step % cfg.logging_steps == 0 or "eval_loss" in last or self.step == self.total_steps:
                        self.history.append(last)
                        if lead:
                            metrics.write(json.dumps(last) + "\n")
                            metrics.flush()
                        if writer is not None:
                            for k in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "eval_loss"):
                                if k in last:
                                    writer.add_scalar(f"train/{k}" if k != "eval_loss" else "eval/loss", last[k], self.step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                    if cfg.save_steps and self.step % cfg.save_steps == 0:
                        self.save_checkpoint()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if not cfg.save_steps or self.step % cfg.save_steps:
            self.save_checkpoint()
        self.model.eval()  # ready for generation; train_step switches back
        result = {"step": self.step, "loss": last.get("loss"), "skipped": self.skipped,
                  "seconds": time.perf_counter() - t_start}
        if self.eval_examples:
            result["eval_loss"] = self.evaluate()
        return result

    def _tensorboard(self):
        if not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed (pip install tensorboard): metrics go to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _truncate_metrics(self, path: Path) -> None:
        """Drop lines a killed run wrote after the checkpoint it resumes from."""
        if not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        from .config import atomic_write_text

        atomic_write_text(path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "skipped": self.skipped,
                "total_steps": self.total_steps, "base_fingerprint": self.base_fingerprint,
                "lora": getattr(self.model, "lora_config", None), "config": self.config.to_dict(),
                "history": self.history[-100:]}

    def save_checkpoint(self) -> Path:
        """One process: the weights (HF folder) or adapter (peft layout) and optimizer.pt. Several
        ranks (FSDP): one DCP folder, sharded/, that every rank writes its part of."""
        with self._writing() as tmp:
            if self.world > 1:
                fsdp.save_sharded(self.model, self.optimizer, tmp / fsdp.SHARDED, trainable_only=self.config.lora_r is not None)
            elif self.config.lora_r is None:
                self.model.save_pretrained(tmp)
            else:
                save_adapter(self.model, tmp)
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            torch.save(rng, tmp / ("rng.pt" if self.world == 1 else f"rng-{self.rank}.pt"))
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

    @contextlib.contextmanager
    def _writing(self):
        """checkpoints.writing on rank 0; the other ranks write into the same temp folder, and it is
        renamed into place only after every rank has finished."""
        if self.world == 1:
            with checkpoints.writing(self.out, self.step) as tmp:
                yield tmp
            return
        import torch.distributed as dist

        if self.rank == 0:
            with checkpoints.writing(self.out, self.step) as tmp:
                dist.broadcast_object_list([str(tmp)], src=0)
                yield tmp
                dist.barrier()
        else:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            yield Path(box[0])
            dist.barrier()

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
                    from .formats.hf import load_hf

                    loaded = load_hf(directory, dtype=self.model.dtype, device=self.device)
                    self.model.load_state_dict(loaded.state_dict())
                else:
                    self._copy_adapter(directory, lora_layers(self.model))
            self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        # this rank's RNG when the world size is the same; rank 0's otherwise (dropout masks then differ)
        rng_file = next(f for f in (directory / "rng.pt", directory / f"rng-{self.rank}.pt", directory / "rng-0.pt")
                        if f.is_file())
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda:"))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
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
        from .lora import adapter_tensors

        tensors = adapter_tensors(directory)
        for name, m in layers.items():
            for ab in ("lora_A", "lora_B"):
                getattr(m, ab).weight.copy_(tensors[f"{name}.{ab}.weight"])


# ---------------------------------------------------------------------- one call

def finetune(model=None, data=None, out="out", tokenizer=None, qlora: bool = False, resume=None,
             dtype=None, nproc: int = 1, **options) -> dict:
    """Load `model` (a path or name; the default model when None), fine-tune on `data` (JSONL) and
    write out/checkpoint-*/ and out/final/ (the adapter in peft's layout, or a full HF folder with
    the tokenizer). qlora: the base is quantized to NF4 and frozen. nproc > 1: FSDP over that many
    processes (gloo on CPU, NCCL with a GPU each), launched here. Options: TrainConfig's fields."""
    from .model import LlamaForCausalLM
    from .tokenizer import Tokenizer

    config = TrainConfig(data=data, out=str(out), **options)  # a bad option fails before anything starts
    by_name = isinstance(model, (str, Path)) or model is None
    if nproc > 1:
        return _finetune_launched(model, data, out, qlora, resume, dtype, nproc, by_name, options)
    if tokenizer is None and not by_name:
        raise ValueError("pass tokenizer= along with a model object (a name or path brings its own)")
    tokenizer = tokenizer or Tokenizer.from_pretrained(model)
    if by_name:
        if qlora and config.lora_r is None:
            raise ValueError("qlora trains a LoRA adapter: set lora_r")
        rank, world = fsdp.rank_world()
        device = f"cuda:{torch.cuda.current_device()}" if world > 1 and torch.cuda.is_available() else None
        model = LlamaForCausalLM.from_pretrained(model, dtype=dtype, pack=False, load_in_4bit=qlora,
                                                 bnb_4bit_quant_type="nf4", device=device)
    trainer = Trainer(model, tokenizer, config)
    result = trainer.train(resume_from_checkpoint=resume)
    final = Path(out) / "final"
    plain = trainer.unsharded()  # every rank takes part; rank 0 gets the weights
    if trainer.rank == 0:
        if config.lora_r is None:
            plain.save_pretrained(final)
        else:
            save_adapter(plain, final)
        tokenizer.save_pretrained(final)
    result["final"] = str(final)
    return result


def _finetune_launched(model, data, out, qlora, resume, dtype, nproc, by_name, options) -> dict:
    import tempfile

    from .distributed import launch

    if not by_name:
        raise ValueError("finetune(nproc > 1) loads the model in every process: pass a name or path, not a model object")
    if qlora:
        raise ValueError("FSDP shards float weights: QLoRA (a quantized base) runs with nproc=1")
    batch_size = options.get("batch_size", TrainConfig.batch_size)
    if batch_size % nproc:
        raise ValueError(f"batch_size {batch_size} must be a multiple of nproc {nproc}: each rank takes "
                         f"batch_size / nproc rows of every micro-batch")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        launch(_finetune_rank, nproc, dict(model=model, data=data, out=str(out), resume=resume, dtype=dtype, **options),
               str(result_file))
        return json.loads(result_file.read_text(encoding="utf-8"))


def _finetune_rank(rank, world, kwargs, result_file):
    """One FSDP rank of finetune(nproc=N); rank 0 reports the result."""
    result = finetune(**kwargs)
    if rank == 0:
        Path(result_file).write_text(json.dumps(result), encoding="utf-8")


__all__ = ["NonFiniteError", "ResumeError", "TrainConfig", "Trainer", "finetune", "load_adapter"]
