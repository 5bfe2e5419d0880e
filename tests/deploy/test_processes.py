"""The real topology: separate processes started the way `specd up` starts them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from specd.stack import LocalStack
from specdec.client import SpecdClient

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Summarise: The quick brown fox jumps over the lazy dog. The dog does not react. The fox runs away.",
]


@pytest.fixture(scope="module")
def smollm2_reference():
    from specdec.models.loader import load_model

    loaded = load_model("smollm2-135m")
    tokenizer, model = loaded.tokenizer, loaded.model
    references = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        references.append(out[0, ids.shape[1]:].tolist())
    return references


@pytest.mark.smollm
def test_specd_up_on_smollm2_matches_target_greedy(smollm2_reference, tmp_path):
    stack = LocalStack("smollm2-135m", "ngram", threads_verifier=1, threads_drafter=1, log_dir=str(tmp_path))
    try:
        address = stack.start(timeout_s=300)
        with SpecdClient(address) as client:
            for prompt, reference in zip(PROMPTS, smollm2_reference):
                for mode in ("sequential", "overlapped"):
                    result = client.generate(prompt, max_new_tokens=32, mode=mode)
                    assert result.token_ids == reference, (prompt, mode)
                    assert result.text
    finally:
        stack.stop()


@pytest.mark.smollm
def test_generate_cli_prints_json(smollm2_reference, tmp_path):
    import json

    stack = LocalStack("smollm2-135m", "ngram", threads_verifier=1, threads_drafter=1, log_dir=str(tmp_path))
    try:
        address = stack.start(timeout_s=300)
        out = subprocess.run([sys.executable, "-m", "specd.cli", "generate", "--addr", address, "--prompt", PROMPTS[0],
                              "--max-new-tokens", "32", "--temperature", "0", "--json"],
                             capture_output=True, text=True, timeout=120, check=True)
    finally:
        stack.stop()
    payload = json.loads(out.stdout)
    assert payload["token_ids"] == smollm2_reference[0]
    assert payload["text"] and payload["stats"]["new_tokens"] == len(payload["token_ids"])
    assert {"acceptance_rate", "mean_accepted_length", "ttft_ms", "total_ms", "rounds"} <= set(payload["stats"])


def test_killing_the_drafter_mid_stream_keeps_the_answer(tiny_dirs, tmp_path):
    dirs = tiny_dirs["llama"]
    # pearl asks the drafter every round, and no lookup block stands in for it
    stack = LocalStack(dirs["target"], dirs["close"], threads_verifier=1, threads_drafter=1, log_dir=str(tmp_path),
                       coordinator_args=["--drafter-timeout-s", "1", "--drafter-retry-s", "30", "--policy", "pearl",
                                         "--lookup-draft-tokens", "0"])
    try:
        address = stack.start(timeout_s=120)
        with SpecdClient(address) as client:
            prompt = [5, 6, 7, 8, 9]
            reference = client.generate(token_ids=prompt, max_new_tokens=400, mode="target_only").token_ids
            received, killed, final = [], False, None
            for chunk in client.stream(token_ids=prompt, max_new_tokens=400, mode="overlapped"):
                received.extend(chunk.token_ids)
                if not killed and len(received) >= 20:
                    stack.kill("drafter")
                    killed = True
                if chunk.done:
                    final = chunk
        assert killed and received == reference
        assert final.stats.fallback_steps > 0
        assert final.stats.accepted_tokens > 0  # it was speculating before the kill
    finally:
        stack.stop()


def test_sigterm_lets_an_in_flight_stream_finish(tiny_dirs, tmp_path):
    dirs = tiny_dirs["qwen2"]
    stack = LocalStack(dirs["target"], dirs["close"], threads_verifier=1, threads_drafter=1, log_dir=str(tmp_path))
    try:
        address = stack.start(timeout_s=120)
        with SpecdClient(address) as client:
            received, signalled, final = [], False, None
            for chunk in client.stream(token_ids=[1, 2, 3], max_new_tokens=300, mode="overlapped"):
                received.extend(chunk.token_ids)
                if not signalled:
                    stack.processes["coordinator"].send_signal(signal.SIGTERM)
                    signalled = True
                if chunk.done:
                    final = chunk
        assert final is not None and len(received) == 300
        assert stack.processes["coordinator"].wait(30) == 0
    finally:
        stack.stop()


def test_sigterm_to_specd_up_stops_its_services(tiny_dirs, tmp_path):
    dirs = tiny_dirs["llama"]
    up = subprocess.Popen([sys.executable, "-m", "specd.cli", "up", "--target", dirs["target"], "--drafter", dirs["close"],
                           "--threads-verifier", "1", "--threads-drafter", "1", "--log-dir", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = up.stdout.readline().strip()  # printed once the stack is healthy
        assert address.startswith("127.0.0.1:"), address
        assert up.stdout.readline().strip().endswith("/v1")  # the HTTP tier's base URL
        with open(f"/proc/{up.pid}/task/{up.pid}/children") as children:
            services = [int(pid) for pid in children.read().split()]
        assert len(services) == 4  # verifier, drafter, coordinator and the HTTP tier
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 128 + signal.SIGTERM
        for pid in services:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if up.poll() is None:
            up.kill()
