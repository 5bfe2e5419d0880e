"""Builds TrainerWorkers from TrainerSettings: `build_worker` a token drafter's (`specd train`,
`specd distill`, Ray actors), `build_eagle_worker` a feature drafter's (`specd refine-eagle`).

The starting drafter is chosen by `settings.drafter`:
  ""        the store's CURRENT checkpoint, else a shallow copy of the target
            (trainer.bootstrap.init_drafter_from_target);
  "vN"/"N"  that checkpoint in the store;
  other     a model spec for specdec.models.loader.load_model (directory, .gguf, preset).
The target is loaded only when it is needed (bootstrapping, distillation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import REGISTRY, CollectorRegistry

from specdec import redisutil
from specdec.models.checkpoints import CheckpointStore, parse_version
from trainer.worker import Lineage, TrainerWorker, default_consumer_name, token_worker

log = logging.getLogger(__name__)

DEFAULT_DRAFTER_LAYERS = 4


@dataclass
class StartingDrafter:
    model: torch.nn.Module
    accept_head: torch.nn.Module | None
    base_version: int | None
    tokenizer_fingerprint: str
    target_version: str


def load_target(settings):
    """The target as a specdec.models.loader.LoadedModel, in float32 for exact teacher distributions."""
    from specdec.models.loader import configure_threads, load_model

    configure_threads(settings.threads)
    return load_model(settings.target, device=settings.device, dtype="float32")


def starting_drafter(settings, store: CheckpointStore, drafter_layers: int = DEFAULT_DRAFTER_LAYERS,
                     target=None) -> StartingDrafter:
    spec = settings.drafter.strip()
    if not spec and store.current() is not None:
        spec = f"v{store.current()}"
    if spec and _is_version(spec):
        loaded = store.load(parse_version(spec), device=settings.device)
        return StartingDrafter(loaded.model, loaded.accept_head, loaded.version,
                               loaded.meta.get("tokenizer_fingerprint", ""), loaded.meta.get("target_version", ""))
    if spec:
        from specdec.models.loader import load_model

        loaded = load_model(spec, device=settings.device, dtype="float32")
        return StartingDrafter(loaded.model, None, None, loaded.fingerprint, target.version if target else "")
    from trainer.bootstrap import init_drafter_from_target

    target = target or load_target(settings)
    model = init_drafter_from_target(target.model, drafter_layers)
    return StartingDrafter(model, None, None, target.fingerprint, target.version)


def _is_version(spec: str) -> bool:
    try:
        parse_version(spec)
    except ValueError:
        return False
    return not Path(spec).exists()


def _named(settings):
    """The settings with a consumer name: every worker of the group needs its own."""
    return settings if settings.consumer_name else settings.model_copy(update={"consumer_name": default_consumer_name()})


def build_worker(settings, *, registry: CollectorRegistry = REGISTRY, drafter_layers: int = DEFAULT_DRAFTER_LAYERS,
                 target=None) -> TrainerWorker:
    """A ready token-drafter worker: Redis client, checkpoint store, starting drafter."""
    settings = _named(settings)
    client = redisutil.connect(settings.redis_url)
    store = CheckpointStore(settings.checkpoint_dir, redis_client=client)
    start = starting_drafter(settings, store, drafter_layers, target)
    start.model.to(device=settings.device, dtype=torch.float32)
    log.info("trainer %s starts from %s", settings.consumer_name,
             f"v{start.base_version}" if start.base_version is not None else settings.drafter or "the target")
    return token_worker(start.model, store, client, settings, Lineage(start.target_version, start.tokenizer_fingerprint),
                        accept_head=start.accept_head, base_version=start.base_version, registry=registry)


def build_eagle_worker(settings, *, registry: CollectorRegistry = REGISTRY) -> TrainerWorker:
    """A ready feature-drafter worker; an empty store first gets `settings.eagle.base` as its current version."""
    from trainer.eagle import FeatureRefinement, ensure_base_version

    settings = _named(settings)
    client = redisutil.connect(settings.redis_url)
    store = CheckpointStore(settings.checkpoint_dir, redis_client=client)
    target = load_target(settings)
    current = ensure_base_version(store, settings.eagle.base, settings.target)  # start from the drafter being served
    log.info("trainer %s refines the feature drafter from v%d", settings.consumer_name, current)
    strategy = FeatureRefinement(target.model, store, settings.eagle, target_version=target.version)
    return TrainerWorker(strategy, store, client, settings, registry)
