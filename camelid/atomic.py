"""Every file camelid writes appears whole or not at all: write a hidden temp file beside the target
(same file system), fsync it, rename it into place, fsync the folder. Readers see the old file or
the new one, never a part; a killed writer leaves only a temp name that the next writer of the same
target removes (remove_stale_temps)."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path


def make_dir(directory: Path) -> bool:
    """mkdir -p; True when `directory` itself was created (so a failed save can remove it)."""
    existed = directory.is_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return not existed


def remove_if_empty(directory: Path, created: bool) -> None:
    if created:
        try:
            directory.rmdir()
        except OSError:
            pass


def temp_path(path: Path) -> Path:
    """A fresh hidden name next to `path` (same file system, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def remove_stale_temps(directory: Path, names=(), pattern: re.Pattern | None = None) -> list[Path]:
    """Remove the temp files (temp_path's `.{name}.{16 hex}.tmp`) that a killed writer left in
    `directory` for the targets being written now: each of `names`, and every name `pattern`
    fullmatches. Returns the removed paths.

    The rule: call it before writing those targets. A save that was killed leaves its temps behind;
    the next save of the same target is the one that removes them. A live temp can only belong to a
    second save of the same target running at the same moment, a race the caller already loses
    (the last rename wins), so it is not guarded against. Temps of other names (another file, another
    program's hidden files) are never touched, and only regular files are removed."""
    directory = Path(directory)
    names = set(names)
    temp = re.compile(r"\.(.+)\.[0-9a-f]{16}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = temp.fullmatch(entry.name)
        if m is None or not (m.group(1) in names or (pattern is not None and pattern.fullmatch(m.group(1)))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
    return removed


def new_file_mode() -> int:
    """The permissions open() gives a new file (0o666 minus the umask), for files that a library
    creates 0600 (safetensors' save_file does)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the racy way, restoring at once
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` so that readers see the old file or the new one, never a part."""
    tmp = temp_path(path)
    try:
        # 0o666 & ~umask, like open(): tempfile.mkstemp would make every saved file 0600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
