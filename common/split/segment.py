"""A model part as a range of blocks: `Segment(start, end, embeds, head)` of one family's model.

Today's client part is `Segment(0, K, embeds=True)` and the server part `Segment(K, L, head=True)`; a
label-private (U-shaped) client holds two segments, `Segment(0, K, embeds=True)` and `Segment(L-J, L, head=True)`;
a client with its own split point is another `start`. A segment is built with only its own weights
(`common.split.loading`) and run by `common.split.parts.SplitPart`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

Side = Literal["client", "server"]


class SplitError(ValueError):
    """The requested split cannot be built; the message says why."""


@dataclass(frozen=True)
class Segment:
    """Blocks [start, end), preceded by the token embeddings when `embeds`, followed by the final norm and LM
    head when `head`."""

    start: int
    end: int
    embeds: bool = False
    head: bool = False

    @classmethod
    def of_side(cls, side: Side, split_layer: int, num_layers: int) -> "Segment":
        """The client part (`[0, K)` with embeddings) or the server part (`[K, L)` with the head) of a split."""
        check_split_layer(split_layer, num_layers)
        if side == "client":
            return cls(0, split_layer, embeds=True)
        if side == "server":
            return cls(split_layer, num_layers, head=True)
        raise SplitError(f"side {side!r} is not 'client' or 'server'")

    def check(self, num_layers: int) -> None:
        """Refuse a segment outside the model's blocks, an empty one, or embeddings not at block 0."""
        if not 0 <= self.start < self.end <= num_layers:
            raise SplitError(f"segment blocks [{self.start}, {self.end}) are not a non-empty range inside "
                             f"[0, {num_layers}): the model has {num_layers} blocks")
        if self.embeds and self.start != 0:
            raise SplitError(f"a segment with the embeddings must start at block 0, not {self.start}")
        if self.head and self.end != num_layers:
            raise SplitError(f"a segment with the head must end at block {num_layers}, not {self.end}")

    @property
    def layers(self) -> range:
        """Indices of the blocks this segment runs."""
        return range(self.start, self.end)


def check_split_layer(split_layer: int, num_layers: int) -> None:
    """Refuse split layers outside [1, L-1]."""
    if not 1 <= split_layer <= num_layers - 1:
        raise SplitError(f"split layer {split_layer} is outside [1, {num_layers - 1}]: the model has {num_layers} "
                         "blocks and each side needs at least one")


def as_segment(part: Union[Side, Segment], split_layer: int | None, num_layers: int) -> Segment:
    """`part` itself when it is a Segment, else the segment of that side at `split_layer` (checked)."""
    segment = part if isinstance(part, Segment) else Segment.of_side(part, int(split_layer or 0), num_layers)
    segment.check(num_layers)
    return segment
