"""A pipeline stage as a chain of pieces, run forward and backward one piece at a time.

A piece (`megads.model.block.Piece`) maps the previous piece's output to its own: a tensor, or
a dataclass of tensors and plain values such as the MoE layer's `Dispatched` (the dispatched
token copies, the routing metadata, the gate weights, the balance loss, the residual). Forward
cuts the autograd graph after every piece: each floating tensor of the output that needs a
gradient and is not a leaf is replaced by a detached leaf (`detach().requires_grad_()`), so the
next piece starts from leaves. Tensors handed on unchanged (the residual, the gate weights past
the experts) are already leaves and stay the same object, so their gradient collects there from
every piece that uses them. Backward then runs a piece at a time, last first: the piece's
outputs, as computed, are differentiated with the gradients their leaves collected from the later
pieces; the numbers are those of one uncut backward.

On CUDA every piece marks the tensors it reads, its input and the gradients handed to its
backward, as used by the stream it runs on (`Tensor.record_stream`), so that memory made on one
stream and last read on another is not reused before that read is done.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megads.model.block import Piece


@dataclass
class Cut:
    piece: Piece
    roots: list[torch.Tensor]       # the piece's outputs as computed (the graph hangs on them)
    leaves: list[torch.Tensor]      # their detached stand-ins, which the later pieces used


def tensors(state: object) -> list[torch.Tensor]:
    """The tensors of a piece's input or output: itself, or the fields of a dataclass and the
    tensors in tuple fields (e.g. the expert-parallel plan)."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for item in state for t in tensors(item)]
    if dataclasses.is_dataclass(state):
        return tensors([getattr(state, f.name) for f in dataclasses.fields(state)])
    return []


def mark_use(ts: list[torch.Tensor | None]) -> None:
    """Tell the CUDA allocator that the current stream reads these tensors."""
    for t in ts:
        if t is not None and t.is_cuda:
            t.record_stream(torch.cuda.current_stream(t.device))


def _needs_cut(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and not t.is_leaf and t.is_floating_point()


def cut(out: object) -> tuple[object, list[torch.Tensor], list[torch.Tensor]]:
    """-> (the output with each non-leaf tensor that needs a gradient replaced by a detached leaf,
    those tensors, their leaves). A tensor or a dataclass; anything else (the head's losses) is
    not cut."""
    if _needs_cut(out):
        leaf = out.detach().requires_grad_()
        return leaf, [out], [leaf]
    if not dataclasses.is_dataclass(out) or isinstance(out, type):
        return out, [], []
    changes = {f.name: getattr(out, f.name) for f in dataclasses.fields(out) if _needs_cut(getattr(out, f.name))}
    leaves = {name: t.detach().requires_grad_() for name, t in changes.items()}
    return dataclasses.replace(out, **leaves), list(changes.values()), list(leaves.values())


def under_autocast(pieces: list[Piece], autocast: Callable[[], contextlib.AbstractContextManager]) -> list[Piece]:
    """The pieces with each one's function run inside `autocast()` (a piece may run on another
    stream or interleaved with another micro-batch's, so each enters the context itself)."""
    def wrap(fn: Callable) -> Callable:
        def run(state):
            with autocast():
                return fn(state)
        return run
    return [p._replace(fn=wrap(p.fn)) for p in pieces]


def forward_steps(pieces: list[Piece], state: object, cuts: list[Cut], result: list) -> Iterator[None]:
    """Run the pieces on `state`, yielding after each. The cuts are appended to `cuts`; the last
    output is appended to `result` once the iterator is exhausted."""
    for piece in pieces:
        mark_use(tensors(state))
        out = piece.fn(state)
        if torch.is_grad_enabled():
            out, roots, leaves = cut(out)
            cuts.append(Cut(piece, roots, leaves))
        state = out
        yield
    result.append(state)


def backward_steps(cuts: list[Cut], output_grad: torch.Tensor | None,
                   around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Iterator[None]:
    """Backward through `cuts` (emptied as it goes), last piece first, yielding after each. The
    last piece's outputs get `output_grad` (None: they are the loss); the others get what their
    leaves collected. `around` wraps each piece's backward."""
    last = True
    while cuts:
        c = cuts.pop()
        if last:
            roots, grads = c.roots, [output_grad] * len(c.roots)
        else:
            pairs = [(r, leaf.grad) for r, leaf in zip(c.roots, c.leaves) if leaf.grad is not None]
            roots, grads = [r for r, _ in pairs], [g for _, g in pairs]
        last = False
        mark_use(grads)
        if roots:
            with around():
                torch.autograd.backward(roots, grads)
        yield
