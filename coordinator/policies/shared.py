"""What requests alike in cost measure together, one per coordinator: the policies' cross-request state.

Whether speculation pays, how long a verifier should wait for a draft and whether post-verify drafting
helps belong to the target, the drafter and the load, not to one request; greedy and sampled requests
(and the pipeline modes) differ in cost, so each keeps its own."""

from __future__ import annotations

from collections import defaultdict

from coordinator.policies.evidence import GoodputMemory, PassCost
from coordinator.policies.pipeline import DraftWait, PostVerify


class SharedMeasurements:
    def __init__(self, pass_costs: tuple[tuple[int, float], ...] = ()):
        """`pass_costs`: the verifier's measured (rows, seconds) of one pass, where it reported them."""
        self._goodput: dict[tuple[str, bool], GoodputMemory] = defaultdict(
            lambda: GoodputMemory(pass_cost=PassCost(calibrated=pass_costs)))
        self._draft_waits: dict[bool, DraftWait] = defaultdict(DraftWait)
        self._post_verifies: dict[bool, PostVerify] = defaultdict(PostVerify)

    def goodput(self, mode: str, greedy: bool) -> GoodputMemory:
        return self._goodput[(mode, greedy)]

    def draft_wait(self, greedy: bool) -> DraftWait:
        return self._draft_waits[greedy]

    def post_verify(self, greedy: bool) -> PostVerify:
        return self._post_verifies[greedy]
