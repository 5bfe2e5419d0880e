"""The distillation losses on tiny tensors (zero at a match, the hand-computed values, each one pulling a
drafter towards the target, mismatch weights) and a worker's training step reducing each of them."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_world import make_worker, tiny_llama
from trainer_world import world  # noqa: F401 - a fixture

from specdec.models.checkpoints import CheckpointStore
from trainer.losses import (
    LOSSES,
    forward_kl,
    jensen_shannon,
    mismatch_weights,
    reverse_kl,
    total_variation,
    weighted_mean,
)


def _distribution_logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_losses_vanish_when_the_drafter_matches_the_target():
    q = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    logits = q.log()
    full_ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    full_probs = q.gather(-1, full_ids)
    partial_ids = torch.tensor([[1, 0], [3, -1]])  # top-2, and a padded top-1
    partial_probs = torch.tensor([[0.3, 0.5], [0.4, 0.0]])
    for loss in LOSSES.values():
        torch.testing.assert_close(loss(logits, full_ids, full_probs), torch.zeros(2), atol=1e-5, rtol=0)
        # Coarsened to recorded tokens + "other": still zero when the drafter matches.
        torch.testing.assert_close(loss(logits, partial_ids, partial_probs), torch.zeros(2), atol=1e-5, rtol=0)
        assert float(loss(logits.flip(-1), full_ids, full_probs).min()) > 1e-3  # and only then


def test_losses_match_hand_computation():
    logits = _distribution_logits([[0.5, 0.3, 0.2]])
    ids, probs = torch.tensor([[0]]), torch.tensor([[0.7]])
    # Buckets: target p = (0.7, other 0.3), drafter q = (0.5, other 0.5).
    p, q = (0.7, 0.3), (0.5, 0.5)
    m = tuple(0.5 * (a + b) for a, b in zip(p, q))
    expected = {
        "tvd": 0.5 * (abs(0.7 - 0.5) + abs(0.3 - 0.5)),
        "fkl": sum(a * math.log(a / b) for a, b in zip(p, q)),
        "rkl": sum(b * math.log(b / a) for a, b in zip(p, q)),
        "jsd": 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m)),
    }
    got = {"tvd": total_variation, "fkl": forward_kl, "rkl": reverse_kl, "jsd": jensen_shannon}
    for name, value in expected.items():
        assert float(got[name](logits, ids, probs)[0]) == pytest.approx(value, abs=1e-5), name
    # float16 rounding can push a top-k above 1: it is renormalised, never a negative "other" mass.
    over = total_variation(_distribution_logits([[0.5, 0.5]]), torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.6]]))
    assert float(over[0]) == pytest.approx(0.0, abs=1e-5)
    # Reverse KL stays finite when the target leaves no "other" mass.
    assert math.isfinite(float(reverse_kl(logits, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))[0]))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_pulls_the_drafter_towards_the_target(name):
    torch.manual_seed(0)
    logits = torch.randn(6, 20, requires_grad=True)  # [N, V]
    top_ids = torch.stack([torch.randperm(20)[:4] for _ in range(6)])  # [N, K]
    top_probs = torch.softmax(torch.randn(6, 5), -1)[:, :4]  # leaves some mass for "other"
    optimizer = torch.optim.Adam([logits], lr=0.1)
    values = []
    for _ in range(100):
        value = LOSSES[name](logits, top_ids, top_probs).mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(float(value.detach()))
    assert values[-1] < 0.02 * values[0], values[::20]
    # Whichever divergence was minimised, the coarsened distributions now agree.
    assert float(total_variation(logits.detach(), top_ids, top_probs).mean()) < 0.02


def test_mismatch_weights_and_weighted_mean():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    ids = torch.tensor([[0, 1], [2, 1]])
    probs = torch.tensor([[0.6, 0.2], [0.5, 0.3]])  # target argmax: token 0, then token 2
    torch.testing.assert_close(mismatch_weights(logits, ids, probs, boost=2.0), torch.tensor([1.0, 3.0]))
    assert float(weighted_mean(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 3.0]))) == pytest.approx(13 / 4)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_worker_step_with_each_loss_reduces_it(name, world, tmp_path, redis_client):
    worker = make_worker(tiny_llama(seed=11), CheckpointStore(tmp_path / "ck"), redis_client, loss=name, lr=3e-3)
    batch = world.train[:24]
    losses = [worker.strategy.train_on(batch)[0] for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses
