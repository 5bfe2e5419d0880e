"""`specd prune-head`: a checkpoint whose LM head keeps only the tokens the target actually emits.

The token ranking comes from the trace stream: the draft tokens and the
target's argmax at every recorded position, i.e. what the drafter has to
propose on this deployment's traffic, topped up by token id. The pruned
drafter is published as a new version (parent: the source) with both models'
acceptance on the same recent traces in its metadata. It is promoted only when
asked: the gate's metric does not see the cheaper head, so a slightly lower
acceptance can still be the faster drafter, and that is the operator's call
(`bench.run` measures it).
"""

from __future__ import annotations

import logging
from collections import Counter

from specdec.models.checkpoints import CheckpointStore, version_name
from specdec.models.vocab_head import install_subset_head, rank_tokens
from specdec.traces import TraceRecord, TraceSchemaError, decode_fields
from trainer.evaluation import evaluate_acceptance
from trainer.losses import target_argmax

log = logging.getLogger(__name__)


def recent_traces(client, stream: str, count: int) -> list[TraceRecord]:
    """The newest `count` decodable traces of `stream`, oldest first."""
    records = []
    for _entry_id, fields in reversed(client.xrevrange(stream, count=count)):
        try:
            records.append(decode_fields(fields))
        except TraceSchemaError as err:
            log.warning("skipping an undecodable trace: %s", err)
    return records


def emitted_token_counts(records: list[TraceRecord]) -> Counter:
    """How often each token was drafted or was the target's argmax in `records`."""
    import torch

    counts: Counter = Counter()
    for record in records:
        counts.update(record.draft_tokens)
        rows = [(ids, probs) for ids, probs in zip(record.target_top_ids, record.target_top_probs) if ids]
        if rows:
            width = max(len(ids) for ids, _ in rows)
            ids = torch.tensor([[*i, *[-1] * (width - len(i))] for i, _ in rows])
            probs = torch.tensor([[*p, *[0.0] * (width - len(p))] for _, p in rows])
            counts.update(target_argmax(ids, probs).tolist())
    return counts


def prune_checkpoint(store: CheckpointStore, version: int, head_vocab: int, records: list[TraceRecord],
                     eval_traces: int = 256, promote: bool = False) -> dict:
    """Publishes `version` with a `head_vocab`-token head ranked on `records`; returns a report."""
    source = store.load(version)
    model = source.model
    vocab_size = int(model.config.vocab_size)
    token_ids = rank_tokens(emitted_token_counts(records), vocab_size, head_vocab)
    held = records[-eval_traces:]
    before = evaluate_acceptance(model, held) if held else None
    install_subset_head(model, token_ids)
    after = evaluate_acceptance(model, held) if held else None
    meta = {key: source.meta[key] for key in ("steps", "traces_seen", "loss", "lr", "target_version",
                                              "tokenizer_fingerprint") if key in source.meta}
    meta.update({"parent_version": version, "consumer": "prune-head", "head_vocab": int(token_ids.numel()),
                 "head_vocab_ranked_on_traces": len(records)})
    new_version = store.publish(model, meta, accept_head=source.accept_head)
    metrics = {"source": before.as_dict() if before else None, "pruned": after.as_dict() if after else None,
               "head_vocab": int(token_ids.numel()), "eval_traces": len(held)}
    if promote:
        store.promote(new_version, f"head pruned to {token_ids.numel()} tokens from {version_name(version)}",
                      metrics)
    log.info("published %s: %s with a %d-token head", version_name(new_version), version_name(version),
             token_ids.numel())
    return {"version": new_version, "promoted": promote, **metrics}
