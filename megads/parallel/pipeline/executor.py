"""One executor for every schedule: runs this pipeline rank's action list for one step.

Each chunk is a stage of the model (`StageSpec`) held by this rank's pruned `DeepSeekV3`. A
forward takes the stage input (token ids on the first stage, else a received or locally handed
over activation, made a leaf so its gradient can be sent back), runs the stage piece by piece
(`stage_pieces`, `pieces.forward_steps`; backward runs the pieces in reverse), and on the last
stage computes the LM and MTP losses for the micro-batch. An FB action interleaves the pieces of
its two halves (`overlap.overlapped_forward_backward`). The loss of micro-batch m is
divided by the number of micro-batches and the balance loss is scaled the same way, so that the
step's gradients are those of the non-pipelined step. B defers the weight-gradient GEMMs of the
plain Linear layers into the `WeightGradStore` under its (chunk, micro-batch); W runs them.
After the last action the gradients (and expert loads) of mirrored parameters are summed over
the ranks holding them, and the step's loss statistics are summed over the pipeline.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megads.model.block import Piece
from megads.model.deepseek_v3 import DeepSeekV3
from megads.model.moe import MoE, balance_loss_scale
from megads.parallel.pipeline.overlap import Chain, Streams, overlapped_forward_backward, run_all
from megads.parallel.pipeline.p2p import P2P
from megads.parallel.pipeline.pieces import Cut, backward_steps, forward_steps, mark_use, under_autocast
from megads.parallel.pipeline.placement import StageSpec
from megads.parallel.pipeline.schedules import Action, Schedule
from megads.parallel.pipeline.zero_bubble import WeightGradStore


@dataclass
class MirrorSet:
    """Parameters and MoE layers this rank shares with the same other pipeline ranks."""
    group: object
    params: list
    moes: list


@dataclass
class _StepState:
    micro_batches: list[torch.Tensor]
    mtp_weight: float
    inputs: dict = field(default_factory=dict)        # (chunk, mb) -> stage input leaf
    outputs: dict = field(default_factory=dict)       # (chunk, mb) -> stage output to send (inner stages)
    grads: dict = field(default_factory=dict)         # (chunk, mb) -> gradient of the stage output
    input_grads: dict = field(default_factory=dict)   # (chunk, mb) -> gradient of the stage input, to send
    pieces: dict = field(default_factory=dict)        # (chunk, mb) -> [Cut] of its forward, for its backward
    totals: torch.Tensor | None = None                # [loss + balance, lm, mtp, balance] / micro-batches


class PipelineExecutor:
    def __init__(self, model: DeepSeekV3, schedule: Schedule, specs: dict[int, StageSpec], pp_rank: int, p2p: P2P,
                 store: WeightGradStore, hidden_shape: tuple[int, ...], mirrors: list[MirrorSet], pp_group,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.model, self.schedule, self.specs, self.rank = model, schedule, specs, pp_rank
        self.p2p, self.store, self.hidden_shape, self.mirrors = p2p, store, hidden_shape, mirrors
        self.pp_group, self.autocast = pp_group, autocast
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.moes = {c: self._stage_moes(s) for c, s in specs.items()}
        self.streams = Streams(self.device)
        self.overlap_slots: list[tuple[str | None, str | None]] = []   # the last FB action's slots

    def _stage_moes(self, spec: StageSpec) -> list[MoE]:
        moes = [self.model.layers[str(i)].mlp for i in spec.layers]
        if spec.last:
            moes += [m.layer.mlp for m in self.model.mtp.values()]
        return [m for m in moes if isinstance(m, MoE)]

    # ------------------------------------------------------------------ the stage, piece by piece

    def stage_pieces(self, chunk: int, batch: torch.Tensor, mtp_weight: float) -> list[Piece]:
        """The stage as a chain of pieces: the embedding (first stage), each layer's pieces
        (`DecoderLayer.pieces`: attention, then the MLP or the MoE's dispatch, experts, combine),
        and on the last stage the head with the LM and MTP losses, which returns (loss, lm_loss,
        mtp_loss). batch [b, s + 1] token ids."""
        spec, model = self.specs[chunk], self.model
        tokens, targets = batch[:, :-1], batch[:, 1:]
        cos, sin = model.rope(tokens.shape[1], tokens.device)
        pieces = [Piece("embed", False, lambda _: model.embed_tokens(tokens))] if spec.first else []
        for i in spec.layers:
            pieces += [p._replace(name=f"layers.{i}.{p.name}") for p in model.layers[str(i)].pieces(cos, sin)]
        if spec.last:
            def head(h: torch.Tensor):
                out = model.head_losses(h, tokens, targets, mtp_weight)
                return out.loss, out.lm_loss, out.mtp_loss
            pieces.append(Piece("head", False, head))
        return under_autocast(pieces, self.autocast)

    # ------------------------------------------------------------------ actions

    def forward_chain(self, st: _StepState, chunk: int, mb: int) -> Chain:
        pieces = self.stage_pieces(chunk, st.micro_batches[mb], st.mtp_weight)
        return Chain(pieces, self._forward(st, chunk, mb, pieces))

    def backward_chain(self, st: _StepState, chunk: int, mb: int, defer_weights: bool) -> Chain:
        cuts = st.pieces.pop((chunk, mb))
        return Chain([c.piece for c in reversed(cuts)], self._backward(st, chunk, mb, cuts, defer_weights))

    def _forward(self, st: _StepState, chunk: int, mb: int, pieces: list[Piece]) -> Iterator[None]:
        """Forward of (chunk, mb) piece by piece (`pieces.forward_steps`), then its bookkeeping:
        the stage output to send or hand over, or the scaled loss to differentiate; the statistics."""
        n = len(st.micro_batches)
        cuts: list[Cut] = []
        result: list = []
        yield from forward_steps(pieces, st.inputs.get((chunk, mb)), cuts, result)
        h = result[0]
        st.pieces[(chunk, mb)] = cuts
        balance = sum((m.last_balance_loss.detach() for m in self.moes[chunk]), torch.zeros((), device=self.device))
        zero = torch.zeros_like(balance)
        if not isinstance(h, tuple):
            st.outputs[(chunk, mb)] = h
            st.totals += torch.stack([balance, zero, zero, balance]).double() / n
            hop = self.schedule.next_hop(self.rank, chunk, mb)
            if hop[0] == self.rank:                     # the next stage is on this rank (the V's tip)
                st.inputs[(hop[1], mb)] = h
        else:
            loss, lm_loss, mtp_loss = h
            if cuts:
                cuts[-1].roots = [loss / n]
            st.totals += torch.stack([loss.detach() + balance, lm_loss.detach(), mtp_loss.detach(), balance]).double() / n

    def _backward(self, st: _StepState, chunk: int, mb: int, cuts: list[Cut], defer_weights: bool) -> Iterator[None]:
        """Backward of (chunk, mb) piece by piece, last first (`pieces.backward_steps`); with
        `defer_weights` the weight gradients of the linear layers and routed experts wait for the W action. Then the
        gradient of the stage input is handed over or kept to send."""
        st.outputs.pop((chunk, mb), None)
        around = (lambda: self.store.collect((chunk, mb))) if defer_weights else contextlib.nullcontext
        yield from backward_steps(cuts, st.grads.pop((chunk, mb), None), around)
        x = st.inputs.pop((chunk, mb), None)
        if x is None:
            return
        hop = self.schedule.prev_hop(self.rank, chunk, mb)
        if hop[0] == self.rank:
            st.grads[(hop[1], mb)] = x.grad
        else:
            st.input_grads[(chunk, mb)] = x.grad

    def execute(self, st: _StepState, a: Action) -> None:
        s = self.schedule
        if a.kind == "F":
            run_all(self.forward_chain(st, a.chunk, a.mb), self.streams)
        elif a.kind in ("B", "BW"):
            run_all(self.backward_chain(st, a.chunk, a.mb, defer_weights=a.kind == "B"), self.streams)
        elif a.kind == "W":
            self.store.flush((a.chunk, a.mb))
        elif a.kind == "FB":
            self.overlap_slots = overlapped_forward_backward(
                self.forward_chain(st, a.chunk, a.mb),
                self.backward_chain(st, a.b_chunk, a.b_mb, defer_weights=False), self.streams)
        elif a.kind == "SEND_F":
            peer = s.next_hop(self.rank, a.chunk, a.mb)
            mark_use([st.outputs[(a.chunk, a.mb)]])
            self.p2p.send(st.outputs[(a.chunk, a.mb)], peer[0], s.tag("SEND_F", *peer, a.mb))
        elif a.kind == "RECV_F":
            x = self.p2p.recv(self.hidden_shape, self.dtype, self.device, s.prev_hop(self.rank, a.chunk, a.mb)[0],
                              s.tag("RECV_F", self.rank, a.chunk, a.mb))
            st.inputs[(a.chunk, a.mb)] = x.requires_grad_()
        elif a.kind == "SEND_B":
            peer = s.prev_hop(self.rank, a.chunk, a.mb)
            self.p2p.send(st.input_grads.pop((a.chunk, a.mb)), peer[0], s.tag("SEND_B", *peer, a.mb))
        elif a.kind == "RECV_B":
            st.grads[(a.chunk, a.mb)] = self.p2p.recv(self.hidden_shape, self.dtype, self.device,
                                                      s.next_hop(self.rank, a.chunk, a.mb)[0],
                                                      s.tag("RECV_B", self.rank, a.chunk, a.mb))
        else:
            raise ValueError(f"unknown pipeline action {a}")

    # ------------------------------------------------------------------ a step

    def train_step(self, micro_batches: list[torch.Tensor], mtp_weight: float,
                   trace: list | None = None) -> torch.Tensor:
        """Forward and backward of all micro-batches by the schedule; returns the step's
        [loss + balance, lm, mtp, balance] (means over micro-batches) summed over the pipeline.
        With `trace` (a list), the ranks start together and each action's [name, start, end] in
        seconds is appended to it (on GPU each action is synchronised first: slower, but the spans
        are the kernels' times) — the input of tools/plot_schedule.py --measured."""
        if len(micro_batches) != self.schedule.n_micro:
            raise ValueError(f"the {self.schedule.name} schedule was built for {self.schedule.n_micro} micro-batches, "
                             f"got {len(micro_batches)}")
        st = _StepState([b.to(self.device) for b in micro_batches], mtp_weight,
                        totals=torch.zeros(4, dtype=torch.float64, device=self.device))
        if trace is not None and self.pp_group is not None:
            dist.barrier(group=self.pp_group)
        started = time.perf_counter()
        with balance_loss_scale(1.0 / len(micro_batches)):
            for a in self.schedule.actions[self.rank]:
                begin = time.perf_counter()
                self.execute(st, a)
                if trace is not None:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    trace.append([str(a), begin - started, time.perf_counter() - started])
        self.p2p.wait_sends()
        if self.store.pending():
            raise RuntimeError(f"weight gradients of {self.store.pending()} were deferred but never computed: "
                               f"the schedule lacks their W actions")
        self.sum_mirrors()
        if self.pp_group is not None:
            dist.all_reduce(st.totals, group=self.pp_group)
        return st.totals

    @torch.no_grad()
    def evaluate(self, micro_batches: list[torch.Tensor], schedule: Schedule) -> torch.Tensor:
        """Sum over micro-batches of the LM loss by a forward-only schedule, summed over the pipeline."""
        st = _StepState([b.to(self.device) for b in micro_batches], 0.0,
                        totals=torch.zeros(4, dtype=torch.float64, device=self.device))
        saved, self.schedule = self.schedule, schedule
        try:
            for a in schedule.actions[self.rank]:
                self.execute(st, a)
            self.p2p.wait_sends()
        finally:
            self.schedule = saved
        if self.pp_group is not None:
            dist.all_reduce(st.totals, group=self.pp_group)
        return st.totals[1] * len(micro_batches)

    def sum_mirrors(self) -> None:
        """Sum gradients and expert loads of mirrored copies over the ranks that hold them."""
        for m in self.mirrors:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.params]
            loads = [moe.expert_load for moe in m.moes]
            flat = torch.cat([t.reshape(-1) for t in grads + loads])
            dist.all_reduce(flat, group=m.group)
            for t, part in zip(grads + loads, flat.split([t.numel() for t in grads + loads])):
                t.copy_(part.view_as(t))
            for p, g in zip(m.params, grads):
                p.grad = g
