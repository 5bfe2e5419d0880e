"""SpecDec++-style acceptance prediction.

A small MLP reads the drafter's last-layer hidden state at the position that
PRODUCED a draft token (the same tensor its lm_head turned into that token's
logits) and predicts the probability that the target accepts the token. The
coordinator's "specdecpp" policy stops drafting once the predicted chance
that the whole block survives falls below a threshold.

Use `lm_head_inputs(outputs)` at inference and in training so both read the
same tensor (HF's ``hidden_states[-1]``: after the final norm).
"""

from __future__ import annotations

import torch
from torch import nn


class AcceptHead(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.inner_size = inner_size or max(16, min(256, hidden_size // 2))
        self.net = nn.Sequential(
            nn.LayerNorm(hidden_size),  # hidden-state scale differs between models; normalise first
            nn.Linear(hidden_size, self.inner_size),
            nn.GELU(),
            nn.Linear(self.inner_size, 1),
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> acceptance logits [...] (what training needs)."""
        return self.net(hidden).squeeze(-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> P(target accepts the token produced there) [...]."""
        return torch.sigmoid(self.logits(hidden))

    def spec(self) -> dict:
        return {"hidden_size": self.hidden_size, "inner_size": self.inner_size}

    @classmethod
    def from_spec(cls, spec: dict) -> "AcceptHead":
        return cls(int(spec["hidden_size"]), int(spec["inner_size"]))


def lm_head_inputs(outputs) -> torch.Tensor:
    """A HF forward's (output_hidden_states=True) last hidden state, the LM head's input: [B, T, H].

    The acceptance head reads a drafter's; feature-level drafters (specdec.models.eagle) read the target's."""
    return outputs.hidden_states[-1]


def accept_labels(num_draft: int, accepted: int) -> tuple[list[float], list[bool]]:
    """Labels from a verified block: slots before `accepted` were accepted (1), the
    slot at `accepted` was rejected (0), later slots were never judged (masked out)."""
    if not 0 <= accepted <= num_draft:
        raise ValueError(f"accepted={accepted} outside 0..{num_draft}")
    labels = [1.0 if i < accepted else 0.0 for i in range(num_draft)]
    mask = [i <= accepted for i in range(num_draft)]
    return labels, mask


def greedy_accept_labels(drafter_argmax: list[int], target_tokens: list[int]) -> tuple[list[float], list[bool]]:
    """Labels when the context follows the target's own greedy path (distillation
    traces): the drafter's proposal at a slot is accepted iff it equals the
    target's token there, and every slot is judged because the prefix before it
    is always the target's."""
    if len(drafter_argmax) != len(target_tokens):
        raise ValueError("drafter_argmax and target_tokens differ in length")
    labels = [1.0 if d == t else 0.0 for d, t in zip(drafter_argmax, target_tokens)]
    return labels, [True] * len(labels)


def accept_head_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits, labels: [N] float; mask: [N] bool -> mean binary cross-entropy over judged slots."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[mask], labels[mask].to(logits.dtype))
