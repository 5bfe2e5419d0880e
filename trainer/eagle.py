"""Training a feature-level (EAGLE) drafter from the trace stream.

Traces give the committed text of each request; the target's features are not
in them (576 floats a token would make every stream entry tens of KB), so the
trainer runs the target over each sequence once, exactly as the verifier did
when it served it, and keeps the features in float16.

Training is teacher-forced on the target's features, with uniform noise on the
inputs (EAGLE's remedy for drafting on its own, slightly wrong, features):

    loss = smooth_l1(f_hat[j+1], f[j+1]) + cls_weight * KL(p_target || p_draft)

both over the draft head's vocabulary. Rows that predict a continuation
token weigh 1, prompt rows `prompt_weight`: the drafter only ever drafts
continuations. `draft_acceptance` measures what serving would see: greedy
blocks drafted on the drafter's own features, scored against the target's
greedy continuation. `FeatureRefinement` is the TrainerWorker strategy that
keeps fine-tuning a served feature drafter on the trace stream.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec.compute.sessions import crop_cache
from specdec.config import EagleSettings
from specdec.models.accept_head import lm_head_inputs
from specdec.models.checkpoints import CheckpointStore, version_name
from specdec.models.eagle import FUSE_ATTR, add_fuse, feed_rows, fused_inputs, greedy_drafts
from specdec.traces import TraceRecord
from trainer.bootstrap import init_drafter_from_target
from trainer.evaluation import AcceptanceReport
from trainer.worker import Candidate, Judgement

log = logging.getLogger(__name__)


@dataclass
class FeatureSequence:
    ids: list[int]           # committed tokens
    prompt_len: int          # ids[:prompt_len] came from the caller
    features: torch.Tensor   # [len(ids), H] float16: the target's feature at each position

    @classmethod
    def of_sample(cls, sample) -> "FeatureSequence":
        """A `trainer.bootstrap.TeacherSample`'s text and the features its decoding kept."""
        return cls([*sample.prompt, *sample.continuation], len(sample.prompt), sample.features)


def committed_sequences(records: list[TraceRecord], max_len: int = 512) -> dict[str, tuple[list[int], int]]:
    """request id -> (ids, prompt_len): the longest committed text its traces show.

    A trace's committed text is its context plus the accepted drafts; the
    context of a request's first trace is taken as its prompt.
    """
    longest: dict[str, list[int]] = {}
    prompt: dict[str, int] = {}
    for record in records:
        ids = list(record.context_ids) + list(record.draft_tokens[:record.accepted])
        if len(ids) > len(longest.get(record.request_id, [])):
            longest[record.request_id] = ids
        prompt[record.request_id] = min(prompt.get(record.request_id, len(record.context_ids)),
                                        len(record.context_ids))
    return {rid: (ids[-max_len:], max(1, prompt[rid] - max(0, len(ids) - max_len)))
            for rid, ids in longest.items() if len(ids) >= 3}


def init_from_target(target: torch.nn.Module, layer: int = -1) -> torch.nn.Module:
    """A one-layer feature drafter sharing `target`'s embeddings, final norm and LM head.

    Its decoder layer starts as a copy of the target's `layer` (the last by
    default: the one that already maps late features to the next). The fuse
    starts as "pass the feature through", so an untrained drafter predicts
    that the feature does not change.
    """
    total = int(target.config.num_hidden_layers)
    drafter = init_drafter_from_target(target, 1, layers=[layer % total])
    add_fuse(drafter)
    fuse = getattr(drafter, FUSE_ATTR)
    hidden = int(drafter.config.hidden_size)
    with torch.no_grad():
        fuse.weight.zero_()
        fuse.weight[:, hidden:].copy_(torch.eye(hidden))
        fuse.weight[:, :hidden].normal_(0.0, 0.02)
        fuse.bias.zero_()
    return drafter.to(dtype=next(target.parameters()).dtype)


