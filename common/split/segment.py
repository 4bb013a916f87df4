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
        """Refuse a segment outside the model's blocks, an empty one (except the head alone), or embeddings not at
        block 0."""
        head_only = self.head and self.start == self.end == num_layers  # a u-shape client top with J = 0
        if not (0 <= self.start < self.end <= num_layers or head_only):
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


def u_shape_segments(split_layer: int, top_blocks: int, num_layers: int) -> tuple[Segment, Segment, Segment]:
    """The three parts of a label-private (U-shaped) split: the client's bottom `[0, K)` with the embeddings, the
    server's middle `[K, L-J)` and the client's top `[L-J, L)` with the final norm and head (J may be 0)."""
    check_split_layer(split_layer, num_layers)
    if not 0 <= top_blocks <= num_layers - split_layer - 1:
        raise SplitError(f"top blocks J={top_blocks} must be in [0, {num_layers - split_layer - 1}]: with split "
                         f"layer {split_layer} of {num_layers} blocks the server needs at least one block")
    top = num_layers - top_blocks
    return Segment(0, split_layer, embeds=True), Segment(split_layer, top), Segment(top, num_layers, head=True)


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
