"""Where pieces run, and the overlapped F&B action: one micro-batch's forward paired with
another's backward so that the expert all-to-all of each hides behind the other's computation
(DeepSeek-V3 report, 3.2.1 and Fig. 4).

Each half is a `Chain`: the pieces it will run, in order, and an iterator that runs one per
step. A MoE layer's forward is attention, dispatch, experts, combine (dispatch and combine hold
the all-to-alls); its backward runs them in reverse. `plan_slots` pairs the two lists into
*slots*: a slot holds one computing piece of one half and one communicating piece of the other,
as many slots as possible keeping each half's order (a longest common subsequence in which a
computing piece matches a communicating one); a piece left unpaired runs alone, the backward's
before the forward's, ahead of the next pair. Two stages of MoE layers pair fully:

    attention (F) | combine   (B)      the forward's attention under the backward's combine all-to-all
    dispatch  (F) | experts   (B)      the forward's dispatch under the backward's expert GEMMs
    experts   (F) | dispatch  (B)      the forward's experts (routed and shared) under the backward's dispatch
    combine   (F) | attention (B)      the forward's combine under the backward's attention

`Streams` runs a slot. On CUDA the communicating piece runs on a second stream: that stream
first waits for everything issued on the current stream before the slot (its inputs), the
computing piece is issued on the current stream, then the communicating one on the second, and
at the end of the slot the current stream waits for the second. A piece's backward runs on the
stream its forward ran on (autograd's rule), so communicating pieces run on the second stream
also outside a pair, forward and backward. Tensors read across streams are marked
(`pieces.mark_use`). On CPU a slot runs its computing piece, then its communicating piece. Each
half runs its own pieces in its own order, so the numbers are those of the forward followed by
the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megads.model.block import Piece


class Streams:
    """A second CUDA stream for communicating pieces; on other devices everything runs in order."""

    def __init__(self, device: torch.device):
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(self, compute: Callable[[], None] | None, communicate: Callable[[], None] | None) -> None:
        """One slot: a computing step and a communicating step (either may be None) at once."""
        if self.side is None:
            for step in (compute, communicate):
                if step is not None:
                    step()
            return
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)                 # the communicating piece's inputs are ready
        if compute is not None:
            compute()
        if communicate is not None:
            with torch.cuda.stream(self.side):
                communicate()
        main.wait_stream(self.side)


@dataclass
class Chain:
    """One half of an action: the pieces it runs, in order, and the iterator that runs them,
    one per step; exhausting it afterwards runs the half's closing bookkeeping."""
    pieces: list[Piece]
    steps: Iterator[None]

    def step(self) -> None:
        next(self.steps)

    def finish(self) -> None:
        if next(self.steps, StopIteration) is not StopIteration:
            raise RuntimeError("a pipeline half ran more pieces than it announced")


def _alone(streams: Streams, chain: Chain, piece: Piece) -> None:
    streams.run(*((None, chain.step) if piece.communicates else (chain.step, None)))


def run_all(chain: Chain, streams: Streams) -> None:
    """Run one half alone, each piece on its stream."""
    for piece in chain.pieces:
        _alone(streams, chain, piece)
    chain.finish()


def plan_slots(forward: list[Piece], backward: list[Piece]) -> list[tuple[int | None, int | None]]:
    """Slots as (forward piece index, backward piece index), None where a half sits out: the most
    pairs of a computing and a communicating piece that keep both orders; unpaired pieces run
    alone, the backward's first, before the next pair."""
    n, m = len(forward), len(backward)
    best = [[0] * (m + 1) for _ in range(n + 1)]          # best[i][j]: most pairs in forward[i:], backward[j:]
    for i in reversed(range(n)):
        for j in reversed(range(m)):
            pair = best[i + 1][j + 1] + 1 if forward[i].communicates != backward[j].communicates else 0
            best[i][j] = max(pair, best[i + 1][j], best[i][j + 1])
    slots, i, j = [], 0, 0
    while i < n or j < m:
        if i < n and j < m and forward[i].communicates != backward[j].communicates \
                and best[i][j] == best[i + 1][j + 1] + 1:
            slots.append((i, j))
            i, j = i + 1, j + 1
        elif j < m and best[i][j] == best[i][j + 1]:
            slots.append((None, j))
            j += 1
        else:
            slots.append((i, None))
            i += 1
    return slots


def overlapped_forward_backward(forward: Chain, backward: Chain, streams: Streams) -> list[tuple[str | None, str | None]]:
    """Run a forward and a backward in the slots of `plan_slots`; returns the slots as (forward
    piece, backward piece) names, None where a half sat out."""
    slots = plan_slots(forward.pieces, backward.pieces)
    for i, j in slots:
        if i is None:
            _alone(streams, backward, backward.pieces[j])
        elif j is None:
            _alone(streams, forward, forward.pieces[i])
        elif backward.pieces[j].communicates:
            streams.run(forward.step, backward.step)
        else:
            streams.run(backward.step, forward.step)
    forward.finish()
    backward.finish()
    return [(None if i is None else forward.pieces[i].name, None if j is None else backward.pieces[j].name)
            for i, j in slots]
