"""The cache directory and the keys that name what is derived there (kernel builds, converted models, GGUF blocks)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from specdec.config import runtime_settings

CACHE_DIR = runtime_settings().cache_dir


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):  # streamed: model files run to gigabytes
            digest.update(chunk)
    return digest.hexdigest()


def file_cache_key(path: Path, format_version: int) -> str:
    """A cache key that changes when the file, or the format of what is derived from it, does."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{format_version}".encode()).hexdigest()[:16]