@torch.no_grad()
def collect_features(target, sequences: list[tuple[list[int], int]], log_every: int = 100) -> list[FeatureSequence]:
    """The target's features over each sequence, one forward each."""
    device = next(target.parameters()).device
    out = []
    started = time.perf_counter()
    for number, (ids, prompt_len) in enumerate(sequences, start=1):
        result = target(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, logits_to_keep=1)
        out.append(FeatureSequence(ids, prompt_len, lm_head_inputs(result)[0].to(torch.float16).cpu()))
        if number % log_every == 0:
            log.info("features for %d/%d sequences (%.0f s)", number, len(sequences), time.perf_counter() - started)
    return out


def _batch(items: list[FeatureSequence], prompt_weight: float):
    """Right-padded rows j = 0..L-2 of each sequence: inputs (t[j+1], f[j]), targets f[j+1], weights."""
    width = max(len(s.ids) for s in items) - 1
    hidden = items[0].features.shape[-1]
    next_ids = torch.zeros(len(items), width, dtype=torch.long)       # [B, T]
    features = torch.zeros(len(items), width, hidden)                  # [B, T, H] f[j]
    targets = torch.zeros(len(items), width, hidden)                   # [B, T, H] f[j+1]
    weights = torch.zeros(len(items), width)                           # [B, T]
    mask = torch.zeros(len(items), width, dtype=torch.long)           # [B, T]
    for row, seq in enumerate(items):
        n = len(seq.ids) - 1
        next_ids[row, :n] = torch.tensor(seq.ids[1:])
        features[row, :n] = seq.features[:-1].float()
        targets[row, :n] = seq.features[1:].float()
        mask[row, :n] = 1
        # Row j predicts t[j+2]: a continuation token once j + 2 >= prompt_len.
        weights[row, :n] = prompt_weight
        weights[row, max(0, seq.prompt_len - 2):n] = 1.0
    return next_ids, features, targets, weights, mask


def train_feature_drafter(drafter, data: list[FeatureSequence], epochs: float = 4.0, lr: float = 1e-3,
                          batch_size: int = 8, noise: float = 0.1, cls_weight: float = 0.1,
                          prompt_weight: float = 0.2, seed: int = 0, time_limit_s: float | None = None,
                          log_every: int = 25) -> dict:
    """Trains the fuse, decoder layer and final norm (embeddings and head stay the target's)."""
    generator = random.Random(seed)
    for name, param in drafter.named_parameters():
        param.requires_grad = name.startswith(FUSE_ATTR) or ".layers." in name or ".h." in name or "norm" in name \
            or "ln_f" in name
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total_steps = max(1, int(epochs * steps_per_epoch))
    head = drafter.get_output_embeddings().weight.detach()  # [N, H]: a subset head's rows or the full head
    drafter.train()
    started = time.perf_counter()
    step, losses = 0, []
    order: list[int] = []
    while True:
        # Cosine decay over steps, or over the time limit when that comes first, so a cut run still anneals.
        progress = step / total_steps
        if time_limit_s is not None:
            progress = max(progress, (time.perf_counter() - started) / time_limit_s)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * progress))
        if not order:
            order = list(range(len(data)))
            generator.shuffle(order)
        items = [data[i] for i in order[:batch_size]]
        order = order[batch_size:]
        next_ids, features, targets, weights, mask = _batch(items, prompt_weight)
        noisy = features + (torch.rand_like(features) * 2 - 1) * noise
        inputs = fused_inputs(drafter, next_ids, noisy)  # [B, T, H]
        predicted = drafter.base_model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state  # [B, T, H]
        reg = F.smooth_l1_loss(predicted, targets, reduction="none").mean(-1)  # [B, T]
        with torch.no_grad():
            target_logp = F.log_softmax(targets @ head.T, dim=-1)  # [B, T, N]
        draft_logp = F.log_softmax(predicted @ head.T, dim=-1)
        kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1)  # [B, T]
        loss = ((reg + cls_weight * kl) * weights).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % log_every == 0:
            log.info("feature drafter step %d/%d loss %.4f (%.0f s)", step, total_steps,
                     sum(losses[-log_every:]) / log_every, time.perf_counter() - started)
    if step < total_steps:
        log.info("feature drafter training reached its time limit after %d of %d steps", step, total_steps)
    drafter.eval()
    for param in drafter.parameters():
        param.requires_grad = False
    return {"steps": step, "final_loss": sum(losses[-log_every:]) / max(1, len(losses[-log_every:])),
            "seconds": time.perf_counter() - started}


