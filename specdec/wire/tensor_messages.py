"""Conversions between protobuf messages and tensors (draft distributions, hidden states)."""

from __future__ import annotations

import numpy as np
import torch

from specdec.errors import InvalidRequest
from specdec.sampling import DraftDist
from specdec.v1 import common_pb2


def dist_to_proto(dist: DraftDist | None) -> common_pb2.DraftProbs | None:
    if dist is None:
        return None
    if dist.indices is None:
        return common_pb2.DraftProbs(dense=dist.probs.float().numpy().astype("<f4").tobytes())
    return common_pb2.DraftProbs(indices=dist.indices.tolist(), probs=dist.probs.tolist())


def dist_from_proto(message: common_pb2.DraftProbs) -> DraftDist:
    if message.dense:
        if len(message.dense) % 4:
            raise InvalidRequest("dense draft probabilities must be float32 bytes")
        return DraftDist(torch.from_numpy(np.frombuffer(message.dense, dtype="<f4").copy()))
    if len(message.indices) != len(message.probs) or not message.indices:
        raise InvalidRequest("sparse draft probabilities need equally many indices and probs, at least one")
    probs = torch.tensor(list(message.probs), dtype=torch.float32)
    if bool((probs < 0).any()) or not torch.isfinite(probs).all():
        raise InvalidRequest("draft probabilities must be finite and non-negative")
    return DraftDist(probs, torch.tensor(list(message.indices), dtype=torch.long))


def hidden_to_proto(start: int, rows: torch.Tensor) -> common_pb2.HiddenStates:
    """rows [n, H] of target features at positions start .. start+n-1, sent as float16."""
    data = rows.detach().to(torch.float16).cpu().numpy().astype("<f2").tobytes()
    return common_pb2.HiddenStates(start=start, rows=rows.shape[0], size=rows.shape[1], data=data)


def hidden_from_proto(message: common_pb2.HiddenStates, size: int) -> tuple[int, torch.Tensor]:
    """(start, features [rows, size] float32); refuses a message whose shape does not add up."""
    if message.rows == 0:
        return message.start, torch.zeros(0, size)
    if message.start < 0 or message.size != size or len(message.data) != 2 * message.rows * message.size:
        raise InvalidRequest(f"hidden states of {message.rows} x {message.size} in {len(message.data)} bytes "
                             f"from position {message.start}; this drafter reads rows of {size} float16")
    rows = np.frombuffer(message.data, dtype="<f2").reshape(message.rows, message.size)
    features = torch.from_numpy(rows.astype(np.float32))
    if not torch.isfinite(features).all():
        raise InvalidRequest("hidden states hold NaN or infinite values")
    return message.start, features
