"""Expert parallelism: routed experts sharded over the EP group, tokens exchanged all-to-all.

EP rank r holds the experts [r * E/ep, (r+1) * E/ep) (global indices). The MoE layer sorts its
token copies by global expert; `dispatch_tokens` sends each expert's rows to the rank that
holds it, the local experts run as one grouped computation, and `combine_tokens` sends the
results back in the original order (the MoE layer then applies the gate weights). Both
directions are differentiable; splits are uneven and nothing is dropped.

Node-limited routing (DeepSeek-V3: each token reaches at most 4 nodes): the router's expert
groups are laid onto the EP ranks, so that a group lives on one block of ep / n_group ranks
(a "node") or a rank holds whole groups. Group-limited top-k then bounds the nodes a token is
sent to by topk_group; `max_nodes_per_token` records the bound as it happened.

Under tensor parallelism without sequence parallelism the TP ranks hold the same tokens, so
each one takes its own slice of the sequence before routing and the slices are gathered
after (otherwise every token would reach its experts tp times).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megads.model.moe import GroupedExperts, MoE
from megads.parallel.mesh import Mesh
from megads.parallel.tensor import merge_sequence, reduce_from_tp, reduce_grad_over_tp, split_sequence


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


class ExpertParallelExperts(nn.Module):
    """Stands where `GroupedExperts` stood in a MoE layer: same call, experts spread over EP.

    `local` holds this rank's E/ep experts; calls take all rows sorted by global expert."""

    def __init__(self, local: GroupedExperts, n_experts: int, n_group: int, mesh: Mesh):
        super().__init__()
        self.local = local
        self.ep, self.ep_rank, self.group = mesh.ep, mesh.ep_rank, mesh.group("ep")
        self.n_local = n_experts // mesh.ep
        ranks_per_node = mesh.ep // n_group if mesh.ep % n_group == 0 else 1
        self.experts_per_node = self.n_local * ranks_per_node
        # The dispatch exchange (rows, output splits, input splits, group) -> rows; FP8 training can
        # replace it to send E4M3 rows (megads.fp8.dispatch, `fp8.dispatch`).
        self.send_rows = all_to_all
        self.tokens_sent_off_rank = 0           # rows sent to other ranks by grad-enabled forwards
        self.max_nodes_per_token = torch.zeros((), dtype=torch.int64)  # since the last reset

    def count_nodes(self, expert_ids: torch.Tensor) -> None:
        """Record the most nodes (blocks of EP ranks) any token of `expert_ids` [t, k] is sent to
        by a grad-enabled forward."""
        if not torch.is_grad_enabled():
            return
        nodes = expert_ids // self.experts_per_node
        n_nodes = self.ep * self.n_local // self.experts_per_node
        per_token = F.one_hot(nodes, n_nodes).amax(1).sum(-1)                   # [t]
        if per_token.numel():
            self.max_nodes_per_token = torch.maximum(self.max_nodes_per_token.to(per_token.device), per_token.max())

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [n, d] sorted by global expert, counts [E] -> [n, d] expert outputs, same order."""
        received, local_counts, plan = self.dispatch_tokens(x, counts)
        return self.combine_tokens(self.compute(received, local_counts), plan)

    def compute(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the rows dispatched to them (grouped by local expert)."""
        return self.local(x, counts)

    def dispatch_tokens(self, x: torch.Tensor, counts: torch.Tensor):
        """Send rows to their experts' ranks; returns rows grouped by local expert, the count per
        local expert and the plan to send results back."""
        send_counts = counts.view(self.ep, self.n_local)                       # [dest, local expert]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        recv_counts = recv_counts.view(self.ep, self.n_local)                  # [source, local expert]
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        if torch.is_grad_enabled():
            self.tokens_sent_off_rank += sum(send_splits) - send_splits[self.ep_rank]
        received = self.send_rows(x, recv_splits, send_splits, self.group)  # ordered by (source, expert)
        # Regroup expert-major: segment (source s, expert j) goes to position key j * ep + s.
        keys = (torch.arange(self.n_local, device=x.device) * self.ep + torch.arange(self.ep, device=x.device)[:, None])
        order = keys.flatten().repeat_interleave(recv_counts.flatten()).argsort(stable=True)
        return received[order], recv_counts.sum(0), (order, send_splits, recv_splits)

    def combine_tokens(self, y: torch.Tensor, plan) -> torch.Tensor:
        """Undo `dispatch_tokens` for the expert outputs y (rows grouped by local expert)."""
        order, send_splits, recv_splits = plan
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all(y[inverse], send_splits, recv_splits, self.group)


def parallelize_experts(model: nn.Module, mesh: Mesh, sequence_parallel: bool) -> None:
    """Keep this EP rank's experts in every MoE layer (in place) and route through all-to-all."""
    if mesh.ep == 1:
        return
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        lo = mesh.ep_rank * moe.n_experts // mesh.ep
        hi = lo + moe.n_experts // mesh.ep
        for name in ("gate_proj", "up_proj", "down_proj"):
            shard = nn.Parameter(getattr(experts, name).detach()[lo:hi].clone())
            shard.expert_parallel = True
            shard.expert_offset = lo                   # global index of the first local expert
            setattr(experts, name, shard)
        moe.experts = ExpertParallelExperts(experts, moe.n_experts, moe.gate.n_group, mesh)
        moe.gate.register_forward_hook(lambda _, __, out, ep=moe.experts: ep.count_nodes(out[0]))
        if mesh.tp > 1 and not sequence_parallel:
            group = mesh.group("tp")
            moe.split_tokens = lambda x, g=group: split_sequence(x, g)
            moe.merge_tokens = lambda x, g=group: merge_sequence(x, g)
            moe.reduce_sequence_stats = lambda x, g=group: reduce_from_tp(x, g)
            reduce_grad_over_tp(moe.gate.weight, group)       # the router now sees this rank's slice only
