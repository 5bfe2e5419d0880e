"""The OpenAI-compatible HTTP tier against a real stack on a tiny random model that carries the SmolLM2
tokenizer: the real `openai` client (sync, async, streaming) gets the same tokens as the gRPC API, hostile
input gets OpenAI's error JSON with the right status and leaves the server up, and a caller that disconnects
frees the verifier's and drafter's sessions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import grpc
import httpx
import openai
import pytest
import torch
from conftest import InProcessStack, perturbed, save, tiny_model
from faults_support import wait_until
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from http_svc.server import start as start_http
from specd.stack import free_port
from specdec.client import SpecdClient
from specdec.config import load_settings
from specdec.models.sources import load_tokenizer
from specdec.v1 import drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc

torch.set_num_threads(1)

TOKEN = "http-" + uuid.uuid4().hex[:8]
MODEL = "tiny-chat"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three caches."}]
SPECULATION = {"mode": "sequential", "policy": "static", "draft_length": 3}


class HttpStack:
    """An InProcessStack with HTTP tiers in its event loop."""

    def __init__(self, stack: InProcessStack):
        self.stack = stack
        self.tiers = []

    def http(self, **overrides) -> str:
        """Starts an HTTP tier (by default on the stack's coordinator, with its token); returns its base URL."""
        settings = load_settings("http", {"coordinator_addrs": self.stack.address, "model": MODEL,
                                          "drafter": "close", "auth_token": TOKEN, **overrides}, environ={})
        running = self.stack.run(start_http(settings))
        self.tiers.append(running)
        return f"http://127.0.0.1:{running.port}"

    def close(self) -> None:
        for running in self.tiers:
            self.stack.run(running.stop())
        self.stack.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tokenizer = load_tokenizer("smollm2-135m")
    root = tmp_path_factory.mktemp("http")
    target = tiny_model("llama", seed=1, vocab_size=len(tokenizer))
    for name, model in (("target", target), ("close", perturbed(target, 0.3, seed=2))):
        save(model, root / name)
        tokenizer.save_pretrained(root / name)
    stacked = HttpStack(InProcessStack(str(root / "target"), str(root / "close"), auth_token=TOKEN))
    stacked.target_dir, stacked.base_url = str(root / "target"), stacked.http()
    yield stacked
    stacked.close()


@pytest.fixture
def client(served):
    with openai.OpenAI(base_url=served.base_url + "/v1", api_key=TOKEN, max_retries=0) as api:
        yield api


@pytest.fixture
def grpc_client(served):
    with SpecdClient(served.stack.address, token=TOKEN) as specd:
        yield specd


def _speculation(response) -> dict:
    return (response.model_extra or {})["speculation"]


# -- the openai client ----------------------------------------------------------------------------

def test_chat_completion_equals_the_grpc_answer(client, grpc_client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                              extra_body={"speculation": SPECULATION, "return_token_ids": True})
    reference = grpc_client.generate(messages=MESSAGES, max_new_tokens=24, temperature=0, **SPECULATION)
    choice = response.choices[0]
    assert choice.model_extra["token_ids"] == reference.token_ids
    assert choice.message.content == reference.text and choice.message.role == "assistant"
    assert response.usage.completion_tokens == len(reference.token_ids)
    assert response.usage.prompt_tokens == reference.stats["prompt_tokens"]
    assert choice.finish_reason == ("length" if reference.finish_reason == "FINISH_REASON_LENGTH" else "stop")
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion" and response.model == MODEL
    speculation = _speculation(response)
    assert speculation["mode"] == "sequential" and speculation["policy"] == "static"
    assert speculation["drafted_tokens"] > 0 and 0 <= speculation["acceptance_rate"] <= 1
    assert speculation["rounds"] >= 1 and speculation["drafter_version"]


def test_text_completions_from_text_and_token_ids_equal_the_grpc_answers(client, grpc_client):
    for prompt, grpc_input in (("Once upon a time", {"prompt": "Once upon a time", "raw": True}),
                               ([5, 6, 7, 8, 9], {"token_ids": [5, 6, 7, 8, 9]})):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                             extra_body={"return_token_ids": True, "ignore_eos": True})
        reference = grpc_client.generate(max_new_tokens=20, temperature=0, ignore_eos=True, **grpc_input)
        assert response.choices[0].model_extra["token_ids"] == reference.token_ids
        assert response.choices[0].text == reference.text
        assert response.usage.completion_tokens == len(reference.token_ids)
        assert response.object == "text_completion" and "speculation" in response.model_extra


