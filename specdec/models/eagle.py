"""Feature-level drafting (EAGLE, Li et al. 2024).

A token-level drafter must re-derive, from tokens alone, what the target
already knows. An EAGLE drafter reads the target's own last hidden state
instead: row j of its one-layer decoder gets

    fuse(concat(embed(t[j+1]), f[j]))

where f[j] is the target's feature at position j (the vector its LM head turns
into the distribution of t[j+1]) and t[j+1] the token that was then chosen.
Its output is a prediction of f[j+1]; the target's own LM head (or a subset of
it) turns that into the draft of t[j+2]. Past the last verified token the
drafter feeds its own predicted features back in, one row per draft token.

The drafter is an ordinary HF causal LM with one decoder layer, driven through
`inputs_embeds`, plus a `feature_fuse` linear; its config carries
FEATURE_DRAFTER_KEY so loaders rebuild the fuse before the weights are read.
KV caches, cropping, the small-batch kernel and checkpoints all work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from specdec.models.accept_head import lm_head_inputs

FEATURE_DRAFTER_KEY = "feature_drafter"
FUSE_ATTR = "feature_fuse"


def is_feature_drafter(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, FEATURE_DRAFTER_KEY, 0))


def add_fuse(model: nn.Module) -> nn.Module:
    """Gives `model` its fuse layer (2H -> H): input embedding and feature side by side."""
    hidden = int(model.config.hidden_size)
    setattr(model, FUSE_ATTR, nn.Linear(2 * hidden, hidden, bias=True))
    setattr(model.config, FEATURE_DRAFTER_KEY, 1)
    return model


def fused_inputs(drafter: nn.Module, next_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """next_ids [B, T] (t[j+1]), features [B, T, H] (f[j]) -> decoder inputs [B, T, H]."""
    embeds = drafter.get_input_embeddings()(next_ids)  # [B, T, H]
    fuse = getattr(drafter, FUSE_ATTR)
    return fuse(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))


def feed_rows(drafter: nn.Module, cache, next_ids: torch.Tensor, features: torch.Tensor,
              keep_logits: int = 0) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Appends rows to a drafter KV cache.

    next_ids [T], features [T, H] -> (logits [T or keep_logits, V], predicted features [T, H], cache).
    Logits row i is the draft distribution of the token after next_ids[i].
    """
    inputs = fused_inputs(drafter, next_ids.unsqueeze(0), features.unsqueeze(0))  # [1, T, H]
    extra = {"logits_to_keep": keep_logits} if keep_logits else {}
    out = drafter(inputs_embeds=inputs, past_key_values=cache, use_cache=True, output_hidden_states=True, **extra)
    return out.logits[0], lm_head_inputs(out)[0], out.past_key_values


def greedy_drafts(drafter: nn.Module, cache, logits: torch.Tensor,
                  predicted: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy drafts past the verified text, where the drafter reads its own predicted features.

    logits [n, V] and predicted [n, H] are the last `feed_rows` output; yields (token [], its draft
    logits [V]) without end. Each token after the first feeds one row to `cache` (a DynamicCache,
    grown in place), only when the caller asks for it.
    """
    while True:
        token = logits[-1].argmax()
        yield token, logits[-1]
        logits, predicted, cache = feed_rows(drafter, cache, token.view(1), predicted[-1:])
