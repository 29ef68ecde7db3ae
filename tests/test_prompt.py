"""Origins: L distinct token ids from the first 5,000, reproducible from the seed alone."""

from __future__ import annotations

import pytest
import torch

from tpv.errors import InvalidInput
from tpv.prompt import ORIGIN_VOCAB, origin_token_ids


@pytest.mark.parametrize("length", [1, 10, 100, 1000, ORIGIN_VOCAB])
def test_origin_ids_are_distinct_and_in_the_first_5000(length):
    for seed in range(5):
        ids = origin_token_ids(length, seed, vocab_size=49_152)
        assert ids.shape == (length,)
        assert len(set(ids.tolist())) == length
        assert int(ids.min()) >= 0 and int(ids.max()) < ORIGIN_VOCAB


def test_origin_ids_are_reproducible_and_differ_across_seeds():
    assert torch.equal(origin_token_ids(50, 7, 49_152), origin_token_ids(50, 7, 49_152))
    assert not torch.equal(origin_token_ids(50, 7, 49_152), origin_token_ids(50, 8, 49_152))
    # a seeded permutation: a longer origin of the same seed starts with the shorter one's ids
    assert torch.equal(origin_token_ids(100, 3, 49_152)[:10], origin_token_ids(10, 3, 49_152))


def test_small_vocabularies_and_impossible_lengths():
    ids = origin_token_ids(300, 0, vocab_size=300)  # a tiny model: the whole vocabulary, each id once
    assert sorted(ids.tolist()) == list(range(300))
    with pytest.raises(InvalidInput, match="distinct"):
        origin_token_ids(301, 0, vocab_size=300)
    with pytest.raises(InvalidInput):
        origin_token_ids(0, 0, vocab_size=300)