@torch.no_grad()
def draft_acceptance(drafter, data: list[FeatureSequence], block: int = 4) -> dict:
    """Greedy blocks of `block` drafts from every continuation position, as serving drafts them.

    At committed length c the drafter knows f[0..c-2] (the newest token has no
    feature yet) and drafts on its own features after that. Returns the mean
    accepted length per block and the first draft's acceptance rate.
    """
    accepted_total, first_hits, blocks, judged = 0, 0, 0, 0
    for seq in data:
        ids = torch.tensor(seq.ids)
        start = max(2, seq.prompt_len)  # committed length of the first block
        if start >= len(seq.ids):
            continue
        # Rows 0..start-2 on true features: the prefill the drafter gets with the prompt.
        logits, predicted, cache = feed_rows(drafter, None, ids[1:start], seq.features[:start - 1].float(), keep_logits=1)
        for committed in range(start, len(seq.ids)):
            rows = cache.get_seq_length()
            accepted = 0
            for slot, (token, _) in zip(range(block), greedy_drafts(drafter, cache, logits, predicted)):
                if committed + slot >= len(seq.ids):
                    break
                judged += 1
                if int(token) != seq.ids[committed + slot]:
                    break
                accepted += 1
            accepted_total += accepted
            first_hits += accepted > 0
            blocks += 1
            crop_cache(cache, rows)
            # The target verified one more token: row committed-1 on its true feature.
            logits, predicted, cache = feed_rows(drafter, cache, ids[committed:committed + 1],
                                                 seq.features[committed - 1:committed].float(), keep_logits=1)
    return {"blocks": blocks, "mean_accepted": accepted_total / max(1, blocks),
            "first_token_acceptance": first_hits / max(1, blocks), "judged_slots": judged,
            "agreement_rate": accepted_total / max(1, judged)}


def as_acceptance_report(score: dict) -> AcceptanceReport:
    """draft_acceptance's result in the promotion gate's terms."""
    return AcceptanceReport(mean_accepted_length=score["mean_accepted"], agreement_rate=score["agreement_rate"],
                            blocks=score["blocks"], judged_slots=score["judged_slots"])


def _split_features(target, records: list[TraceRecord], holdout: int, seed: int,
                    known_features: dict[str, FeatureSequence] | None) -> tuple[list, list, dict, dict]:
    """(held-out sequences: the newest `holdout` requests, shuffled training sequences, counts, every
    request's sequence by id) of the requests in `records`, with the target's features (computed
    where `known_features` lacks them)."""
    sequences = committed_sequences(records)
    if len(sequences) <= holdout:
        raise ValueError(f"{len(sequences)} requests in the traces; need more than the {holdout} held out")
    known = {rid: seq for rid, seq in (known_features or {}).items()
             if rid in sequences and seq.ids == sequences[rid][0]}
    missing = [rid for rid in sequences if rid not in known]
    known.update(zip(missing, collect_features(target, [sequences[rid] for rid in missing])))
    data = [known[rid] for rid in sequences]
    held, train = data[-holdout:], data[:-holdout]
    random.Random(seed).shuffle(train)
    return held, train, {"requests": len(sequences), "features_computed": len(missing),
                         "train_requests": len(train), "holdout_requests": len(held)}, known


