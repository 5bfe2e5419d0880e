"""bench.divergence's comparison of two greedy outputs."""

from bench.divergence import first_difference


def test_first_difference_finds_the_first_parting_token_or_none():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
