"""Sampling parameters and their wire form: torch-free, so the coordinator can use them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from specdec.errors import InvalidRequest
from specdec.v1 import common_pb2


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_sampling(temperature: float, top_p: float, top_k: int) -> str | None:
    """Returns a readable reason when the parameters are invalid, else None."""
    if math.isnan(temperature) or math.isinf(temperature) or temperature < 0:
        return f"temperature must be a finite number >= 0, got {temperature}"
    if math.isnan(top_p) or not 0.0 < top_p <= 1.0:
        return f"top_p must be in (0, 1], got {top_p}"
    if top_k < 0:
        return f"top_k must be >= 0, got {top_k}"
    return None


def sampling_from_proto(message: common_pb2.SamplingParams) -> SamplingParams:
    problem = validate_sampling(message.temperature, message.top_p or 1.0, message.top_k)
    if problem:
        raise InvalidRequest(problem)
    return SamplingParams(message.temperature, message.top_p or 1.0, message.top_k, message.seed)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                     seed=params.seed, has_seed=True)
