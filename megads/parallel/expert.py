"""Expert parallelism: routed experts sharded over the EP group, tokens exchanged all-to-all.

EP rank r holds the experts [r * E/ep, (r+1) * E/ep) (global indices; the parallel plan splits
them). The MoE layer sorts its token copies by global expert; the experts' `AllToAllExchange`
sends each expert's rows to the rank that holds it (`dispatch`), the local experts run as one
grouped computation, and `combine` sends the results back in the original order (the MoE
layer then applies the gate weights). Both directions are differentiable; splits are uneven
and nothing is dropped.

Node-limited routing (DeepSeek-V3: each token reaches at most 4 nodes): the router's expert
groups are laid onto the EP ranks, so that a group lives on one block of ep / n_group ranks
(a "node") or a rank holds whole groups. Group-limited top-k then bounds the nodes a token is
sent to by topk_group; `max_nodes_per_token` records the bound as it happened.

Under tensor parallelism without sequence parallelism the TP ranks hold the same tokens, so
each one takes its own slice of the sequence before routing and the slices are gathered
after (otherwise every token would reach its experts tp times); the router, now fed this rank's
slice only, has its gradient summed over TP (the plan's `tp_grad_sum`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megads.model.moe import MoE, MoEStrategy
from megads.model.recompute import recomputing
from megads.parallel.mesh import Mesh
from megads.parallel.tensor import TPRegion


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends the gradients the reverse way."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits),) + x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        out = grad.new_empty((sum(input_splits),) + grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass
class ExchangeStats:
    """What the exchanges of grad-enabled forwards did since the trainer last read and reset them."""
    tokens_sent_off_rank: int = 0                 # rows sent to other ranks
    # the most nodes (blocks of EP ranks) one token reached; a tensor, so that counting needs no device sync
    max_nodes_per_token: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))


@dataclass(frozen=True)
class AllToAllExchange:
    """The routed experts' `exchange` under expert parallelism: rows sorted by global expert go to
    the EP rank holding their expert, n_local experts per rank, and come back in order.
    `send_rows(rows, output splits, input splits, group)` is the dispatch's exchange; FP8 training
    can make it send E4M3 rows (megads.fp8.dispatch, `fp8.dispatch`)."""
    ep: int
    ep_rank: int
    group: object
    n_local: int
    experts_per_node: int
    send_rows: Callable = all_to_all
    stats: ExchangeStats = field(default_factory=ExchangeStats)

    def __repr__(self) -> str:
        return f"all-to-all over ep {self.ep}" + ("" if self.send_rows is all_to_all else " (fp8 dispatch)")

    def count_nodes(self, expert_ids: torch.Tensor) -> None:
        """Record the most nodes any token of `expert_ids` [t, k] is sent to."""
        nodes = expert_ids // self.experts_per_node
        n_nodes = self.ep * self.n_local // self.experts_per_node
        per_token = F.one_hot(nodes, n_nodes).amax(1).sum(-1)                   # [t]
        if per_token.numel():
            self.stats.max_nodes_per_token = torch.maximum(self.stats.max_nodes_per_token.to(per_token.device),
                                                           per_token.max())

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor, expert_ids: torch.Tensor):
        """x [n, d] sorted by global expert, counts [E], expert_ids [t, k] -> rows grouped by local
        expert, the count per local expert, and the plan to send results back."""
        send_counts = counts.view(self.ep, self.n_local)                       # [dest, local expert]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        recv_counts = recv_counts.view(self.ep, self.n_local)                  # [source, local expert]
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        if torch.is_grad_enabled() and not recomputing():
            self.stats.tokens_sent_off_rank += sum(send_splits) - send_splits[self.ep_rank]
            self.count_nodes(expert_ids)
        received = self.send_rows(x, recv_splits, send_splits, self.group)     # ordered by (source, expert)
        # Regroup expert-major: segment (source s, expert j) goes to position key j * ep + s.
        keys = (torch.arange(self.n_local, device=x.device) * self.ep + torch.arange(self.ep, device=x.device)[:, None])
        order = keys.flatten().repeat_interleave(recv_counts.flatten()).argsort(stable=True)
        return received[order], recv_counts.sum(0), (order, send_splits, recv_splits)

    def combine(self, y: torch.Tensor, plan) -> torch.Tensor:
        """Undo `dispatch` for the expert outputs y (rows grouped by local expert)."""
        order, send_splits, recv_splits = plan
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all(y[inverse], send_splits, recv_splits, self.group)


def expert_strategies(model: nn.Module, mesh: Mesh, sequence_parallel: bool,
                      strategies: dict[str, object]) -> dict[str, object]:
    """Module name -> its strategy under EP (of a model whose routed experts the plan already
    split), from the `strategies` TP gave: every routed-expert block exchanges its rows all-to-all;
    under TP without SP, every MoE routes this TP rank's slice of the tokens."""
    out: dict[str, object] = {}
    for name, moe in model.named_modules():
        if not isinstance(moe, MoE):
            continue
        experts = f"{name}.experts"
        ranks_per_node = mesh.ep // moe.gate.n_group if mesh.ep % moe.gate.n_group == 0 else 1
        n_local = moe.n_experts // mesh.ep
        exchange = AllToAllExchange(mesh.ep, mesh.ep_rank, mesh.group("ep"), n_local, n_local * ranks_per_node)
        out[experts] = replace(strategies.get(experts, moe.experts.strategy), exchange=exchange)
        if mesh.tp > 1 and not sequence_parallel:
            group = mesh.group("tp")
            out[name] = MoEStrategy(TPRegion("split", group), TPRegion("merge", group), TPRegion("reduce", group))
    return out
