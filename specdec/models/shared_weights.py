"""Drafter checkpoints that leave out the tensors they share with their target.

A drafter cut from its target keeps the target's embeddings and LM-head rows as they are
(`specd distill-eagle` never trains them): on the bundled 135M target they are 28M of a
feature drafter's 33M parameters. `export_compact` writes a checkpoint without them: for
each tensor left out, the config names the target tensor it equals (and, for a subset
head, the buffer of row ids), with the SHA-256 of that target tensor. `load_state` puts
them back from the target when the drafter loads and refuses a target whose tensor
differs, so a compact drafter can only ever run with the weights it was trained against.
What is kept is stored as float16: small enough to ship in the repository.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from specdec.models.checkpoints import CONFIG_FILE, MODEL_FILE

SHARED_KEY = "shared_with_target"  # config: {"target": spec, "tensors": {name: {"source", "rows", "sha256"}}}


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


class _TargetTensors:
    """Reads single tensors from a target directory's safetensors (one file or an index of shards)."""

    def __init__(self, directory: Path):
        index = directory / f"{MODEL_FILE}.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / shard for name, shard in weight_map.items()}
        else:
            from safetensors import safe_open

            with safe_open(str(directory / MODEL_FILE), "pt") as handle:
                self.files = {name: directory / MODEL_FILE for name in handle.keys()}

    def get(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if name not in self.files:
            return None
        with safe_open(str(self.files[name]), "pt") as handle:
            return handle.get_tensor(name)

    def head(self) -> tuple[str, torch.Tensor]:
        """The target's LM-head weight and its name (the input embedding when the two are tied)."""
        for name in ("lm_head.weight", "model.embed_tokens.weight"):
            tensor = self.get(name)
            if tensor is not None:
                return name, tensor
        raise ValueError("the target has neither lm_head.weight nor model.embed_tokens.weight")


def _target_tensors(target: str) -> _TargetTensors:
    from specdec.models.conversion import materialise
    from specdec.models.sources import resolve_source

    return _TargetTensors(materialise(resolve_source(target)))


def export_compact(checkpoint: Path, out: Path, target: str) -> dict:
    """Writes `checkpoint` (config.json + model.safetensors) to `out` without the tensors that equal
    the target's. Returns {"kept": [...], "shared": [...]}."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint / MODEL_FILE))
    config = json.loads((checkpoint / CONFIG_FILE).read_text())
    tensors = _target_tensors(target)
    head_name, head = tensors.head()
    shared = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        same = tensors.get(name)
        if same is not None and same.shape == tensor.shape and torch.equal(same, tensor):
            shared[name] = {"source": name, "rows": None, "sha256": tensor_sha256(same)}
        elif name == "lm_head.weight" and "lm_head.token_ids" in state:
            rows = state["lm_head.token_ids"]
            if head.shape[1:] == tensor.shape[1:] and torch.equal(head[rows], tensor):
                shared[name] = {"source": head_name, "rows": "lm_head.token_ids", "sha256": tensor_sha256(head)}
    kept = {name: (t.half() if t.is_floating_point() else t).contiguous()
            for name, t in state.items() if name not in shared}
    out.mkdir(parents=True, exist_ok=True)
    config[SHARED_KEY] = {"target": target, "tensors": shared}  # dtype stays: the model is built in it, then filled
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(kept, str(out / MODEL_FILE))
    return {"kept": sorted(kept), "shared": sorted(shared)}


def load_state(directory: Path, config) -> dict[str, torch.Tensor]:
    """The full state dict of a compact checkpoint: its own tensors plus the target's shared ones."""
    from safetensors.torch import load_file

    from specdec.models.sources import ModelLoadError

    spec = getattr(config, SHARED_KEY)
    state = load_file(str(directory / MODEL_FILE))
    tensors = _target_tensors(spec["target"])
    checked: dict[str, torch.Tensor] = {}  # a tied embedding is the source of two entries: read and hash it once
    for name, entry in spec["tensors"].items():
        source = entry["source"]
        if source not in checked:
            tensor = tensors.get(source)
            if tensor is None or tensor_sha256(tensor) != entry["sha256"]:
                raise ModelLoadError(f"{directory} shares {source} with target {spec['target']!r}, whose "
                                     "tensor is missing or differs from the one the drafter was trained with")
            checked[source] = tensor
        tensor = checked[source]
        state[name] = tensor[state[entry["rows"]]] if entry["rows"] else tensor
    return state