def ensure_base_version(store, base: str, target: str) -> int:
    """The store's current version; an empty store first gets the feature drafter `base` (a preset or
    directory, completed from `target` if compact) as its first, promoted version."""
    current = store.current()
    if current is not None:
        return current
    from specdec.models.loader import load_model

    loaded = load_model(base, tokenizer_from=target)
    version = store.publish(loaded.model, meta={"consumer": "refine-eagle", "kind": "eagle", "source": base,
                                                "tokenizer_fingerprint": loaded.fingerprint})
    store.promote(version, f"the base drafter {base}")
    return version


class FeatureRefinement:
    """TrainerWorker strategy for a served feature drafter. It keeps a window of the newest traces
    (held-out requests apart, by the worker's split); once `round_traces` new ones arrived, or the
    stream went idle with some, a round fine-tunes the store's current version on the window's
    training requests, and the gate compares it with that version on the held-out ones. The
    target's features of requests seen in the last round are kept, so a round runs the target
    only over new traffic. Traces stay pending until the round that used them was gated."""

    holds_traces = True

    def __init__(self, target, store: CheckpointStore, settings: EagleSettings, target_version: str = ""):
        self.target, self.store, self.settings, self.target_version = target, store, settings, target_version
        self.vocab_size = int(target.config.vocab_size)
        self.window: deque[TraceRecord] = deque(maxlen=settings.window)
        self.held: deque[TraceRecord] = deque(maxlen=settings.window)
        self.features: dict[str, FeatureSequence] = {}  # request id -> sequence, of the last round's requests
        self.new_traces = 0
        self.steps = 0  # rounds
        self._judgement: Judgement | None = None

    def take(self, train: list[TraceRecord], holdout: list[TraceRecord]) -> tuple[None, None]:
        self.window.extend(train)
        self.held.extend(holdout)
        self.new_traces += len(train) + len(holdout)
        return None, None

    def due(self, idle: bool) -> bool:
        if not self.new_traces or (not idle and self.new_traces < self.settings.round_traces):
            return False
        train, held = self._sequences()
        return bool(train) and bool(held)  # else wait for traffic on both sides of the split

    def _sequences(self) -> tuple[dict, dict]:
        """(training, held-out) request id -> (ids, prompt_len); the worker's split keeps them apart."""
        return committed_sequences(list(self.window)), committed_sequences(list(self.held))

    def candidate(self) -> Candidate:
        current = self.store.current()
        if current is None:
            raise ValueError(f"{self.store.root} has no current feature drafter to refine")
        train, held = self._sequences()
        computed = self._update_features({**train, **held})
        train_data = [self.features[rid] for rid in train]
        held_data = [self.features[rid] for rid in held]
        random.Random(self.steps).shuffle(train_data)
        base = self.store.load(current)
        drafter = base.model
        before = draft_acceptance(drafter, held_data)
        training = train_feature_drafter(drafter, train_data, epochs=self.settings.epochs, lr=self.settings.lr,
                                         batch_size=self.settings.batch_size, seed=self.steps,
                                         time_limit_s=self.settings.time_limit_s or None)
        after = draft_acceptance(drafter, held_data)
        self.steps += 1
        self.new_traces = 0
        self._judgement = Judgement(as_acceptance_report(after), as_acceptance_report(before), version_name(current),
                                    len(held_data))
        log.info("feature drafter round %d from %s: held-out accepted length %.3f -> %.3f", self.steps,
                 version_name(current), before["mean_accepted"], after["mean_accepted"])
        inherited = {key: base.meta[key] for key in ("kind", "head_vocab", "tokenizer_fingerprint") if key in base.meta}
        return Candidate(drafter, None, {
            **inherited, "parent_version": current,
            "target_version": self.target_version or base.meta.get("target_version", ""),
            "train_requests": len(train_data), "holdout_requests": len(held_data), "features_computed": computed,
            "holdout_before": before, "holdout_after": after, **training})

    def _update_features(self, sequences: dict[str, tuple[list[int], int]]) -> int:
        """Keeps the target's features of exactly `sequences`, computing those not known; returns how many."""
        known = {rid: seq for rid, seq in self.features.items() if rid in sequences and seq.ids == sequences[rid][0]}
        missing = [rid for rid in sequences if rid not in known]
        known.update(zip(missing, collect_features(self.target, [sequences[rid] for rid in missing])))
        self.features = known
        return len(missing)

    def judge(self, current_version: int | None) -> Judgement:
        return self._judgement

    def decided(self, promoted: bool, candidate_version: int, current_version: int | None,
                judgement: Judgement) -> None:
        """Nothing to carry over: the next round starts from whatever version is current then."""