def test_streamed_chat_equals_the_grpc_stream(client, grpc_client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True})
    chunks = list(stream)
    reference = grpc_client.generate(messages=MESSAGES, max_new_tokens=32, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == reference.token_ids
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and "speculation" in finishing[0].model_extra
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == len(reference.token_ids)
    assert _speculation(last)["rounds"] >= 1


def test_async_client_streams_and_answers_concurrently(served, grpc_client):
    prompts = [f"Count to {n}." for n in range(3)]

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key=TOKEN, max_retries=0) as api:
            async def streamed(prompt):
                stream = await api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                           max_tokens=16, temperature=0, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            async def whole(prompt):
                response = await api.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0)
                return response.choices[0].message.content

            return await asyncio.gather(*[streamed(p) for p in prompts], *[whole(p) for p in prompts])

    answers = asyncio.run(ask_all())
    expected = [grpc_client.generate(messages=[{"role": "user", "content": p}], max_new_tokens=16, temperature=0).text
                for p in prompts]
    assert answers == expected + expected


def test_speculation_can_be_turned_off_per_request(client):
    response = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0,
                                         extra_body={"speculation": {"mode": "target_only"}})
    speculation = _speculation(response)
    assert speculation["mode"] == "target_only" and speculation["drafted_tokens"] == 0


def test_models_lists_the_target_with_its_drafter(client):
    [card] = client.models.list().data
    assert card.id == MODEL and card.model_extra["speculation"] == {"drafter": "close"}
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_wrong_token_is_refused_by_the_client_too(served):
    with openai.OpenAI(base_url=served.base_url + "/v1", api_key="wrong", max_retries=0) as api:
        with pytest.raises(openai.AuthenticationError):
            api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)


# -- hostile input, raw HTTP ----------------------------------------------------------------------

AUTH = {"authorization": f"Bearer {TOKEN}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BIG = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"a" * (20 << 20) + b'"}'

HOSTILE = [  # (case, path, request arguments, status, error param or None)
    ("malformed JSON", "chat/completions", {"content": b'{"model": "tiny-chat", "messages": ['}, 400, None),
    ("not an object", "chat/completions", {"json": [CHAT]}, 400, None),
    ("messages as a string", "chat/completions", {"json": {**CHAT, "messages": "hi"}}, 400, "messages"),
    ("max_tokens as a string", "chat/completions", {"json": {**CHAT, "max_tokens": "4"}}, 400, "max_tokens"),
    ("temperature as a bool", "completions", {"json": {"model": MODEL, "prompt": "x", "temperature": True}}, 400,
     "temperature"),
    ("content of a number", "chat/completions", {"json": {**CHAT, "messages": [{"role": "user", "content": 5}]}},
     400, "messages[0].content"),
    ("no messages", "chat/completions", {"json": {"model": MODEL, "messages": []}}, 400, "messages"),
    ("a 20 MB body", "completions", {"content": BIG}, 413, None),
    ("invalid UTF-8", "completions", {"content": b'{"model": "tiny-chat", "prompt": "\xff\xfe"}'}, 400, None),
    ("a lone surrogate", "completions", {"content": b'{"model": "tiny-chat", "prompt": "\\ud800"}'}, 400, None),
    ("unknown model", "chat/completions", {"json": {**CHAT, "model": "gpt-4o"}}, 404, "model"),
    ("missing token", "chat/completions", {"json": CHAT, "headers": {}}, 401, None),
    ("wrong token", "chat/completions", {"json": CHAT, "headers": {"authorization": "Bearer nope"}}, 401, None),
    ("n > 1", "chat/completions", {"json": {**CHAT, "n": 2}}, 400, "n"),
    ("tools", "chat/completions", {"json": {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}},
     400, "tools"),
    ("a penalty", "completions", {"json": {"model": MODEL, "prompt": "x", "presence_penalty": 0.5}}, 400,
     "presence_penalty"),
    ("logprobs", "chat/completions", {"json": {**CHAT, "logprobs": True}}, 400, "logprobs"),
    ("JSON mode", "chat/completions", {"json": {**CHAT, "response_format": {"type": "json_object"}}}, 400,
     "response_format"),
    ("two prompts", "completions", {"json": {"model": MODEL, "prompt": ["a", "b"]}}, 400, "prompt"),
    ("unknown speculation mode", "chat/completions", {"json": {**CHAT, "speculation": {"mode": "fast"}}}, 400,
     "speculation.mode"),
    ("too many tokens (the coordinator's check)", "chat/completions", {"json": {**CHAT, "max_tokens": 100_000}},
     400, None),
    ("an unknown role (the coordinator's check)", "chat/completions",
     {"json": {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}}, 400, None),
    ("fields OpenAI does not define", "chat/completions", {"json": {**CHAT, "frobnicate": 1, "x_trace": {"a": 1}}},
     200, None),
    ("OpenAI fields without effect", "chat/completions",
     {"json": {**CHAT, "n": 1, "presence_penalty": 0, "store": False, "user": "u1", "tool_choice": "none"}}, 200, None),
]


