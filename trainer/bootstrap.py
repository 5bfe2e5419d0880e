"""Starting a drafter before there is any traffic.

`init_drafter_from_target` cuts a shallow drafter out of the target itself
(same tokenizer by construction): embeddings, final norm, lm_head and a few
evenly spaced decoder layers. `distill_from_prompts` then runs the very same
online pipeline, fed by a prompt file instead of live requests: the target's
greedy continuations become TraceRecords on the trace stream and a
TrainerWorker consumes them, publishing and gating checkpoints.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.traces import TEACHER_DRAFTER_VERSION, TraceRecord, append_traces

log = logging.getLogger(__name__)

# "model.layers.7.mlp..." (Llama, Qwen2, Mistral) or "transformer.h.7.attn..." (GPT-2)
_LAYER_KEY = re.compile(r"^(?P<prefix>.*\.(?:layers|h))\.(?P<index>\d+)\.(?P<rest>.+)$")


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread over 0..total-1, always including the first and last."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def init_drafter_from_target(target: torch.nn.Module, num_layers: int,
                             layers: list[int] | None = None) -> torch.nn.Module:
    """A `num_layers`-deep copy of `target` sharing its embeddings, final norm and lm_head.

    Its layers are copies of `layers` when given, else evenly spaced ones.
    """
    config = copy.deepcopy(target.config)
    total = config.num_hidden_layers
    keep = sorted(layers) if layers else evenly_spaced_layers(total, num_layers)
    if layers and (len(keep) != num_layers or not all(0 <= i < total for i in keep)):
        raise ValueError(f"cannot keep layers {layers} as {num_layers} of {total}")
    config.num_hidden_layers = len(keep)  # GPT-2 maps this onto n_layer
    if isinstance(getattr(config, "layer_types", None), list):  # Qwen2-style per-layer attention kinds
        config.layer_types = [config.layer_types[i] for i in keep]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, len(keep))
    from transformers import AutoModelForCausalLM

    drafter = AutoModelForCausalLM.from_config(config)
    source = target.state_dict()
    state = {}
    for key in drafter.state_dict():
        match = _LAYER_KEY.match(key)
        if match:
            source_key = f"{match['prefix']}.{keep[int(match['index'])]}.{match['rest']}"
        else:
            source_key = key
        if source_key not in source:
            raise KeyError(f"target has no {source_key} for drafter parameter {key}")
        state[key] = source[source_key].detach().clone()
    drafter.load_state_dict(state, strict=True)
    drafter.to(dtype=next(target.parameters()).dtype, device=next(target.parameters()).device)
    log.info("initialised a %d-layer drafter from target layers %s", len(keep), keep)
    return drafter


@dataclass
class Prompt:
    id: str
    category: str
    prompt: str


def read_prompts(path: str | Path) -> list[Prompt]:
    """JSON Lines of {"id", "category", "prompt"}; blank lines ignored."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompts.append(Prompt(id=str(item.get("id", f"{Path(path).stem}-{number}")),
                                  category=str(item.get("category", "")), prompt=str(item["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a prompt record: {err}") from None
    return prompts


def padding_id(tokenizer) -> int:
    """The id batched generation pads with: the tokenizer's pad token, else its EOS, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def encode_prompt(tokenizer, text: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a user turn (chat template with a generation prompt when the tokenizer has one)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
        if hasattr(encoded, "keys"):  # some versions return a BatchEncoding
            encoded = encoded["input_ids"]
        return list(encoded)
    return list(tokenizer(text)["input_ids"])


def user_turn_prefix(tokenizer) -> list[int]:
    """The chat template's tokens up to where a user's message starts."""
    marker = "\x1fspecd-user-turn\x1f"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template to open a user turn with")
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in text:
        raise ValueError("the chat template does not show the user's message verbatim")
    return list(tokenizer(text[:text.index(marker)], add_special_tokens=False)["input_ids"])


def normalized_prompt(text: str) -> str:
    """Case and whitespace folded: two prompts that differ only there are the same prompt."""
    return " ".join(text.lower().split())


@torch.no_grad()
def sample_user_turns(target, tokenizer, count: int, *, max_tokens: int = 48, temperature: float = 1.0,
                      top_p: float = 0.95, batch: int = 64, seed: int = 0, exclude: set[str] = frozenset(),
                      min_words: int = 4) -> list[str]:
    """Requests written by the target itself (Magpie, Xu et al. 2024): an instruction-tuned
    model continues an open user turn with the kind of request it was tuned on.

    Keeps the turns it closes within `max_tokens`, with at least `min_words` words,
    once each and none whose normalised text is in `exclude`."""
    prefix = user_turn_prefix(tokenizer)
    pad_id = padding_id(tokenizer)
    eos = sorted({tokenizer.eos_token_id} - {None})
    if not eos:
        raise ValueError("the tokenizer has no EOS token to end a user turn with")
    device = next(target.parameters()).device
    torch.manual_seed(seed)
    seen, texts = set(exclude), []
    rounds = 0
    while len(texts) < count and rounds < 4 * (count // batch + 1):
        rounds += 1
        input_ids = torch.tensor([prefix] * batch, device=device)
        output = target.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                 temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_tokens,
                                 pad_token_id=pad_id, eos_token_id=eos)
        for row in output[:, len(prefix):].tolist():
            end = next((i for i, token in enumerate(row) if token in eos), None)
            if end is None:  # cut off mid-request
                continue
            text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
            key = normalized_prompt(text)
            if len(text.split()) >= min_words and key not in seen:
                seen.add(key)
                texts.append(text)
        log.info("self-prompts: %d/%d after %d rounds", len(texts), count, rounds)
    return texts[:count]


@dataclass
class TeacherSample:
    prompt: list[int]
    continuation: list[int]      # greedy, ending at its first EOS (kept)
    features: torch.Tensor       # [len(prompt) + len(continuation), H] float16: the LM head's input at each position
    top_ids: list[list[int]]     # [len(continuation) + 1][K]: the target's top-k after prompt[-1] and each token
    top_probs: list[list[float]]


@torch.no_grad()
def greedy_with_features(target, prompts: list[list[int]], max_new_tokens: int, pad_id: int, eos_ids: set[int],
                         top_k: int = 16) -> list[TeacherSample]:
    """Batched greedy generation (left-padded) that keeps what the trainers would otherwise
    recompute: the target's features (EAGLE) and its top-k at every step (token drafters).
    Each row runs one forward past its last token, so that token has a feature and a top-k."""
    device = next(target.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, W]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)    # [B, W]
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)                  # [B, W]
    head = target.get_output_embeddings()  # the plain head: a model that soft-caps its logits (Gemma 2) is not covered
    target.eval()
    out = target.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            position_ids=positions.to(device), use_cache=True)
    hidden = out.last_hidden_state  # [B, W, H]: after the final norm, the head's input
    features = [[hidden[row, width - len(p):].to(torch.float16).cpu()] for row, p in enumerate(prompts)]
    logits = head(hidden[:, -1])    # [B, V]
    continuations: list[list[int]] = [[] for _ in prompts]
    tops: list[tuple[list, list]] = [([], []) for _ in prompts]
    ended = [False] * len(prompts)
    collecting = list(range(len(prompts)))
    for step in range(max_new_tokens + 1):
        probs, ids = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)  # [B, K]
        for row in collecting:
            tops[row][0].append(ids[row].tolist())
            tops[row][1].append(probs[row].tolist())
        collecting = [row for row in collecting if not ended[row]]
        if step == max_new_tokens or not collecting:
            break
        tokens = logits.argmax(-1)  # [B]
        for row in collecting:
            continuations[row].append(int(tokens[row]))
            ended[row] = int(tokens[row]) in eos_ids
        attention_mask = torch.cat([attention_mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        out = target.base_model(input_ids=tokens[:, None], attention_mask=attention_mask.to(device),
                                position_ids=positions.to(device), past_key_values=out.past_key_values,
                                use_cache=True)
        hidden = out.last_hidden_state  # [B, 1, H]
        for row in collecting:
            features[row].append(hidden[row].to(torch.float16).cpu())
        logits = head(hidden[:, -1])
    return [TeacherSample(prompt, continuation, torch.cat(rows), top[0], top[1])
            for prompt, continuation, rows, top in zip(prompts, continuations, features, tops)]


def teacher_traces(target, prompts: list[list[int]], request_ids: list[str], *, max_new_tokens: int = 64,
                   block_size: int = 8, top_k: int = 16, pad_id: int = 0, eos_ids: set[int] | None = None,
                   target_version: str = "") -> list[TraceRecord]:
    """TraceRecords from the target's own greedy continuations, cut into blocks of
    `block_size` "draft" tokens that the target accepts in full."""
    samples = greedy_with_features(target, prompts, max_new_tokens, pad_id, eos_ids or set(), top_k)
    return sample_traces(samples, request_ids, block_size=block_size, target_version=target_version)


def sample_traces(samples: list[TeacherSample], request_ids: list[str], block_size: int = 8,
                  target_version: str = "") -> list[TraceRecord]:
    """Each sample's continuation as fully accepted teacher blocks of `block_size` tokens."""
    records = []
    for sample, request_id in zip(samples, request_ids):
        continuation = sample.continuation
        for start in range(0, len(continuation), block_size):
            draft = continuation[start:start + block_size]
            records.append(TraceRecord(
                request_id=request_id, drafter_version=TEACHER_DRAFTER_VERSION, target_version=target_version,
                context_ids=[*sample.prompt, *continuation[:start]], draft_tokens=draft,
                target_top_ids=sample.top_ids[start:start + len(draft) + 1],
                target_top_probs=sample.top_probs[start:start + len(draft) + 1],
                accepted=len(draft), temperature=0.0,
            ))
    return records


@dataclass
class DistillSummary:
    prompts: int
    traces: int
    steps: int
    decisions: list[dict]


def distill_from_prompts(target, worker, prompts: list[list[int]], request_ids: list[str], *,
                         max_new_tokens: int = 64, block_size: int = 8, top_k: int = 16, generation_batch: int = 8,
                         pad_id: int = 0, eos_ids: set[int] | None = None, target_version: str = "",
                         maxlen: int | None = 100_000, final_publish: bool = True, epochs: int = 1,
                         seed: int = 0) -> DistillSummary:
    """Generates teacher traces batch by batch, appends them to the worker's stream
    and lets `worker` consume them before generating more (the stream stays short).
    Epochs after the first replay the same teacher traces in a new order (the
    target runs once; a small prompt set is worth several passes), minus the
    held-out requests, which the gate already holds. Ends with a checkpoint
    through the promotion gate unless one was just published."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    total, generated = 0, []
    for start in range(0, len(prompts), generation_batch):
        records = teacher_traces(target, prompts[start:start + generation_batch],
                                 request_ids[start:start + generation_batch], max_new_tokens=max_new_tokens,
                                 block_size=block_size, top_k=top_k, pad_id=pad_id, eos_ids=eos_ids,
                                 target_version=target_version)
        total += _feed(worker, records, maxlen)
        if epochs > 1:
            generated += [r for r in records if not worker.is_holdout(r.request_id)]
        log.info("distilled %d/%d prompts, %d traces, %d steps", min(start + generation_batch, len(prompts)),
                 len(prompts), total, worker.steps)
    order = random.Random(seed)
    chunk = max(1, generation_batch * max(1, max_new_tokens // max(1, block_size)))
    for epoch in range(2, epochs + 1):
        order.shuffle(generated)
        for start in range(0, len(generated), chunk):
            total += _feed(worker, generated[start:start + chunk], maxlen)
        log.info("epoch %d/%d done: %d traces, %d steps", epoch, epochs, total, worker.steps)
    if final_publish and worker.steps and worker.steps % worker.settings.publish_every:
        worker.publish_and_gate()
    return DistillSummary(prompts=len(prompts), traces=total, steps=worker.steps, decisions=list(worker.decisions))


def _feed(worker, records: list[TraceRecord], maxlen: int | None) -> int:
    """Appends `records` to the worker's stream and trains on all of them."""
    append_traces(worker.consumer.client, records, stream=worker.consumer.stream, maxlen=maxlen)
    worker.drain()
    return len(records)


def distill_prompt_file(target, tokenizer, worker, prompts_path: str | Path, *, max_prompts: int | None = None,
                        use_chat_template: bool = True, **kwargs) -> DistillSummary:
    """distill_from_prompts on a JSON Lines prompt file, tokenised with the target's tokenizer."""
    items = read_prompts(prompts_path)[:max_prompts]
    pad_id = padding_id(tokenizer)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    generation_eos = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    if isinstance(generation_eos, int):
        eos.add(generation_eos)
    elif isinstance(generation_eos, list):
        eos.update(generation_eos)
    encoded = [encode_prompt(tokenizer, item.prompt, use_chat_template) for item in items]
    return distill_from_prompts(target, worker, encoded, [item.id for item in items], pad_id=pad_id, eos_ids=eos,
                                **kwargs)
