"""Teacher-forcing batches from traces, and the drafter forward that reads only draft slots.

A trace's drafter input is context_ids + draft_tokens. The logits at
position len(context) - 1 + i predict draft slot i (i = len(draft) is the
bonus slot), and the hidden state there is what the acceptance head reads
for the token in slot i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.models.accept_head import accept_labels
from specdec.traces import TEACHER_DRAFTER_VERSION, TraceRecord


@dataclass
class TraceBatch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    slot_row: torch.Tensor  # [S] long: sequence of each supervised slot
    slot_pos: torch.Tensor  # [S] long: position whose output predicts the slot
    slot_index: torch.Tensor  # [S] long: draft slot number i (len(draft) = bonus)
    draft_token: torch.Tensor  # [S] long: token in the slot, -1 for the bonus slot
    top_ids: torch.Tensor  # [S, K] long, -1 padded
    top_probs: torch.Tensor  # [S, K] float
    accept_label: torch.Tensor  # [S] float: 1 accepted, 0 rejected (trace labels)
    accept_mask: torch.Tensor  # [S] bool: slot judged by the verifier (trace labels)
    teacher_slot: torch.Tensor  # [S] bool: draft slot of a teacher trace (labels come from the drafter's argmax)
    record_index: torch.Tensor  # [S] long: index into the records list

    @property
    def num_slots(self) -> int:
        return int(self.slot_row.numel())

    def to(self, device) -> "TraceBatch":
        return TraceBatch(**{name: value.to(device) for name, value in self.__dict__.items()})


def usable(record: TraceRecord, vocab_size: int) -> bool:
    """A record the drafter can be trained on: ids within its vocabulary, something to predict."""
    if not record.draft_tokens and not record.target_top_ids:
        return False
    tokens = [*record.context_ids, *record.draft_tokens, *(i for row in record.target_top_ids for i in row)]
    return all(0 <= t < vocab_size for t in tokens)


def build_batch(records: list[TraceRecord], max_context: int = 256, pad_id: int = 0,
                merge_requests: bool = False) -> TraceBatch | None:
    """Packs records into one right-padded batch; None when no slot has a target.

    With merge_requests, the blocks of one request share one sequence: the
    request's latest trace (context + draft) carries every earlier block's slots
    whose prefix lies on it (everything up to and including each block's first
    rejection), so one forward supervises them all instead of re-reading the
    context per block. Slots after an earlier block's rejection condition on
    text that was never committed and are dropped; a block that cannot be
    aligned keeps its own sequence."""
    sequences: list[list[int]] = []
    rows, positions, indices, draft_tokens, tops, labels, label_masks, teacher, record_ix = ([] for _ in range(9))
    for group in _sequence_groups(records, merge_requests):
        owner = records[group[-1]]
        full = [*owner.context_ids, *owner.draft_tokens]
        cut = max(0, len(owner.context_ids) - max_context) if max_context > 0 else 0
        row = len(sequences)
        added = False
        for record_number in group:
            record = records[record_number]
            end = len(owner.context_ids) if record is owner else _context_end(full, record.context_ids)
            draft = record.draft_tokens
            trace_labels, trace_mask = accept_labels(len(draft), record.accepted)
            is_teacher = record.drafter_version == TEACHER_DRAFTER_VERSION
            for i, (ids, probs) in enumerate(zip(record.target_top_ids, record.target_top_probs)):
                position = end - 1 + i - cut
                if not ids or position < 0:
                    continue  # unknown target distribution, or nothing before the slot to predict from
                if record is not owner and (end + i > len(full) or full[end:end + i] != draft[:i]):
                    break  # this slot's prefix left the owner's sequence, and so do the later ones
                rows.append(row)
                positions.append(position)
                indices.append(i)
                draft_tokens.append(draft[i] if i < len(draft) else -1)
                tops.append((ids, probs))
                in_draft = i < len(draft)
                labels.append(trace_labels[i] if in_draft else 0.0)
                label_masks.append(in_draft and trace_mask[i] and not is_teacher)
                teacher.append(in_draft and is_teacher)
                record_ix.append(record_number)
                added = True
        if added:
            sequences.append(full[cut:])
    if not rows:
        return None
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, sequence in enumerate(sequences):
        input_ids[r, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[r, : len(sequence)] = 1
    k = max(len(ids) for ids, _ in tops)
    top_ids = torch.full((len(tops), k), -1, dtype=torch.long)
    top_probs = torch.zeros((len(tops), k), dtype=torch.float32)
    for s, (ids, probs) in enumerate(tops):
        top_ids[s, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        top_probs[s, : len(probs)] = torch.tensor(probs, dtype=torch.float32)
    return TraceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        slot_row=torch.tensor(rows, dtype=torch.long),
        slot_pos=torch.tensor(positions, dtype=torch.long),
        slot_index=torch.tensor(indices, dtype=torch.long),
        draft_token=torch.tensor(draft_tokens, dtype=torch.long),
        top_ids=top_ids,
        top_probs=top_probs,
        accept_label=torch.tensor(labels, dtype=torch.float32),
        accept_mask=torch.tensor(label_masks, dtype=torch.bool),
        teacher_slot=torch.tensor(teacher, dtype=torch.bool),
        record_index=torch.tensor(record_ix, dtype=torch.long),
    )


def _sequence_groups(records: list[TraceRecord], merge_requests: bool) -> list[list[int]]:
    """Record numbers per input sequence; the last of each group owns the sequence.
    Merged: a request's latest record owns it, and earlier ones join if their context aligns."""
    if not merge_requests:
        return [[n] for n in range(len(records))]
    by_request: dict[str, list[int]] = {}
    for number, record in enumerate(records):
        by_request.setdefault(record.request_id, []).append(number)
    groups = []
    for numbers in by_request.values():
        owner = records[numbers[-1]]
        full = [*owner.context_ids, *owner.draft_tokens]
        joined = [n for n in numbers[:-1] if _context_end(full, records[n].context_ids) is not None]
        groups += [[n] for n in numbers[:-1] if n not in joined]
        groups.append([*joined, numbers[-1]])
    return groups


def _context_end(sequence: list[int], context: list[int]) -> int | None:
    """The end index of the latest occurrence of `context` in `sequence` (None: absent or empty)."""
    n = len(context)
    if n == 0:
        return None
    for end in range(len(sequence), n - 1, -1):
        if sequence[end - 1] == context[-1] and sequence[end - n:end] == context:
            return end
    return None


def slot_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, slot_row: torch.Tensor,
                 slot_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the decoder once and the lm_head only at the supervised slots.

    input_ids, attention_mask: [B, T]; slot_row, slot_pos: [S]
    -> (logits [S, V], last-layer hidden states [S, H]).
    Skipping the lm_head elsewhere keeps memory at S x V instead of B x T x V,
    which matters for 50k-token vocabularies. Assumes logits = lm_head(hidden),
    true for Llama, Qwen2, Mistral and GPT-2 style models.
    """
    outputs = model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    hidden = outputs.last_hidden_state[slot_row, slot_pos]  # [S, H]
    logits = model.get_output_embeddings()(hidden)  # [S, V]
    return logits, hidden
