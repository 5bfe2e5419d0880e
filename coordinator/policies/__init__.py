"""Draft-length policies, one small class each, selectable per request, and the one registry of them.

A policy answers three questions every round:
- `block_size`: how many draft tokens to send to one verification;
- `min_ready`: how many must be drafted before the verifier may start (the
  overlapped pipeline verifies as soon as this many exist);
- `stop_rule`: which rule the drafter applies to end a draft stream early.
After each verification every controller observes the round's `RoundOutcome`
(coordinator/rounds.py): a policy's `update` sees how many were sent and accepted,
and `record_round` how many tokens the round committed in how much wall time.
A block size of 0 means a target-only round. In overlapped mode `DraftWait` caps how long
the verifier waits for `min_ready`: past that budget it verifies what exists, and
`PostVerify` decides whether drafting runs on past the block while it is verified.

Modules: `length` (policies that learn from their own blocks), `goodput` (policies that decide by
measured tokens per second), `marginal` (per-request, per-source decisions on the pass's cost), `evidence` (the goodput model they share across requests), `pipeline`
(the overlapped pipeline's controls), `shared` (what one coordinator's requests measure together). A new policy is a class in one of them and a line in POLICIES below, plus its
DRAFT_POLICY_* value in proto/specdec/v1/generation.proto, from which specdec.config.POLICY_NAMES
is read; importing this package checks the two agree.
"""

from __future__ import annotations

from coordinator.policies.evidence import BatchCost, GoodputMemory, LineFit, PassCost
from coordinator.policies.goodput import GoodputPolicy, SmartSpecPolicy, best_draft_length, expected_committed
from coordinator.policies.length import (
    AdaEdlPolicy,
    BildPolicy,
    DraftLengthPolicy,
    HeuristicPolicy,
    PearlPolicy,
    SpecDecPPPolicy,
)
from coordinator.policies.marginal import MarginalPolicy
from coordinator.policies.pipeline import DraftWait, PostVerify
from coordinator.policies.shared import SharedMeasurements
from specdec.config import POLICY_NAMES

POLICIES: dict[str, type[DraftLengthPolicy]] = {policy.name: policy for policy in (
    DraftLengthPolicy,
    HeuristicPolicy,
    PearlPolicy,
    AdaEdlPolicy,
    SpecDecPPPolicy,
    BildPolicy,
    GoodputPolicy,
    SmartSpecPolicy,
    MarginalPolicy,
)}

if set(POLICIES) != set(POLICY_NAMES):
    raise ImportError(f"policies {sorted(POLICIES)} and the proto's DraftPolicy values {sorted(POLICY_NAMES)} differ")


def make_policy(name: str, length: int, max_length: int, threshold: float = 0.0,
                goodput_memory: GoodputMemory | None = None) -> DraftLengthPolicy:
    policy = POLICIES[name].create(length, max_length, goodput_memory)
    if threshold > 0:
        policy.threshold = threshold
    return policy


__all__ = [
    "POLICIES", "AdaEdlPolicy", "BatchCost", "BildPolicy", "DraftLengthPolicy", "DraftWait", "GoodputMemory",
    "GoodputPolicy", "HeuristicPolicy", "LineFit", "MarginalPolicy", "PassCost", "PearlPolicy", "PostVerify",
    "SharedMeasurements",
    "SmartSpecPolicy", "SpecDecPPPolicy", "best_draft_length", "expected_committed", "make_policy",
]
