"""The overlapped F&B action: one micro-batch's forward interleaved with another's backward.

Both halves arrive as iterators that run one piece of the stage per step (a layer's attention,
its MLP / MoE with the expert dispatch and combine, the embedding, the head): the pair runs a
backward piece, then a forward piece, and so on, so that on a GPU the all-to-all of one piece
can proceed while the other micro-batch computes. On CPU the pieces run in that order, one at
a time; the numbers are those of the forward followed by the backward.
"""
from __future__ import annotations

from typing import Iterator


def run_all(pieces: Iterator[None]) -> None:
    for _ in pieces:
        pass


def overlapped_forward_backward(forward: Iterator[None], backward: Iterator[None]) -> None:
    """Alternate the backward's and the forward's pieces until both are done."""
    live = [backward, forward]
    while live:
        for it in list(live):
            if next(it, StopIteration) is StopIteration:
                live.remove(it)
