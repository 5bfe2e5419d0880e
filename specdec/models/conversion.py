"""Converts a GGUF once into a directory transformers loads quickly: its config and tokenizer, and the fp32
safetensors when a loader needs them (a GGUF read quantised, specdec.models.gguf_quantised, needs none)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from specdec.models.sources import ModelSource, converted_dir

log = logging.getLogger(__name__)


def materialise(source: ModelSource, weights: bool = True) -> Path:
    """Returns a directory transformers loads quickly, converting a GGUF once (its weights only if `weights`).

    Services starting together (a verifier and a drafter of the same target) may all ask at once: one
    converts under a lock beside the target, the others wait for it and then find the result there."""
    if source.gguf_file is None:
        return source.directory
    target = converted_dir(source)
    if _complete(target, weights):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.with_name(target.name + ".lock")):
        if _complete(target, weights):  # converted by whoever held the lock before us
            return target
        _remove_leftovers(target, keep_config=_complete(target, False))
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        log.info("converting %s once into %s%s", source.gguf_file, target, "" if weights else " (config and tokenizer)")
        (_convert if weights else _convert_config)(source, staging)
        if target.exists():  # a config-only copy gains the weights: every file moves in, the config last
            for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
                path.replace(target / path.name)
            shutil.rmtree(staging)
            return target
        try:
            staging.rename(target)  # atomic: readers that take no lock never see a half-written copy
        except OSError:
            if not _complete(target, weights):
                raise
            shutil.rmtree(staging)  # a converter that takes no lock got there first; its copy is as good
    return target


def _complete(target: Path, weights: bool) -> bool:
    if not (target / "config.json").exists():
        return False
    return not weights or any(target.glob("model*.safetensors"))


@contextmanager
def _exclusive(lock_path: Path):
    """Holds an exclusive flock on lock_path; the kernel drops it if the holder dies, so it never goes stale."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path, keep_config: bool) -> None:
    """Deletes what a conversion that died left behind (called under the lock, so none is in progress); a
    complete config-only copy stays."""
    unfinished = [] if keep_config or not target.exists() else [target]
    for leftover in [*target.parent.glob(target.name + ".tmp*"), *unfinished]:
        log.warning("removing an unfinished conversion", extra={"fields": {"path": str(leftover)}})
        shutil.rmtree(leftover, ignore_errors=True)


def _convert_config(source: ModelSource, staging: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    config.save_pretrained(staging)
    GenerationConfig.from_model_config(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)


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