@pytest.mark.parametrize("case,path,arguments,status,param", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_input_gets_openai_errors_and_the_server_stays_up(served, case, path, arguments, status, param):
    arguments = {"headers": AUTH, **arguments}
    response = httpx.post(f"{served.base_url}/v1/{path}", timeout=60, **arguments)
    assert response.status_code == status, response.text
    body = response.json()
    if status == 200:
        assert body["choices"][0]["message"]["role"] == "assistant"
    else:
        error = body["error"]
        assert error["message"] and error["type"] and "Traceback" not in error["message"]
        assert error["param"] == param
    assert httpx.get(f"{served.base_url}/health", timeout=10).status_code == 200


# -- statuses from the coordinator --------------------------------------------------------------------

def test_a_full_coordinator_answers_429_with_retry_after(served):
    from coordinator.server import start as start_coordinator

    stack = served.stack
    settings = load_settings("coordinator", {
        "target": served.target_dir, "auth_token": TOKEN,
        "verifier_addrs": f"127.0.0.1:{stack.port('verifier0')}", "max_concurrency": 1, "max_queued": 0},
        environ={})
    stack.servers["full-coordinator"] = stack.run(start_coordinator(settings))
    base = served.http(coordinator_addrs=f"127.0.0.1:{stack.port('full-coordinator')}")
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 400, "stream": True,
            "speculation": {"mode": "target_only"}}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH, timeout=60) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)  # the first request holds the only slot
        refused = httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=60)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "rate_limit_error"


def test_no_coordinator_is_503_and_a_deadline_is_504(served):
    dead = served.http(coordinator_addrs=f"127.0.0.1:{free_port()}")
    response = httpx.post(f"{dead}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=60)
    assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable_error"
    assert httpx.get(f"{dead}/health", timeout=10).status_code == 503
    hurried = served.http(request_timeout_s=0.05)
    response = httpx.post(f"{hurried}/v1/completions", headers=AUTH, timeout=60,
                          json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 400})
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"


# -- disconnects ------------------------------------------------------------------------------------

def _open_sessions(served) -> tuple[int, int]:
    stack = served.stack
    info = verifier_pb2.InfoRequest()
    metadata = list(AUTH.items())
    channels = {name: grpc.insecure_channel(f"127.0.0.1:{stack.port(name)}")
                for name in ("verifier0", "drafter")}
    try:
        verifier = verifier_pb2_grpc.VerifierStub(channels["verifier0"]).Info(info, metadata=metadata, timeout=5)
        drafter = drafter_pb2_grpc.DrafterStub(channels["drafter"]).Info(info, metadata=metadata, timeout=5)
    finally:
        for channel in channels.values():
            channel.close()
    return verifier.active_sessions, drafter.active_sessions


def _http_metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _cancelled_generations() -> float:
    return sum(s.value for metric in REGISTRY.collect() if metric.name == "specd_requests"
               for s in metric.samples if s.name == "specd_requests_total" and s.labels.get("status") == "cancelled")


LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 400,
        "temperature": 0, "speculation": SPECULATION}


def test_a_disconnected_stream_cancels_its_generation_and_frees_the_sessions(served):
    before = _cancelled_generations()
    with httpx.stream("POST", f"{served.base_url}/v1/chat/completions", json={**LONG, "stream": True},
                      headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert _open_sessions(served) == (1, 1)  # mid-generation: one session on each backend
    # Leaving the block closes the connection mid-stream.
    wait_until(lambda: _cancelled_generations() == before + 1, 10, "the coordinator to cancel the generation")
    wait_until(lambda: _open_sessions(served) == (0, 0), 10, "the verifier and drafter sessions to be released")
    wait_until(lambda: _http_metric(served.base_url, "specd_http_open_requests") == 0, 10,
               "the HTTP tier's open-request gauge to return to 0")


def test_a_caller_that_gives_up_on_a_whole_answer_cancels_it_too(served):
    before = _cancelled_generations()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.base_url}/v1/chat/completions", json=LONG, headers=AUTH, timeout=httpx.Timeout(60, read=0.3))
    wait_until(lambda: _cancelled_generations() == before + 1, 10, "the coordinator to cancel the generation")
    wait_until(lambda: _open_sessions(served) == (0, 0), 10, "the verifier and drafter sessions to be released")
    wait_until(lambda: _http_metric(served.base_url, "specd_http_open_requests") == 0, 10,
               "the HTTP tier's open-request gauge to return to 0")
    assert httpx.get(f"{served.base_url}/health", timeout=10).status_code == 200


# -- the command --------------------------------------------------------------------------------------

def test_specd_serve_http_serves_an_unmodified_openai_client(served):
    port = free_port()
    command = [sys.executable, "-m", "specd.cli", "serve", "http", "--port", str(port), "--model", MODEL,
               "--coordinator-addrs", served.stack.address]
    env = {**os.environ, "SPECD_AUTH_TOKEN": TOKEN}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 60, "specd serve http to answer /health")
        with openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0) as api:
            chunks = list(api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        assert json.loads(chunks[-1].model_dump_json())["speculation"]["rounds"] >= 1
    finally:
        process.terminate()
        process.wait(30)
