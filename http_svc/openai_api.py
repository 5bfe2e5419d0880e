"""OpenAI's request and response shapes, and their conversion to and from the Generation API.

A request body becomes an `ApiCall` (the GenerateRequest plus what the response needs); the chunks a
coordinator streams back become OpenAI's completion objects or stream chunks. Values the core cannot
honour are refused with a 400 naming the field; fields OpenAI does not define are returned to the caller
of `parse_call` so it can log them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from http_svc.errors import ApiError
from specdec.config import MODE_NAMES, POLICY_NAMES
from specdec.v1 import generation_pb2
from specdec.wire.client import build_request

CHAT, COMPLETION = "chat.completion", "text_completion"

FINISH_REASONS = {generation_pb2.FINISH_REASON_LENGTH: "length", generation_pb2.FINISH_REASON_EOS: "stop",
                  generation_pb2.FINISH_REASON_STOP: "stop"}

# OpenAI fields that do not change what is generated: accepted without a word.
NO_EFFECT = frozenset({"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
                       "parallel_tool_calls", "stream_options", "user"})


class Speculation(BaseModel):
    """The `speculation` extension (the openai client sends it through `extra_body`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal[MODE_NAMES] | None = None
    policy: Literal[POLICY_NAMES] | None = None
    draft_length: int | None = Field(None, ge=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str | list[TextPart] | None = None


class _Request(BaseModel):
    """Fields both endpoints share. Strict: a number sent as a string is a wrong type, not a number."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0: off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    speculation: Speculation | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    return_token_ids: bool = False  # vLLM's extension: each choice also carries its token ids
    # What the core cannot honour; each refused below, unless it holds its "off" value.
    best_of: int | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


def _unhonoured(request: _Request) -> list[tuple[str, str]]:
    """(field, why) for each value the core cannot honour."""
    values = request.model_dump(exclude_unset=True)
    problems = []

    def refuse(name: str, ok, why: str) -> None:
        if name in values and values[name] is not None and not ok(values[name]):
            problems.append((name, why))

    refuse("n", lambda v: v == 1, "only n=1 is supported")
    refuse("best_of", lambda v: v == 1, "only best_of=1 is supported")
    refuse("presence_penalty", lambda v: v == 0, "penalties are not supported (only 0)")
    refuse("frequency_penalty", lambda v: v == 0, "penalties are not supported (only 0)")
    refuse("logit_bias", lambda v: not v, "logit_bias is not supported")
    refuse("logprobs", lambda v: not v, "logprobs are not supported")
    refuse("top_logprobs", lambda v: not v, "logprobs are not supported")
    refuse("response_format", lambda v: v.get("type") == "text", "only the text response format is supported")
    for name in ("tools", "functions"):
        refuse(name, lambda v: not v, "tool calls are not supported")
    for name in ("tool_choice", "function_call"):
        refuse(name, lambda v: v == "none", "tool calls are not supported")
    refuse("modalities", lambda v: v == ["text"], "only text output is supported")
    refuse("audio", lambda v: False, "audio output is not supported")
    refuse("prediction", lambda v: False, "predicted outputs are not supported")
    refuse("echo", lambda v: not v, "echo is not supported")
    refuse("suffix", lambda v: not v, "suffix is not supported")
    return problems


def _param(loc: tuple) -> str:
    """A pydantic error location as OpenAI names a parameter (`messages[0].content`), without union tags."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool"):
            break  # the union member pydantic tried, not a field
        else:
            name += ("." if name else "") + part
    return name


@dataclass
class ApiCall:
    """One parsed API request: the GenerateRequest for the coordinator plus what its response needs."""

    kind: str  # CHAT or COMPLETION
    model: str
    request: generation_pb2.GenerateRequest
    stream: bool
    include_usage: bool
    client_id: str  # the OpenAI `user`, for the coordinator's per-client limits ('' : none given)
    unknown_fields: list[str]
    return_token_ids: bool
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.kind == CHAT else "cmpl-") + self.request.request_id


def _chat_messages(messages: list[Message]) -> list[dict]:
    converted = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise ApiError.invalid(f"messages[{index}].content", "only text content parts are supported")
            content = "".join(part.text for part in content)
        if content is None:
            raise ApiError.invalid(f"messages[{index}].content", "a message needs text content")
        # OpenAI's newer models read "developer" as the system prompt; chat templates know only "system".
        converted.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return converted


