"""Training checkpoints on disk: whole folders that appear at once, rotation that keeps the newest.

    out/checkpoint-000040/    one checkpoint: weights or adapter, optimizer, scheduler, RNG, data position
    out/.checkpoint-000050.<hex>.tmp/   a save in progress (a kill leaves it; cleanup() removes it)
    out/.checkpoint-000040.<hex>.old/   a complete checkpoint moved aside by a save of the same step
    out/.checkpoint-000030.<hex>.del/   a checkpoint being deleted (rotation, or an .old once replaced)

A save writes every file into a hidden temp folder, fsyncs each file and the folder, then renames
the folder to its final name (one atomic rename) and fsyncs the parent. So a checkpoint folder
either exists complete or not at all: a kill at any moment leaves the previous checkpoints as they
were. Rotation runs only after the new folder is in place, and never removes the newest one.

Saving a step that already has a folder (after a resume from an older checkpoint) takes two
renames: checkpoint-N to .checkpoint-N.<hex>.old, then the new temp folder to checkpoint-N. An
.old folder is always complete (it was a final folder, moved whole), and it is only deleted once
checkpoint-N is back in place, by renaming it to .del first. cleanup() therefore restores an .old
whose checkpoint-N is missing (a kill between the two renames) and deletes only what is not needed:
.tmp folders (possibly partial), .del folders, and .old folders whose checkpoint-N exists. At every
moment some complete checkpoint-N (old or new) exists or is restored by cleanup().
Deleting a folder (rotation, a replaced .old) renames it to .del first, so a kill in the middle of
shutil.rmtree never leaves a partial folder under a name that counts as a checkpoint.
Under FSDP every rank writes its part into the same temp folder (writing_ranks), and the rename
waits for all of them. rng.pt (rng-<rank>.pt under FSDP) holds the torch and CUDA generators.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from camelid.atomic import fsync_dir

PREFIX = "checkpoint-"
_NAME = re.compile(rf"{PREFIX}(\d+)")
_TEMP = re.compile(rf"\.({PREFIX}\d+)\.[0-9a-f]+\.(tmp|old|del)")


def checkpoint_dir(out, step: int) -> Path:
    return Path(out) / f"{PREFIX}{step:06d}"


def checkpoints(out) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in `out`, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def latest(out) -> Path | None:
    found = checkpoints(out)
    return found[-1][1] if found else None


def cleanup(out) -> list[Path]:
    """Finish or undo what an interrupted save left behind; returns the folders removed.

    An .old folder (a complete checkpoint moved aside) whose checkpoint-N is missing is renamed
    back to checkpoint-N; .tmp and .del folders, and .old folders whose checkpoint-N exists, are
    removed (see the module docstring)."""
    out = Path(out)
    if not out.is_dir():
        return []
    left = sorted(((p, m) for p in out.iterdir() if (m := _TEMP.fullmatch(p.name)) and p.is_dir()),
                  key=lambda pm: pm[0].name)
    restored = False
    for p, m in left:
        final = out / m.group(1)
        if m.group(2) == "old" and not final.exists():
            os.rename(p, final)  # a kill between writing()'s two renames: the old copy comes back
            restored = True
    if restored:
        fsync_dir(out)
    removed = [p for p, _ in left if p.exists()]
    for p in removed:
        _remove(p)
    return removed


def _remove(directory: Path) -> None:
    """Delete a folder by renaming it to a .del name first, so that a kill during the deletion
    leaves nothing that looks like a checkpoint (or an .old cleanup would restore)."""
    m = _TEMP.fullmatch(directory.name) or _NAME.fullmatch(directory.name)
    if m is not None and not directory.name.endswith(".del"):
        name = m.group(1) if m.re is _TEMP else directory.name
        doomed = directory.with_name(f".{name}.{secrets.token_hex(6)}.del")
        try:
            os.rename(directory, doomed)
        except OSError:
            return  # left as it was: the next cleanup() or rotation tries again
        directory = doomed
    shutil.rmtree(directory, ignore_errors=True)


def fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def _disk_full(e: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC, or a torch.save failure (its C++ writer says
    "[enforce fail at inline_container.cc] ...", "iostream error", "file write failed", never why)
    with under 1 MiB left where it wrote."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    if isinstance(e, (RuntimeError, OSError)):
        try:
            return shutil.disk_usage(where).free < 1 << 20
        except OSError:
            return False
    return False


@contextmanager
def writing(out, step: int):
    """`with writing(out, step) as tmp:` write the checkpoint's files into `tmp`; on a clean exit
    the folder becomes out/checkpoint-<step> in one rename, on an exception it is removed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out, step)
    tmp = out / f".{final.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():  # the same step saved again (after a resume): swap, then drop the old one
            old = out / f".{final.name}.{secrets.token_hex(6)}.old"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(out)
    except BaseException as e:
        full = _disk_full(e, out)
        if old is not None and not final.exists():
            os.rename(old, final)  # the swap failed half-way: the old checkpoint goes back
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, f"no space left on device writing {final.name} into {out} (nothing of it "
                                        f"was kept; free some space, or keep fewer checkpoints with "
                                        f"save_total_limit)") from e
        raise
    if old is not None:
        _remove(old)  # checkpoint-N is in place: the old copy is no longer needed


@contextmanager
def writing_ranks(out, step: int, rank: int, world: int):
    """writing() for a process group: rank 0 makes the temp folder and tells the others its name;
    every rank writes its files into it, and it is renamed into place only after all have finished."""
    if world == 1:
        with writing(out, step) as tmp:
            yield tmp
        return
    import torch.distributed as dist

    if rank == 0:
        with writing(out, step) as tmp:
            dist.broadcast_object_list([str(tmp)], src=0)
            yield tmp
            dist.barrier()
    else:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        yield Path(box[0])
        dist.barrier()


def save_rng(directory: Path, rank: int = 0, world: int = 1) -> None:
    """This process's torch (and CUDA) generator states: rng.pt, or rng-<rank>.pt under FSDP."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    torch.save(rng, Path(directory) / ("rng.pt" if world == 1 else f"rng-{rank}.pt"))


def load_rng(directory: Path, rank: int = 0) -> None:
    """Restore the generators save_rng wrote: this rank's when the world size is the same, rank 0's
    otherwise (dropout masks then differ from the saved run's)."""
    directory = Path(directory)
    rng_file = next(f for f in (directory / "rng.pt", directory / f"rng-{rank}.pt", directory / "rng-0.pt")
                    if f.is_file())
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda:"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rotate(out, keep: int | None, keep_also: Path | None = None) -> list[Path]:
    """Keep the newest `keep` checkpoints (None: all) and `keep_also` (the one just written,
    whatever its step); returns the removed folders."""
    if keep is None:
        return []
    found = checkpoints(out)
    doomed = [p for _, p in found[:-max(keep, 1)] if keep_also is None or p != Path(keep_also)]
    for p in doomed:
        _remove(p)
    return doomed
