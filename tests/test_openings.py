"""veiltrain.openings: when a kept opening may serve a later product, and when it may not."""

from __future__ import annotations

import gc

import torch

from veiltrain import openings


def _opened(share: torch.Tensor) -> None:
    mask = torch.arange(share.numel()).reshape(share.shape)
    openings.keep(share, mask, share - mask, openings.new_handle(share))


def test_a_kept_opening_serves_the_same_unchanged_share() -> None:
    openings.begin()
    share = torch.arange(6, dtype=torch.int64)
    _opened(share)
    kept = openings.recall(share)
    assert kept is not None and torch.equal(kept.opened + kept.mask, share)
    assert openings.recall(share.clone()) is None  # another tensor, even with the same words


def test_a_share_written_since_its_opening_is_opened_afresh() -> None:
    openings.begin()
    share = torch.arange(6, dtype=torch.int64)
    _opened(share)
    share.add_(1)  # an in-place write: x changed, so x - a would be stale
    assert openings.recall(share) is None
    other = torch.arange(6, dtype=torch.int64)
    _opened(other)
    other[:2].zero_()  # a write through a view counts too (torch's shared version counter)
    assert openings.recall(other) is None


def test_openings_of_an_earlier_session_are_not_used() -> None:
    openings.begin()
    share = torch.arange(6, dtype=torch.int64)
    _opened(share)
    openings.begin()  # a new dealer never held that mask
    assert openings.recall(share) is None


def test_the_dealer_may_drop_a_mask_once_its_share_is_gone() -> None:
    openings.begin()
    share = torch.arange(6, dtype=torch.int64)
    handle = openings.new_handle(share)
    assert openings.released() == []
    del share
    gc.collect()
    assert openings.released() == [handle]
    assert openings.released() == []  # each handle is released once


def test_a_share_opened_again_after_a_write_releases_its_earlier_mask() -> None:
    # A parameter is opened every step and written by every update: its earlier masks must go
    # at once, or the dealer would keep one mask per parameter per step.
    openings.begin()
    share = torch.arange(6, dtype=torch.int64)
    first = openings.new_handle(share)
    share.add_(1)
    second = openings.new_handle(share)
    assert openings.released() == [first]
    del share
    gc.collect()
    assert openings.released() == [second]