def parse_call(kind: str, body: bytes, default_max_tokens: int, request_id: str) -> ApiCall:
    """The ApiCall of a request body, or ApiError (400) naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError.invalid(None, f"the request body is not valid UTF-8 (byte {err.start})") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError.invalid(None, f"the request body is not valid JSON: {err.msg} at line {err.lineno} "
                                     f"column {err.colno}") from None
    if not isinstance(payload, dict):
        raise ApiError.invalid(None, "the request body must be a JSON object")
    schema = ChatRequest if kind == CHAT else CompletionRequest
    try:
        parsed = schema.model_validate(payload)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        param = _param(first["loc"])
        raise ApiError.invalid(param or None, f"{param or 'body'}: {first['msg']}") from None
    problems = _unhonoured(parsed)
    if problems:
        name, why = problems[0]
        raise ApiError.invalid(name, f"{name}: {why}")
    return ApiCall(kind, parsed.model, _generate_request(parsed, default_max_tokens, request_id), parsed.stream,
                   bool(parsed.stream_options and parsed.stream_options.include_usage), parsed.user or "",
                   sorted(set(parsed.model_extra or ()) - NO_EFFECT), parsed.return_token_ids)


def _generate_request(parsed: _Request, default_max_tokens: int, request_id: str) -> generation_pb2.GenerateRequest:
    inputs: dict = {}
    if isinstance(parsed, ChatRequest):
        inputs["messages"] = _chat_messages(parsed.messages)
        max_tokens = parsed.max_completion_tokens or parsed.max_tokens
    else:
        prompt = parsed.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError.invalid("prompt", "only one prompt per request is supported")
            prompt = prompt[0]
        if isinstance(prompt, str):
            inputs.update(prompt=prompt, raw=True)  # a completion continues the text as given: no chat template
        else:
            inputs["token_ids"] = prompt
        max_tokens = parsed.max_tokens
    speculation = parsed.speculation or Speculation()
    stop = [parsed.stop] if isinstance(parsed.stop, str) else parsed.stop
    try:
        return build_request(**inputs, max_new_tokens=max_tokens or default_max_tokens,
                             temperature=1.0 if parsed.temperature is None else parsed.temperature,
                             top_p=1.0 if parsed.top_p is None else parsed.top_p,
                             top_k=max(parsed.top_k or 0, 0), seed=parsed.seed, stop=stop,
                             mode=speculation.mode or "", policy=speculation.policy or "",
                             draft_length=speculation.draft_length or 0, ignore_eos=parsed.ignore_eos,
                             request_id=request_id)
    except UnicodeEncodeError:  # JSON can escape a lone surrogate, which is no text
        raise ApiError.invalid(None, "the request holds a string that is not valid Unicode (a lone surrogate)") \
            from None
    except ValueError as err:  # a number outside protobuf's int32 / int64
        raise ApiError.invalid(None, f"a value is out of range: {err}") from None


# -- responses --------------------------------------------------------------------------------------

def speculation_stats(stats: generation_pb2.GenerationStats) -> dict:
    """What speculation did for one request: the `speculation` object of every response."""
    return {"mode": stats.mode, "policy": stats.policy, "drafted_tokens": stats.drafted_tokens,
            "accepted_tokens": stats.accepted_tokens, "acceptance_rate": stats.acceptance_rate,
            "rounds": stats.rounds, "mean_accepted_length": stats.mean_accepted_length,
            "fallback_steps": stats.fallback_steps, "speculation_off_rounds": stats.speculation_off_rounds,
            "lookup_rounds": stats.lookup_rounds, "lookup_accepted_tokens": stats.lookup_accepted_tokens,
            "mean_block_length": stats.mean_block_length, "drafter_version": stats.drafter_version}


def usage(stats: generation_pb2.GenerationStats, completion_tokens: int) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": stats.prompt_tokens + completion_tokens}


def _choice(call: ApiCall, text: str | None, finish_reason: str | None, streaming: bool,
            token_ids: list[int]) -> dict:
    if call.kind == COMPLETION:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    elif streaming:
        choice = {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    if call.return_token_ids:
        choice["token_ids"] = token_ids
    return choice


def response_body(call: ApiCall, text: str, token_ids: list[int], final: generation_pb2.GenerateChunk) -> dict:
    return {"id": call.id, "object": call.kind, "created": call.created, "model": call.model,
            "choices": [_choice(call, text, FINISH_REASONS.get(final.finish_reason, "stop"), False, token_ids)],
            "usage": usage(final.stats, len(token_ids)), "speculation": speculation_stats(final.stats)}


def chunk_body(call: ApiCall, text: str | None, finish_reason: str | None = None, token_ids: list[int] = (),
               **extra) -> dict:
    """One stream chunk; `extra` adds the usage and speculation objects to the final ones."""
    kind = "chat.completion.chunk" if call.kind == CHAT else COMPLETION
    body = {"id": call.id, "object": kind, "created": call.created, "model": call.model,
            "choices": [_choice(call, text, finish_reason, True, list(token_ids))]}
    if call.include_usage:
        body["usage"] = None  # OpenAI's chunks say null until the usage chunk
    body.update(extra)
    return body


def usage_chunk(call: ApiCall, completion_tokens: int, final: generation_pb2.GenerateChunk) -> dict:
    """The last chunk of a stream that asked for usage: no choices, the usage and speculation objects."""
    return {**chunk_body(call, None), "choices": [], "usage": usage(final.stats, completion_tokens),
            "speculation": speculation_stats(final.stats)}


def first_chat_chunk(call: ApiCall) -> dict:
    body = chunk_body(call, "")
    body["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return body


def sse(data: dict | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)).encode() + b"\n\n"


DONE = "[DONE]"
