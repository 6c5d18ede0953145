"""Megatron-style tensor and sequence parallelism, applied to a plain DeepSeekV3 from outside.

Heads of MLA, the dense MLP / shared-expert width and the vocabulary are split over the TP
group. Column-parallel layers shard output features, row-parallel layers shard input
features; the low-rank MLA down-projections, their norms, the router and the routed experts
are replicated. Region boundaries (Megatron's f/g operators):

    without SP: copy (fwd identity, bwd all-reduce)    before the column-parallel layers
                reduce (fwd all-reduce, bwd identity)  after the row-parallel layers
    with SP:    gather (fwd all-gather of the sequence, bwd reduce-scatter)
                scatter (fwd reduce-scatter of the sequence, bwd all-gather)

With sequence parallelism activations between blocks are [b, s/tp, d], so a replicated
parameter sees different tokens on every TP rank: its gradient is summed over TP by a hook.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megads.model.deepseek_v3 import DeepSeekV3
from megads.model.layers import Embedding, Linear, MLP
from megads.model.mla import MLA
from megads.model.moe import MoE
from megads.parallel.mesh import Mesh

SEQ_DIM = 1

# torch 2.13 renamed the single-tensor collectives (the old names now warn FutureWarning); older torch has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


# ----------------------------------------------------------------------------- region operators

def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    x = x.movedim(SEQ_DIM, 0).contiguous()
    out = x.new_empty((size * x.shape[0],) + x.shape[1:])
    _all_gather_single(out, x, group=group)
    return out.movedim(0, SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    x = x.movedim(SEQ_DIM, 0).contiguous()
    out = x.new_empty((x.shape[0] // size,) + x.shape[1:])
    _reduce_scatter_single(out, x, group=group)
    return out.movedim(0, SEQ_DIM)


def _slice_seq(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=SEQ_DIM)[dist.get_rank(group)].contiguous()


class _RegionOp(torch.autograd.Function):
    """A TP-region boundary: `forward(x, group)` one way, `backward(grad, group)` the other."""

    @staticmethod
    def forward(ctx, x, group, forward, backward):
        ctx.group, ctx.backward = group, backward
        return forward(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward(grad, ctx.group), None, None, None


def copy_to_tp(x, group):
    """Replicated activations into column-parallel layers: gradients summed over TP."""
    return _RegionOp.apply(x, group, _identity, _all_reduce)


def reduce_from_tp(x, group):
    """Partial sums of row-parallel layers (or statistics) summed over TP."""
    return _RegionOp.apply(x, group, _all_reduce, _identity)


def gather_sequence(x, group):
    """Sequence-parallel shards [b, s/tp, d] into the TP region [b, s, d] (gradients reduce-scattered)."""
    return _RegionOp.apply(x, group, _all_gather_seq, _reduce_scatter_seq)


def scatter_sequence(x, group):
    """Partial sums [b, s, d] out of the TP region into sequence shards [b, s/tp, d]."""
    return _RegionOp.apply(x, group, _reduce_scatter_seq, _all_gather_seq)


def split_sequence(x, group):
    """This TP rank's slice [b, s/tp, d] of a TP-replicated tensor (gradients all-gathered back)."""
    return _RegionOp.apply(x, group, _slice_seq, _all_gather_seq)


def merge_sequence(x, group):
    """The TP ranks' slices concatenated into the replicated tensor; each keeps its gradient slice."""
    return _RegionOp.apply(x, group, _all_gather_seq, _slice_seq)


# ----------------------------------------------------------------------------- layers

class ColumnParallelLinear(Linear):
    """Output features split over TP. `input_op` brings the input into the TP region (copy or
    sequence gather), or is None when the caller already did (MLA's to_heads)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_op is not None:
            x = self.input_op(x, self.tp_group)
        return self.gemm(x, self.weight)


class RowParallelLinear(Linear):
    """Input features split over TP; partial outputs summed (all-reduce or sequence reduce-scatter)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_op(self.gemm(x, self.weight), self.tp_group)


