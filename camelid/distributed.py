"""Processes for torch.distributed: launch N ranks in one process group (as torchrun would), or
join the group torchrun describes. Knows nothing of Llama; tensor parallelism, FSDP training and
the tensor-parallel server run their ranks through it."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _entry(rank, fn, world, port, backend, timeout, args):
    import os
    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT in the
    environment): NCCL with a GPU per local rank, gloo otherwise. False when not under torchrun."""
    import os

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def launch(fn, nproc: int, *args, timeout: float = 1800) -> None:
    """Run fn(rank, world, *args) in `nproc` fresh processes joined in one process group (NCCL
    when there is a GPU per process, gloo otherwise), as torchrun would; fn must be importable.
    timeout: how long a collective may wait (a server's idle ranks wait for the next request).
    SIGTERM/SIGINT to this process are passed to rank 0, which tells the others to stop."""
    import os
    import signal
    import socket

    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_entry, args=(fn, nproc, port, backend, timeout, args), nprocs=nproc,
                             start_method="spawn", join=False)

    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        if ctx.processes[0].is_alive():
            os.kill(ctx.processes[0].pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not ctx.join():
            pass
    except mp.ProcessRaisedException as e:  # the failing rank's traceback is in the message
        raise RuntimeError(f"a rank failed:\n{e}") from None
    except mp.ProcessExitedException as e:
        if not (forwarded and e.error_index == 0 and e.exit_code == -forwarded[0]):
            raise RuntimeError(f"a rank exited: {e}") from None
        # rank 0 stopped on the signal it was passed (uvicorn re-raises it after a clean
        # shutdown); the others were told to stop and finish on their own
        for p in ctx.processes[1:]:
            p.join(60)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
