"""Megatron-style tensor and sequence parallelism, applied to a plain DeepSeekV3 from outside.

Heads of MLA, the dense MLP / shared-expert width and the vocabulary are split over the TP
group (`tensor_split_dims`, which the parallel plan declares). Column-parallel layers shard
output features, row-parallel layers shard input features; the low-rank MLA down-projections,
their norms, the router and the routed experts are replicated. `tensor_strategies` gives the
layers the boundaries of the TP region (Megatron's f/g operators):

    without SP: copy (fwd identity, bwd all-reduce)    before the column-parallel layers
                reduce (fwd all-reduce, bwd identity)  after the row-parallel layers
    with SP:    gather (fwd all-gather of the sequence, bwd reduce-scatter)
                scatter (fwd reduce-scatter of the sequence, bwd all-gather)

With sequence parallelism activations between blocks are [b, s/tp, d], so a replicated
parameter sees different tokens on every TP rank: its gradient is summed over TP by a hook
(`reduce_grad_over_tp`, for the tensors the plan marks `tp_grad_sum`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megads.model.deepseek_v3 import DeepSeekV3, OutputStrategy
from megads.model.layers import MLP, EmbeddingStrategy, LinearStrategy
from megads.model.mla import MLA, AttentionStrategy
from megads.model.moe import MoE, MoEStrategy
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


# kind -> (forward, backward) of each boundary:
_REGIONS = {
    "copy": (_identity, _all_reduce),              # replicated activations into column-parallel layers
    "reduce": (_all_reduce, _identity),            # partial sums of row-parallel layers (or statistics) summed
    "gather": (_all_gather_seq, _reduce_scatter_seq),   # sequence shards [b, s/tp, d] into the region [b, s, d]
    "scatter": (_reduce_scatter_seq, _all_gather_seq),  # partial sums [b, s, d] out into sequence shards
    "split": (_slice_seq, _all_gather_seq),        # this rank's slice [b, s/tp, d] of a TP-replicated tensor
    "merge": (_all_gather_seq, _slice_seq),        # the slices concatenated; each rank keeps its gradient slice
}


@dataclass(frozen=True)
class TPRegion:
    """A region boundary as a layer strategy holds it: one of the kinds above over `group`."""
    kind: str
    group: object

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        forward, backward = _REGIONS[self.kind]
        return _RegionOp.apply(x, self.group, forward, backward)

    def __repr__(self) -> str:
        return self.kind


# ----------------------------------------------------------------------------- vocabulary parallelism

@dataclass(frozen=True)
class VocabParallelLookup:
    """The embedding lookup of rows [vocab_start, vocab_start + vocab/tp): other ranks' tokens
    contribute zeros, and the partial lookups are summed (or reduce-scattered under SP) by `leave`."""
    vocab_start: int
    leave: TPRegion

    def __call__(self, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.leave(out)

    def __repr__(self) -> str:
        return f"vocab-parallel lookup (from {self.vocab_start}, then {self.leave!r})"


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


@dataclass(frozen=True)
class VocabParallelLoss:
    """OutputStrategy.token_losses for logits split over the vocabulary (this rank's from vocab_start)."""
    vocab_start: int
    group: object

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _VocabParallelCrossEntropy.apply(logits, targets, self.vocab_start, self.group)

    def __repr__(self) -> str:
        return f"vocab-parallel cross-entropy (from {self.vocab_start})"


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


# ----------------------------------------------------------------------------- the TP part of the plan

def tensor_split_dims(model: DeepSeekV3) -> dict[str, int]:
    """Parameter name -> the dimension TP splits: MLA's heads, the MLP / shared-expert width
    (column-parallel: output features, 0; row-parallel: input features, 1), the vocabulary."""
    dims = {"embed_tokens.weight": 0, "lm_head.weight": 0}
    for name, module in model.named_modules():
        if isinstance(module, MLA):
            q = "q_proj" if hasattr(module, "q_proj") else "q_b_proj"
            dims.update({f"{name}.{q}.weight": 0, f"{name}.kv_b_proj.weight": 0, f"{name}.o_proj.weight": 1})
        elif isinstance(module, MLP):
            dims.update({f"{name}.gate_proj.weight": 0, f"{name}.up_proj.weight": 0, f"{name}.down_proj.weight": 1})
    return dims


def tensor_strategies(model: DeepSeekV3, mesh: Mesh, sequence_parallel: bool) -> dict[str, object]:
    """Module name -> its strategy under TP (of a model whose weights the plan already split).
    Inputs enter the TP region before column-parallel layers (copy, or the sequence all-gather
    under SP) and partial sums leave it after row-parallel ones (all-reduce or reduce-scatter);
    MLA's per-head projections take their latents through `to_heads` instead."""
    group = mesh.group("tp")
    into = TPRegion("gather" if sequence_parallel else "copy", group)
    out_of = TPRegion("scatter" if sequence_parallel else "reduce", group)
    strategies: dict[str, object] = {}
    for name, module in model.named_modules():
        if isinstance(module, MLA):
            strategies[name] = AttentionStrategy(to_heads=into)
            if hasattr(module, "q_proj"):
                strategies[f"{name}.q_proj"] = LinearStrategy(enter=into)
            strategies[f"{name}.o_proj"] = LinearStrategy(leave=out_of)
        elif isinstance(module, MLP):
            strategies.update({f"{name}.gate_proj": LinearStrategy(enter=into),
                               f"{name}.up_proj": LinearStrategy(enter=into),
                               f"{name}.down_proj": LinearStrategy(leave=out_of)})
        elif isinstance(module, MoE) and sequence_parallel:
            strategies[name] = MoEStrategy(reduce_stats=TPRegion("reduce", group))
    vocab_start = mesh.tp_rank * (model.cfg.vocab_size // mesh.tp)
    strategies["embed_tokens"] = EmbeddingStrategy(VocabParallelLookup(vocab_start, out_of))
    strategies["lm_head"] = LinearStrategy(enter=into)
    strategies[""] = OutputStrategy(VocabParallelLoss(vocab_start, group))
    return strategies


def reduce_grad_over_tp(param: nn.Parameter, group) -> None:
    """Sum the parameter's gradient over the TP group as it is produced."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad
    param.register_hook(hook)
