"""Converts a GGUF once into a directory transformers loads quickly (fp32 safetensors and its tokenizer)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from specdec.sources import ModelSource, converted_dir

log = logging.getLogger(__name__)


def materialise(source: ModelSource) -> Path:
    """Returns a directory transformers loads quickly, converting a GGUF once."""
    if source.gguf_file is None:
        return source.directory
    target = converted_dir(source)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s", source.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    dequantised = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, dtype=torch.float32)
    # transformers marks GGUF-loaded models unserialisable; the weights are plain fp32 by now, so rebuild.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.generation_config = dequantised.generation_config
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)  # atomic: concurrent services never see a half-written copy
    return target
