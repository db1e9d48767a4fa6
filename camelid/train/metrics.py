"""What a training run reports: the progress bar, out/metrics.jsonl, TensorBoard scalars, and the
throughput figures (tokens/s, MFU) of each optimizer step.

    with RunLog(out, step, lead=rank == 0, total_steps=N, progress=True, tensorboard=False) as log:
        log.write(record)   # one line of metrics.jsonl (+ TensorBoard), on the lead rank only
        log.advance(record) # the bar moves one step

Only the lead rank (rank 0) writes; the other ranks get a RunLog that does nothing, so the loop is
the same on every rank. On resume, metrics.jsonl keeps the lines up to the checkpoint's step and
drops what a killed run wrote after it, so the file reads as one run.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from camelid.core.accounting import flops

SCALARS = ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "eval_loss")


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


def step_flops(config, batches, lora: bool) -> float:
    """Model FLOPs of one optimizer step over `batches` (collated micro-batches): forward + backward
    is 3x the forward for full fine-tuning, 2x for LoRA (frozen weights get no weight gradient)."""
    passes = 2 if lora else 3
    return sum(passes * flops(config, b["input_ids"].shape[1], b["input_ids"].shape[0]).forward for b in batches)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run wrote after the checkpoint (at `step`) it resumes from.

    A torn last line (the run was killed, or the disk filled, in the middle of writing it) is
    dropped with a warning; an unreadable line before the last one is not a torn write, and is an
    error naming the file and the line (the file is left as it is)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    kept = []
    for k, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if k == len(numbered) - 1:
                warnings.warn(f"{path} line {i} is torn (a run was killed while writing it): dropping it",
                              stacklevel=2)
                break
            raise ValueError(f"{path} line {i} is not a JSON object; fix or remove that line to resume")
        if record.get("step", 0) <= step:
            kept.append(line)
    from camelid.atomic import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in kept))


def tensorboard_writer(directory: Path):
    """A SummaryWriter in `directory`, or None (with a warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed (pip install tensorboard): metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(directory))


class RunLog:
    """The bar, metrics.jsonl and TensorBoard of one run (see the module docstring)."""

    def __init__(self, out, step: int, lead: bool, total_steps: int, progress: bool = True,
                 tensorboard: bool = False):
        from tqdm.auto import tqdm

        self.out, self.lead = Path(out), lead
        self.path = self.out / "metrics.jsonl"
        self.file = self.writer = None
        if lead:
            truncate_metrics(self.path, step)
            self.writer = tensorboard_writer(self.out / "tensorboard") if tensorboard else None
            self.file = open(self.path, "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=step, disable=not (progress and lead), desc="train", unit="step")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for k in SCALARS:
                if k in record:
                    self.writer.add_scalar(f"train/{k}" if k != "eval_loss" else "eval/loss", record[k], record["step"])

    def advance(self, record: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def print_summary(model, data_stats: dict, n_rows: int, total_steps: int) -> None:
    """What is trained and on what, printed once before the first step."""
    from camelid.transforms.lora import print_trainable_parameters

    print_trainable_parameters(model)
    print(f"{data_stats['examples']} examples ({data_stats['tokens']} tokens, {data_stats['truncated']} truncated, "
          f"{data_stats['dropped']} dropped) in {n_rows} rows; {total_steps} steps")
