"""The layer a drafter's subset LM head runs: a linear over some rows of the vocabulary (specdec.models.vocab_head
chooses the rows and builds it), whose projection the small-batch kernel takes over."""

from __future__ import annotations

import torch

# exp(EXCLUDED_LOGIT - any real logit) is exactly 0 in float16/bfloat16/float32; finite, so losses stay finite.
EXCLUDED_LOGIT = -1.0e4


class SubsetLMHead(torch.nn.Module):
    """Linear LM head whose rows are `token_ids`; logits elsewhere are EXCLUDED_LOGIT."""

    project = staticmethod(torch.nn.functional.linear)  # small_gemm.install swaps in its kernel
    blocks = None  # the weight in blocks of 32 (small_gemm.BlockWeight), set only with the kernel installed

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        if weight.shape[0] != token_ids.numel():
            raise ValueError(f"{weight.shape[0]} head rows for {token_ids.numel()} token ids")
        self.weight = torch.nn.Parameter(weight)  # [N, H]
        self.register_buffer("token_ids", token_ids.long())  # [N], sorted ascending
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V]."""
        kernel_only = () if self.blocks is None else (None, self.blocks)  # bias, blocks: small_gemm.linear's
        subset = self.project(hidden, self.weight, *kernel_only)  # [..., N]
        full = subset.new_full((*subset.shape[:-1], self.vocab_size), EXCLUDED_LOGIT)
        return full.index_copy(-1, self.token_ids, subset)
