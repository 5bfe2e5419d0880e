"""One timed request per mode: the HF baselines in-process, specd through its public gRPC API.

Every runner returns a `Sample` so all modes are summarised by the same code.
Token arrival times are taken at the client: a chunk of n tokens arriving
`gap` seconds after the previous one counts as n inter-token gaps of gap/n.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from specdec.client import SpecdClient


@dataclass
class Sample:
    mode: str
    prompt_id: str
    category: str
    token_ids: list[int]
    seconds: float
    ttft_s: float
    token_gaps_s: list[float] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    draft_ms: float = 0.0
    hidden_draft_ms: float = 0.0
    fallback_steps: int = 0
    early_verify_rounds: int = 0  # overlapped rounds verified without waiting for a draft

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def amortised_gaps(arrivals: list[tuple[float, int]], start: float) -> tuple[float, list[float]]:
    """(time to first token, per-token gaps) from (arrival time, tokens in chunk) pairs."""
    arrivals = [(t, n) for t, n in arrivals if n > 0]
    if not arrivals:
        return 0.0, []
    gaps: list[float] = []
    previous = arrivals[0][0]
    for moment, count in arrivals[1:]:
        gaps.extend([(moment - previous) / count] * count)
        previous = moment
    return arrivals[0][0] - start, gaps


class _ArrivalStreamer(BaseStreamer):
    """Records when HF generate emits tokens; the first put() is the prompt itself."""

    def __init__(self):
        self.arrivals: list[tuple[float, int]] = []
        self._seen_prompt = False

    def put(self, value):
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.arrivals.append((time.perf_counter(), int(value.numel())))

    def end(self):
        pass


def run_hf(mode: str, model, prompt_ids: list[int], max_new_tokens: int, prompt_id: str, category: str,
           assistant=None, prompt_lookup: int = 0) -> Sample:
    """(a) target-only HF generate, or (b) HF assisted generation with `assistant` / prompt lookup."""
    ids = torch.tensor([prompt_ids])
    extra = {}
    if assistant is not None:
        extra["assistant_model"] = assistant
    if prompt_lookup:
        extra["prompt_lookup_num_tokens"] = prompt_lookup
    streamer = _ArrivalStreamer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=streamer, **extra)
    seconds = time.perf_counter() - start
    ttft, gaps = amortised_gaps(streamer.arrivals, start)
    return Sample(mode, prompt_id, category, out[0, len(prompt_ids):].tolist(), seconds, ttft, gaps)


def run_specd(mode: str, client: SpecdClient, prompt_ids: list[int], max_new_tokens: int, prompt_id: str,
              category: str, pipeline: str, policy: str, draft_length: int = 0) -> Sample:
    """(c)/(d): a streamed greedy request through the coordinator."""
    tokens: list[int] = []
    arrivals: list[tuple[float, int]] = []
    stats = None
    start = time.perf_counter()
    for chunk in client.stream(token_ids=prompt_ids, max_new_tokens=max_new_tokens, mode=pipeline, policy=policy,
                               draft_length=draft_length, exclude_from_training=True):
        arrivals.append((time.perf_counter(), len(chunk.token_ids)))
        tokens.extend(chunk.token_ids)
        if chunk.done:
            stats = chunk.stats
    seconds = time.perf_counter() - start
    ttft, gaps = amortised_gaps(arrivals, start)
    return Sample(mode, prompt_id, category, tokens, seconds, ttft, gaps, drafted=stats.drafted_tokens,
                  accepted=stats.accepted_tokens, rounds=stats.rounds, draft_ms=stats.draft_ms,
                  hidden_draft_ms=stats.hidden_draft_ms, fallback_steps=stats.fallback_steps,
                  early_verify_rounds=stats.early_verify_rounds)