def distill_feature_drafter(target, records: list[TraceRecord], store, head_vocab: int = 0, holdout: int = 40,
                            promote: bool = False, seed: int = 0, target_version: str = "",
                            tokenizer_fingerprint: str = "",
                            known_features: dict[str, FeatureSequence] | None = None, **train_options) -> dict:
    """Trains a feature drafter on the requests in `records` and publishes it to `store`.

    `known_features` (request id -> sequence) spares the target a forward for requests
    whose features were kept when they were generated (`greedy_with_features`).

    The newest `holdout` requests stay out of training; the drafter's acceptance on them,
    untrained and trained, goes into the checkpoint's metadata and the returned report.
    """
    from specdec.models.vocab_head import install_subset_head, rank_tokens
    from trainer.prune_head import emitted_token_counts

    held, train, report, _ = _split_features(target, records, holdout, seed, known_features)
    drafter = init_from_target(target)
    vocab_size = int(target.config.vocab_size)
    if head_vocab and head_vocab < vocab_size:
        install_subset_head(drafter, rank_tokens(emitted_token_counts(records), vocab_size, head_vocab))
    before = draft_acceptance(drafter, held)
    training = train_feature_drafter(drafter, train, seed=seed, **train_options)
    after = draft_acceptance(drafter, held)
    report.update(holdout_before=before, holdout_after=after, **training)
    version = store.publish(drafter, meta={"consumer": "distill-eagle", "kind": "eagle", "head_vocab": head_vocab,
                                           "target_version": target_version,
                                           "tokenizer_fingerprint": tokenizer_fingerprint, **report})
    report["version"] = version
    if promote:
        store.promote(version, "distill-eagle bootstrap", {"holdout_after": after})
    log.info("feature drafter v%d: held-out accepted length %.3f -> %.3f", version, before["mean_accepted"],
             after["mean_accepted"])
    return report


def teacher_records(target, prompt_files: list[str], client, stream: str, max_new_tokens: int,
                    batch: int) -> tuple[list[TraceRecord], dict[str, FeatureSequence]]:
    """The target's greedy continuations of the prompt files as teacher traces, also appended to
    `stream` so token drafters can learn from the same run, and their features by request id.
    `target` is a specdec.models.loader.LoadedModel."""
    from specdec.compute import small_gemm
    from specdec.traces import append_traces
    from trainer.bootstrap import encode_prompt, greedy_with_features, padding_id, read_prompts, sample_traces

    items = [item for path in prompt_files for item in read_prompts(path)]
    tokenizer = target.tokenizer
    encoded = [encode_prompt(tokenizer, item.prompt) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # similar lengths pad little
    small_gemm.install(target.model)  # batched greedy decoding is the kernel's case; training reads fp32 weights
    per_item, features = {}, {}
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        samples = greedy_with_features(target.model, [encoded[i] for i in chunk], max_new_tokens,
                                       padding_id(tokenizer), set(target.eos_token_ids))
        for i, sample in zip(chunk, samples):
            per_item[i] = sample_traces([sample], [items[i].id], target_version=target.version)
            features[items[i].id] = FeatureSequence.of_sample(sample)
        append_traces(client, [record for i in chunk for record in per_item[i]], stream=stream)
        log.info("teacher traces for %d/%d prompts", min(start + batch, len(items)), len(items))
    # File order again: the newest requests are the held-out ones, and length is no way to pick them.
    return [record for i in sorted(per_item) for record in per_item[i]], features
