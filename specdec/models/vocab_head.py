"""A drafter LM head over part of the vocabulary (FR-Spec style).

On the bundled 135M target a 4-layer drafter spends more than half of each
step in its 49152 x 576 LM head. Drafting only among the most frequent
tokens cuts that cost in proportion; a token outside the subset can never be
proposed, which costs acceptance only where the target picks it.

The head still returns logits over the whole vocabulary, with EXCLUDED_LOGIT
outside the subset, so every consumer (drafting, sampling, the trainer's
losses, the gate, HF assisted generation) works unchanged and speculative
sampling stays exact: excluded tokens have draft probability 0.

A drafter with a subset head records its size in its config
(`draft_head_vocab`); `build_causal_lm` rebuilds the module before the
weights (including the token ids) are loaded.
"""

from __future__ import annotations

from collections import Counter

import torch

from specdec.compute.subset_head import EXCLUDED_LOGIT, SubsetLMHead

CONFIG_KEY = "draft_head_vocab"


def head_token_ids(model: torch.nn.Module) -> torch.Tensor | None:
    """The token ids a subset head can propose, None for a full head."""
    head = model.get_output_embeddings()
    return head.token_ids if isinstance(head, SubsetLMHead) else None


def install_subset_head(model: torch.nn.Module, token_ids: torch.Tensor) -> torch.nn.Module:
    """Replaces `model`'s full LM head by its rows `token_ids` (unties it from the input embeddings)."""
    head = model.get_output_embeddings()
    if isinstance(head, SubsetLMHead):
        raise ValueError("the model already has a subset head")
    vocab_size = int(model.config.vocab_size)
    token_ids = torch.unique(token_ids.long().cpu())  # sorted, no repeats
    if token_ids.numel() == 0 or int(token_ids[0]) < 0 or int(token_ids[-1]) >= vocab_size:
        raise ValueError(f"head token ids must be a non-empty subset of [0, {vocab_size})")
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported")
    weight = head.weight.detach()[token_ids.to(head.weight.device)].clone()
    model.config.tie_word_embeddings = False
    setattr(model.config, CONFIG_KEY, int(token_ids.numel()))
    model.set_output_embeddings(SubsetLMHead(weight, token_ids.to(head.weight.device), vocab_size))
    return model


def build_causal_lm(config) -> torch.nn.Module:
    """AutoModelForCausalLM.from_config, with a placeholder subset head and feature fuse when the
    config asks for them (their weights and token ids come from the checkpoint)."""
    from transformers import AutoModelForCausalLM

    from specdec.models.eagle import add_fuse, is_feature_drafter

    model = AutoModelForCausalLM.from_config(config)
    size = int(getattr(config, CONFIG_KEY, 0) or 0)
    if size:
        install_subset_head(model, torch.arange(size))
    if is_feature_drafter(config):
        add_fuse(model)
    return model


def rank_tokens(counts: Counter, vocab_size: int, size: int) -> torch.Tensor:
    """The `size` most frequent ids, topped up in id order (byte-level BPE ids follow merge order,
    so low ids are the tokenizer corpus's frequent ones) -> sorted LongTensor [size]."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"head vocabulary size must be in 1..{vocab_size}, got {size}")
    chosen = [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
              if 0 <= token < vocab_size][:size]
    taken = set(chosen)
    for token in range(vocab_size):
        if len(chosen) >= size:
            break
        if token not in taken:
            chosen.append(token)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def drop_excluded(top_ids: torch.Tensor, token_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """top_ids [S, K] with ids a subset head cannot propose replaced by -1 (padding), so the
    trainer's losses fold their target mass into the "other" bucket instead of chasing
    a logit that is a constant."""
    if token_ids is None:
        return top_ids
    allowed = torch.zeros(vocab_size + 1, dtype=torch.bool, device=top_ids.device)  # last slot: padding -1
    allowed[token_ids.to(top_ids.device)] = True
    return torch.where(allowed[top_ids], top_ids, torch.full_like(top_ids, -1))
