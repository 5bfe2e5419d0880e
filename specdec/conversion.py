"""Converts a GGUF once into a directory transformers loads quickly (fp32 safetensors and its tokenizer)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from specdec.sources import ModelSource, converted_dir

log = logging.getLogger(__name__)


def materialise(source: ModelSource) -> Path:
    """Returns a directory transformers loads quickly, converting a GGUF once.

    Services starting together (a verifier and a drafter of the same target) may all ask at once: one
    converts under a lock beside the target, the others wait for it and then find the result there."""
    if source.gguf_file is None:
        return source.directory
    target = converted_dir(source)
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.with_name(target.name + ".lock")):
        if _complete(target):  # converted by whoever held the lock before us
            return target
        _remove_leftovers(target)
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        log.info("converting %s once into %s", source.gguf_file, target)
        _convert(source, staging)
        try:
            staging.rename(target)  # atomic: readers that take no lock never see a half-written copy
        except OSError:
            if not _complete(target):
                raise
            shutil.rmtree(staging)  # a converter that takes no lock got there first; its copy is as good
    return target


def _complete(target: Path) -> bool:
    return (target / "config.json").exists()


@contextmanager
def _exclusive(lock_path: Path):
    """Holds an exclusive flock on lock_path; the kernel drops it if the holder dies, so it never goes stale."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Deletes what a conversion that died left behind (called under the lock, so none is in progress)."""
    for leftover in [*target.parent.glob(target.name + ".tmp*"), *([target] if target.exists() else [])]:
        log.warning("removing an unfinished conversion", extra={"fields": {"path": str(leftover)}})
        shutil.rmtree(leftover, ignore_errors=True)


def _convert(source: ModelSource, staging: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    dequantised = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, dtype=torch.float32)
    # transformers marks GGUF-loaded models unserialisable; the weights are plain fp32 by now, so rebuild.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.generation_config = dequantised.generation_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
