"""A verifier, a drafter and a coordinator on loopback for the tests of each service on its own: stubs that call
the backends directly, and what their answers are compared with."""

from __future__ import annotations

import grpc
import pytest
import torch
from conftest import InProcessStack
from transformers import AutoModelForCausalLM

from specdec.v1 import common_pb2, drafter_pb2_grpc, verifier_pb2_grpc

GREEDY = common_pb2.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def stack(tiny_dirs):
    """One verifier and an fp32 drafter of an unrelated model, and a coordinator, per module."""
    dirs = tiny_dirs["llama"]
    # fp32 drafts: the tests below compare the drafter's numbers with its model's own forward
    running = InProcessStack(dirs["target"], dirs["unrelated"], verifiers=1, drafter_overrides={"draft_weights": "fp32"})
    yield running, dirs
    running.close()


def stubs(stack):
    """(verifier, drafter) stubs of `stack`'s backends."""
    running, _ = stack
    verifier = verifier_pb2_grpc.VerifierStub(grpc.insecure_channel(f"127.0.0.1:{running.port('verifier0')}"))
    drafter = drafter_pb2_grpc.DrafterStub(grpc.insecure_channel(f"127.0.0.1:{running.port('drafter')}"))
    return verifier, drafter


def next_logits(model_dir: str, ids: list[int]) -> torch.Tensor:
    """The model's own logits for the token after `ids`: a fresh forward pass."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def count_fed_tokens(model) -> list[int]:
    """Records how many tokens each forward of `model` feeds."""
    fed: list[int] = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    return fed


def status_of(call) -> tuple[grpc.StatusCode, str]:
    """The status code and details of the error `call` raises (streams are read to the end)."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return info.value.code(), info.value.details()
