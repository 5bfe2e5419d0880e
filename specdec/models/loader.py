"""Loads any Hugging Face causal LM from a directory, a GGUF file or a preset.

GGUF files are de-quantised by transformers on every load, which is slow (about
30 s for SmolLM2-135M, mostly tokenizer conversion), so the first load saves a
converted copy under the cache directory and later loads read that. A GGUF with
K-quant tensors loads quantised on the CPU instead (specdec.models.gguf_quantised): its
converted copy holds only the config and tokenizer, and the weights stay in blocks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.models.conversion import materialise
from specdec.models.gguf_quantised import load_quantised, quantised_table
from specdec.models.sources import ModelLoadError, load_tokenizer, resolve_source

log = logging.getLogger(__name__)



@dataclass
class LoadedModel:
    model: torch.nn.Module | None   # None for model-free drafters
    tokenizer: object | None        # a transformers tokenizer, or None for token-id-only models
    name: str
    version: str
    vocab_size: int
    max_context: int
    device: torch.device
    fingerprint: str                # equal fingerprints <=> interchangeable token ids
    gguf_path: Path | None = None   # the GGUF the weights were de-quantised from, if any

    @property
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        if self.model is not None:
            for config in (getattr(self.model, "generation_config", None), self.model.config):
                eos = getattr(config, "eos_token_id", None)
                if eos is not None:
                    ids.update([eos] if isinstance(eos, int) else eos)
        return sorted(ids)


def tokenizer_fingerprint(tokenizer, vocab_size: int) -> str:
    if tokenizer is None:
        return f"vocab-only:{vocab_size}"
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    digest.update(json.dumps(sorted(tokenizer.all_special_tokens)).encode())
    # The output size matters too: a model with fewer rows cannot read every id the other emits.
    return f"{digest.hexdigest()[:24]}-{vocab_size}"


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def configure_threads(threads: int) -> None:
    """Pins this process's torch threads so co-located services do not fight over cores."""
    if threads > 0:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # already set once in this process


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", tokenizer_from: str | None = None,
               max_context: int = 0) -> LoadedModel:
    """Loads `spec` for inference. `tokenizer_from` supplies a tokenizer to drafter checkpoints without one."""
    source = resolve_source(spec)
    torch_device = torch.device(device)
    torch_dtype = _dtype(dtype, torch_device)
    gguf_path = source.directory / source.gguf_file if source.gguf_file else None
    table = quantised_table(gguf_path, torch_device, torch_dtype)
    directory = materialise(source, weights=table is None)
    if table is not None:
        from transformers import AutoConfig

        model = load_quantised(table, AutoConfig.from_pretrained(directory))
    else:
        model = _from_directory(directory, torch_dtype)
        model.to(torch_device).eval()
    tokenizer = load_tokenizer(spec, tokenizer_from)
    config = model.config
    vocab_size = int(config.vocab_size)
    model_limit = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048)
    limit = min(max_context, model_limit) if max_context else model_limit
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=source.name,
        version=_model_version(directory),
        vocab_size=vocab_size,
        max_context=limit,
        device=torch_device,
        fingerprint=tokenizer_fingerprint(tokenizer, vocab_size),
        gguf_path=gguf_path,
    )


def _from_directory(directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    """from_pretrained, except for drafters with a subset LM head or a feature fuse, which HF cannot rebuild
    itself, and compact drafters, whose shared tensors come from their target (specdec.models.shared_weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from specdec.models.eagle import is_feature_drafter
    from specdec.models.shared_weights import SHARED_KEY, load_state
    from specdec.models.vocab_head import CONFIG_KEY, build_causal_lm

    config = AutoConfig.from_pretrained(directory)
    if getattr(config, SHARED_KEY, None):
        model = build_causal_lm(config).to(dtype=dtype)
        model.load_state_dict(load_state(directory, config), strict=True)
        return model
    if not getattr(config, CONFIG_KEY, 0) and not is_feature_drafter(config):
        return AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=dtype)
    from safetensors.torch import load_model as load_safetensors

    model = build_causal_lm(config)
    load_safetensors(model, str(directory / "model.safetensors"), strict=True)
    return model.to(dtype=dtype)


def _model_version(directory: Path) -> str:
    meta = directory / "meta.json"
    if meta.exists():
        try:
            return f"v{json.loads(meta.read_text())['version']}"
        except (KeyError, ValueError):
            pass
    return directory.name


def check_pair(target_fingerprint: str, drafter_fingerprint: str, target_name: str, drafter_name: str) -> None:
    """Refuses a drafter whose token ids mean something else than the target's."""
    if target_fingerprint != drafter_fingerprint:
        raise ModelLoadError(
            f"drafter {drafter_name!r} does not share the tokenizer of target {target_name!r} "
            f"(fingerprints {drafter_fingerprint} != {target_fingerprint}); speculative decoding needs identical token ids"
        )
