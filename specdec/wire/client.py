"""A small Python client for backend services calling the specd coordinator."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Iterator

import grpc

from specdec.config import MODE_NAMES, POLICY_NAMES
from specdec.v1 import common_pb2, generation_pb2, generation_pb2_grpc

POLICIES = {name: generation_pb2.DraftPolicy.Value(f"DRAFT_POLICY_{name.upper()}") for name in POLICY_NAMES}
MODES = {name: generation_pb2.PipelineMode.Value(f"PIPELINE_MODE_{name.upper()}") for name in MODE_NAMES}


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: dict = field(default_factory=dict)


def build_request(prompt: str | None = None, messages: list[dict] | None = None, token_ids: list[int] | None = None,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                  seed: int | None = None, stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                  raw: bool = False, policy: str = "", mode: str = "", draft_length: int = 0,
                  policy_threshold: float = 0.0, bild_rollback_threshold: float = 0.0,
                  exclude_from_training: bool = False, ignore_eos: bool = False,
                  request_id: str = "") -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(
        max_new_tokens=max_new_tokens,
        sampling=common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed or 0,
                                           has_seed=seed is not None),
        stop=stop or [], stop_token_ids=stop_token_ids or [], raw=raw, policy=POLICIES.get(policy, 0),
        mode=MODES.get(mode, 0), draft_length=draft_length, policy_threshold=policy_threshold,
        bild_rollback_threshold=bild_rollback_threshold, exclude_from_training=exclude_from_training,
        ignore_eos=ignore_eos, request_id=request_id or uuid.uuid4().hex)
    if token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    elif messages is not None:
        request.messages.messages.extend(generation_pb2.ChatMessage(**m) for m in messages)
    elif prompt is not None:
        request.prompt = prompt
    return request


def stats_dict(stats: generation_pb2.GenerationStats) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class SpecdClient:
    """Synchronous client. `token` is the bearer token; `root_certificates` enables TLS."""

    def __init__(self, addr: str, token: str = "", root_certificates: bytes | None = None,
                 timeout_s: float | None = 300.0, client_id: str = ""):
        self.channel = (grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates))
                        if root_certificates else grpc.insecure_channel(addr))
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        if client_id:  # the coordinator's per-client concurrency limit counts by it (else by address)
            self.metadata.append(("x-client-id", client_id))
        self.timeout_s = timeout_s

    def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        request = build_request(prompt, **kwargs)
        response = self.stub.Generate(request, timeout=self.timeout_s,
                                      metadata=self.metadata + [("x-request-id", request.request_id)])
        return Completion(response.request_id, list(response.token_ids), response.text,
                          generation_pb2.FinishReason.Name(response.finish_reason), stats_dict(response.stats))

    def stream(self, prompt: str | None = None, **kwargs) -> Iterator[generation_pb2.GenerateChunk]:
        request = build_request(prompt, **kwargs)
        return self.stub.GenerateStream(request, timeout=self.timeout_s,
                                        metadata=self.metadata + [("x-request-id", request.request_id)])

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
