"""Openings kept with the share they masked, so that one opening serves every product of a value.

A Beaver product of x and y opens x - a and y - b. A layer's input enters its forward product
and, saved for backward, its kernel gradient; BatchNorm's centred values enter four products, the
incoming gradient two. CrypTen opens such a value afresh with a new mask each time. Here the first
opening is kept on the share (this party's share of a and the opened x - a) and later products of
the same share take it, with a triple the dealer builds on the same mask a (which it keeps under a
handle that party 0 names) and a fresh mask for the other operand.

Why it is safe: a mask is opened once, masking one value, and never again: a later product
opens only its other operand's fresh mask. What a party sees is the same x - a it saw before,
and shares of c = op(a, b') masked by the dealer's fresh draws. A record is used only while the
share is the very tensor that was opened and unchanged since (torch's version counter counts
in-place writes); otherwise the value is opened afresh, as before. Both parties run the same
code on the same tensors, so they reach the same decision without a word about it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from veiltrain import chains, protocol

_ATTRIBUTE = "_veiltrain_opening"
_BOX = "_veiltrain_mask_handle"


class Ledger:
    """One session's handles for the masks the dealer keeps, and the ones it may forget."""

    def __init__(self) -> None:
        self._next = 0
        self._gone: list[int] = []

    def handle(self, share: torch.Tensor) -> int:
        """A new handle for the mask of `share`, released once `share` is collected or opened
        again (a parameter is opened once a step, written by each update)."""
        handle = self._next
        self._next += 1
        box: _Box | None = getattr(share, _BOX, None)
        if box is None or box.ledger is not self:
            box = _Box(self, handle)
            setattr(share, _BOX, box)
            weakref.finalize(share, box.release)  # once per share, whatever its handle then
        else:
            # A share asks for a new handle only when its kept opening is stale: the share was
            # written since, and versions only grow, so the old mask is never named again.
            self._gone.append(box.handle)
            box.handle = handle
        return handle

    def released(self) -> list[int]:
        """Handles whose shares are gone since the last call: the dealer drops their masks."""
        gone, self._gone = self._gone, []
        return gone


class _Box:
    """The handle a share's mask has now, for the share's finalizer (which cannot read it)."""

    def __init__(self, ledger: Ledger, handle: int) -> None:
        self.ledger, self.handle = ledger, handle

    def release(self) -> None:
        self.ledger._gone.append(self.handle)  # the list of the moment: `released` swaps it


@dataclass(frozen=True)
class Opening:
    """This party's share of the mask, the opened share - mask, and the dealer's handle."""

    session: Ledger
    version: int
    mask: torch.Tensor
    opened: torch.Tensor
    handle: int


_ledger = Ledger()  # `begin` starts each session's own


def begin() -> None:
    """A new session: openings kept before it are not used (its dealer never held the masks)."""
    global _ledger  # noqa: PLW0603 - one session at a time per party process
    _ledger = Ledger()


def recall(share: torch.Tensor) -> Opening | None:
    """The opening kept on `share`, if it was made in this session and the share has not been
    written since."""
    opening: Opening | None = getattr(share, _ATTRIBUTE, None)
    if opening is None or opening.session is not _ledger or opening.version != share._version:
        return None
    return opening


def keep(share: torch.Tensor, mask: torch.Tensor, opened: torch.Tensor, handle: int) -> None:
    """Record the opening of `share` under the dealer's `handle`."""
    setattr(share, _ATTRIBUTE, Opening(_ledger, share._version, mask, opened, handle))


def new_handle(share: torch.Tensor) -> int:
    """The handle party 0 gives the dealer for a fresh mask of `share`."""
    return _ledger.handle(share)


def released() -> list[int]:
    """Handles the dealer may drop: their shares are gone."""
    return _ledger.released()


Spec = tuple[str, int]
"""An operand's mask in a dealer request: ("new", handle) drawn now and kept, ("old", handle)."""


def product_parts(
    op: str, x: torch.Tensor, y: torch.Tensor, rank: int, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, protocol.Pending]:
    """This party's masks a and b, the openings x - a and y - b, and its pending share of
    c = op(a, b), for the shares x and y: only operands without a kept opening are opened (in
    one exchange), and x op x opens x once."""
    kept_x = recall(x)
    kept_y = kept_x if y is x else recall(y)
    x_spec = _spec(x, kept_x, rank)
    # x op x: y names the mask x's spec names, drawn (if new) for x alone.
    y_spec = ("old", x_spec[1]) if y is x else _spec(y, kept_y, rank)
    specs = (x_spec, y_spec)
    a, b, pending = protocol.kept_parts(x.shape, y.shape, specs, released(), op, *args, **kwargs)
    pairs = [(share, mask) for share, mask in ((x, a), (y, b)) if mask is not None]
    opened = chains.open_masked(pairs, binary=False) if pairs else []
    a, epsilon = _taken(x, kept_x, a, opened, x_spec[1])
    if y is x:
        return a, a, epsilon, epsilon, pending
    b, delta = _taken(y, kept_y, b, opened, y_spec[1])
    return a, b, epsilon, delta, pending


def _spec(share: torch.Tensor, kept: Opening | None, rank: int) -> Spec:
    if kept is not None:
        return ("old", kept.handle)
    # Only party 0 talks to the dealer; the other party's handles are never sent.
    return ("new", new_handle(share) if rank == 0 else -1)


def _taken(
    share: torch.Tensor,
    kept: Opening | None,
    mask: torch.Tensor | None,
    opened: list[torch.Tensor],
    handle: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, opening) of one operand: the kept ones, or the next fresh opening, now kept."""
    if kept is not None:
        return kept.mask, kept.opened
    if mask is None:
        raise RuntimeError("an operand with neither a kept opening nor a fresh mask")
    value = opened.pop(0)
    keep(share, mask, value, handle)
    return mask, value
