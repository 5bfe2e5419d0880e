"""Turns verified blocks into OSD trace records and hands them to the non-blocking publisher."""

from __future__ import annotations

import logging

from coordinator.engine import VerifiedBlock
from specdec.traces import TracePublisher, TraceRecord

log = logging.getLogger(__name__)

# The trainer reads at most this many context tokens per trace; sending more only grows the stream.
CONTEXT_TAIL_TOKENS = 256


def trace_record(block: VerifiedBlock) -> TraceRecord:
    """One trace per verification: the committed context tail, the draft with q, the target's top-k."""
    sent = len(block.draft)
    return TraceRecord.from_verification(
        request_id=block.request.request_id,
        drafter_version=block.drafter_version,
        target_version=block.target_version,
        context_ids=block.context_ids[-CONTEXT_TAIL_TOKENS:],
        draft_tokens=[t.token for t in block.draft],
        draft_probs=[t.confidence for t in block.draft],  # q(x) of each drafted token
        target_top_k=block.response.target_top_k,
        accepted=min(block.response.accepted, sent),
        temperature=block.request.sampling.temperature,
    )


class TraceSink:
    """Callable handed to the engine; sampling is decided per request so a request is traced whole or not at all."""

    def __init__(self, publisher: TracePublisher):
        self.publisher = publisher

    def __call__(self, block: VerifiedBlock) -> None:
        if not self.publisher.should_sample(block.request.request_id):
            return
        try:
            record = trace_record(block)
        except Exception:  # noqa: BLE001 - a malformed trace must never fail the generation
            log.exception("could not build trace record")
            return
        self.publisher.offer(record)

    def close(self) -> None:
        self.publisher.close()
