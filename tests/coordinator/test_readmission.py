"""A restarted verifier or drafter takes new sessions within seconds of reporting SERVING, long before the
coordinator's retry interval would let a failed call try it again (coordinator/backends.py watches health)."""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import InProcessStack

from specdec.client import SpecdClient
from specdec.config import load_settings

READMITTED_WITHIN_S = 3.0
PROMPT = [4, 8, 15, 16, 23, 42]


def _start_again(stack: InProcessStack, name: str, role: str, model: str, port: int) -> float:
    """Starts `name` on its old port; returns when it began serving (monotonic)."""
    from drafter_svc.server import start as start_drafter
    from verifier_svc.server import start as start_verifier

    start = start_verifier if role == "verifier" else start_drafter
    overrides = {"model": model, "port": port, **({"draft_weights": "fp32"} if role == "drafter" else {})}
    stack.servers[name] = stack.run(start(load_settings(role, overrides, environ={})))
    return time.monotonic()


def _first_success(attempt, since: float):
    """Retries `attempt` until it returns something true; returns it and the seconds since `since`."""
    while True:
        result = attempt()
        if result:
            return result, time.monotonic() - since
        if time.monotonic() - since > 2 * READMITTED_WITHIN_S:
            return None, time.monotonic() - since
        time.sleep(0.1)


def test_a_restarted_verifier_and_drafter_take_new_sessions_within_seconds(tiny_dirs):
    dirs = tiny_dirs["llama"]
    # A new request waits verifier_wait_s for a healthy verifier before it hears there is none.
    stack = InProcessStack(dirs["target"], dirs["target"],
                           coordinator_overrides={"drafter_retry_s": 60.0, "verifier_wait_s": 1.0,
                                                  # pearl asks the drafter every round, lookup never stands in
                                                  "policy": "pearl", "lookup_draft_tokens": 0})
    client = SpecdClient(stack.address, timeout_s=30)
    generate = lambda: client.generate(token_ids=PROMPT, max_new_tokens=8, mode="sequential")  # noqa: E731
    try:
        assert generate().stats["accepted_tokens"] > 0

        port = stack.port("verifier0")
        stack.stop_server("verifier0")
        with pytest.raises(grpc.RpcError) as raised:
            generate()  # no verifier: after verifier_wait_s the request hears so
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        serving_at = _start_again(stack, "verifier0", "verifier", dirs["target"], port)

        def verifier_answers():
            try:
                return generate()
            except grpc.RpcError:
                return None

        result, waited = _first_success(verifier_answers, serving_at)
        assert result is not None and waited < READMITTED_WITHIN_S, waited

        port = stack.port("drafter")
        stack.stop_server("drafter")
        assert generate().stats["fallback_steps"] > 0  # the drafter is marked down for drafter_retry_s
        serving_at = _start_again(stack, "drafter", "drafter", dirs["target"], port)
        result, waited = _first_success(lambda: (r := generate()).stats["fallback_steps"] == 0 and r, serving_at)
        assert result is not None and waited < READMITTED_WITHIN_S, waited
        assert result.stats["accepted_tokens"] > 0
    finally:
        client.close()
        stack.close()
