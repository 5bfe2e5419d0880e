"""`specd up`'s launcher: a stack that cannot start leaves no service behind."""

import pytest

from specd.stack import LocalStack


def test_a_service_that_fails_to_start_stops_the_ones_already_running(tiny_dirs, tmp_path):
    dirs = tiny_dirs["llama"]
    stack = LocalStack(dirs["target"], "none", threads_verifier=1, threads_drafter=1, log_dir=str(tmp_path),
                       coordinator_args=["--max-concurrency", "0"])  # refused by the coordinator's settings
    with pytest.raises(RuntimeError, match="coordinator exited"):
        stack.start(timeout_s=120)
    assert set(stack.processes) == {"verifier", "coordinator"}
    assert all(process.poll() is not None for process in stack.processes.values())
