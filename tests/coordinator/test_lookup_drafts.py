"""Prompt lookup: the incremental n-gram index against the reference scan, and the coordinator's lookup blocks."""

import random

import pytest

from coordinator.lookup_drafts import LOOKUP_VERSION, LookupDrafts
from specdec.lookup import NgramIndex, lookup_continuation


@pytest.mark.parametrize("ngram", [(1, 1), (2, 2), (3, 2), (4, 1)])
def test_index_proposes_what_the_reference_scan_finds_as_the_text_grows(ngram):
    ngram_max, ngram_min = ngram
    rng = random.Random(sum(ngram))
    for _ in range(20):
        text = [rng.randrange(6) for _ in range(rng.randrange(1, 80))]  # a small alphabet: many repeats
        index = NgramIndex(ngram_max, ngram_min)
        for end in range(1, len(text) + 1):
            index.extend(text[len(index.ids):end])
            first = lookup_continuation(text[:end], ngram_max, ngram_min)
            proposal = index.propose(8)
            assert (proposal[0] if proposal else None) == first, (text[:end], proposal)


def test_a_proposal_copies_the_span_after_the_latest_match_and_stops_at_the_text_end():
    index = NgramIndex(3, 2)
    index.extend([7, 1, 2, 3, 4, 5, 6, 9, 1, 2, 3])
    assert index.propose(3) == [4, 5, 6]
    assert index.propose(32) == [4, 5, 6, 9, 1, 2, 3]   # up to where the text ends
    index.extend([8, 8])
    assert index.propose(4) == []                        # "8 8" never occurred before
    with pytest.raises(ValueError):
        NgramIndex(1, 2)


def test_lookup_blocks_are_certain_drafts_with_one_hot_probabilities_when_sampled():
    committed = [5, 6, 7, 8, 1, 5, 6]
    greedy = LookupDrafts(max_tokens=2, greedy=True)
    assert greedy.propose(committed, budget=10) == [7, 8]
    assert greedy.propose(committed, budget=1) == [7]
    assert greedy.propose(committed, budget=0) == []
    block = greedy.block([7, 8])
    assert [t.token for t in block] == [7, 8] and all(t.drafter_version == LOOKUP_VERSION for t in block)
    assert not block[0].HasField("probs")
    sampled = LookupDrafts(max_tokens=4, greedy=False).block([7])
    assert list(sampled[0].probs.indices) == [7] and list(sampled[0].probs.probs) == [1.0]