class VocabParallelEmbedding(Embedding):
    """Rows [start, start + vocab/tp) of the embedding; other ranks' tokens contribute zeros,
    and the partial lookups are summed (or reduce-scattered to sequence shards under SP)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        start = self.vocab_start
        local = tokens - start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.output_op(out, self.tp_group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split over the vocabulary; the full logits never exist
    on one rank. logits [n, v/tp] fp32, targets [n] global ids -> loss [n]."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local = targets - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(target_logit, group=group)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        onehot = torch.zeros_like(softmax).scatter_(-1, local.unsqueeze(-1), (~outside).unsqueeze(-1).to(softmax.dtype))
        return (softmax - onehot) * grad.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, group)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, mask: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Mean next-token entropy (nats) over masked positions, from logits [b, s, vocab/tp] split over
    TP: H = log Z + m - sum_v e^(z_v - m) z_v / Z', all sums reduced over the TP group."""
    group = mesh.group("tp")
    z = logits.float()
    m = z.amax(-1)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(z - m[..., None])
    sums = torch.stack([e.sum(-1), (e * z).sum(-1)])                              # [2, b, s]
    if group is not None:
        dist.all_reduce(sums, group=group)
    h = sums[0].log() + m - sums[1] / sums[0]
    mask = mask.bool()
    return h.masked_fill(~mask, 0.0).sum() / mask.sum().clamp(min=1)


def gather_vocab(logits: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The full-vocabulary logits [..., vocab] from TP shards [..., vocab/tp] (for sampling)."""
    group = mesh.group("tp")
    if group is None:
        return logits
    parts = [torch.empty_like(logits) for _ in range(mesh.tp)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------- applying TP to a model

def _shard(param: nn.Parameter, dim: int, rank: int, size: int) -> nn.Parameter:
    shard = nn.Parameter(param.detach().chunk(size, dim=dim)[rank].clone())
    shard.tensor_model_parallel = True
    shard.partition_dim = dim
    return shard


def _to_column(linear: Linear, mesh: Mesh, input_op) -> None:
    linear.__class__ = ColumnParallelLinear
    linear.weight = _shard(linear.weight, 0, mesh.tp_rank, mesh.tp)
    linear.out_features //= mesh.tp
    linear.tp_group, linear.input_op = mesh.group("tp"), input_op


def _to_row(linear: Linear, mesh: Mesh, output_op) -> None:
    linear.__class__ = RowParallelLinear
    linear.weight = _shard(linear.weight, 1, mesh.tp_rank, mesh.tp)
    linear.in_features //= mesh.tp
    linear.tp_group, linear.output_op = mesh.group("tp"), output_op


def reduce_grad_over_tp(param: nn.Parameter, group) -> None:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad
    param.register_hook(hook)
    param.sequence_parallel = True


def parallelize_tensor(model: DeepSeekV3, mesh: Mesh, sequence_parallel: bool) -> DeepSeekV3:
    """Shard `model` (built and initialised identically on every rank) over the TP group, in place."""
    if mesh.tp == 1:
        return model
    group = mesh.group("tp")
    into_tp = gather_sequence if sequence_parallel else copy_to_tp
    out_of_tp = scatter_sequence if sequence_parallel else reduce_from_tp
    sharded: set[int] = set()
    for module in model.modules():
        if isinstance(module, MLA):
            module.to_heads = lambda x, g=group: into_tp(x, g)
            if hasattr(module, "q_proj"):
                _to_column(module.q_proj, mesh, into_tp)
            else:
                _to_column(module.q_b_proj, mesh, None)
            _to_column(module.kv_b_proj, mesh, None)
            _to_row(module.o_proj, mesh, out_of_tp)
        elif isinstance(module, MLP):
            _to_column(module.gate_proj, mesh, into_tp)
            _to_column(module.up_proj, mesh, into_tp)
            _to_row(module.down_proj, mesh, out_of_tp)
        elif isinstance(module, MoE) and sequence_parallel:
            module.reduce_sequence_stats = lambda x, g=group: reduce_from_tp(x, g)
    embed = model.embed_tokens
    embed.__class__ = VocabParallelEmbedding
    embed.weight = _shard(embed.weight, 0, mesh.tp_rank, mesh.tp)
    embed.vocab_start = mesh.tp_rank * embed.weight.shape[0]
    embed.tp_group, embed.output_op = group, out_of_tp
    _to_column(model.lm_head, mesh, into_tp)
    vocab_start = embed.vocab_start
    model.token_losses = lambda logits, targets: vocab_parallel_cross_entropy(logits, targets, vocab_start, group)
    sharded.update(id(p) for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    if sequence_parallel:
        for p in model.parameters():
            if id(p) not in sharded:
                reduce_grad_over_tp(p, group)
    return model
