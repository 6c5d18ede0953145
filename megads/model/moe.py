"""DeepSeekMoE: sigmoid router with group-limited top-k, auxiliary-loss-free bias balancing,
the sequence-wise balance loss, shared experts, no token dropping (DeepSeek-V3 report, 2.1.2)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megads.config import ModelConfig
from megads.model.deferral import weight_grad_now_or_later
from megads.model.recompute import recomputing
from megads.model.layers import MLP, Region, identity


class Router(nn.Module):
    """Scores tokens against experts. Selection uses score + bias; gate weights use the unbiased score."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scaling, self.normalize = cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # fp32 bias used only to select experts; moved by update_bias, never by the optimizer.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.replayed: torch.Tensor | None = None     # inside `replay`: the experts to use

    @contextlib.contextmanager
    def replay(self, recorded: torch.Tensor) -> Iterator[None]:
        """Routing replay (GRPO): inside, forwards use the experts `recorded` (those chosen when the
        tokens were sampled, any shape holding [t, k] ids) instead of choosing; gate weights follow."""
        self.replayed = recorded
        try:
            yield
        finally:
            self.replayed = None

    def _replayed_ids(self, chosen: torch.Tensor) -> torch.Tensor:
        if self.replayed.numel() != chosen.numel():
            raise ValueError(f"routing replay holds {tuple(self.replayed.shape)} expert ids for a forward that routes "
                             f"{tuple(chosen.shape)}; replay the rollout's token batch")
        return self.replayed.reshape(chosen.shape).to(chosen.device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [t, d] -> expert ids [t, k] (int64), gate weights [t, k] (fp32), scores [t, e] (fp32)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        biased = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)                    # [t, n_group]
            keep_groups = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, False)
            biased = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        expert_ids = biased.topk(self.top_k, dim=-1).indices
        if self.replayed is not None:
            expert_ids = self._replayed_ids(expert_ids)
        weights = scores.gather(1, expert_ids)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return expert_ids, weights * self.scaling, scores


def grouped_linear_loop(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-expert x_e @ W_e^T. x [n, in] sorted by expert, weight [e, out, in], counts [e] -> [n, out]."""
    outs = [chunk @ weight[e].t() for e, chunk in enumerate(x.split(counts.tolist()))]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._grouped_mm needs bf16 on Hopper (fp32 or bf16 on CPU) and 16-byte-aligned rows."""
    if x.shape[0] == 0:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False                     # torch.compile traces it with a meta kernel that takes bf16 only
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    row_bytes = x.element_size()
    return (x.shape[1] * row_bytes) % 16 == 0 and (weight.shape[1] * row_bytes) % 16 == 0


def _expert_products(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, grouped: bool) -> torch.Tensor:
    """x_e @ W_e^T for every expert, as one torch._grouped_mm or a loop.
    x [n, in] sorted by expert, weight [e, out, in], counts [e] -> [n, out]."""
    if grouped:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
    return grouped_linear_loop(x, weight, counts)


def _expert_weight_grads(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor, grouped: bool) -> torch.Tensor:
    """dW_e = dy_e^T x_e for every expert, in the operands' dtype (torch._grouped_mm writes no other).
    x [n, in], dy [n, out] sorted by expert -> [e, out, in]."""
    if grouped:
        return torch._grouped_mm(dy.t(), x, offs=counts.cumsum(0).to(torch.int32))
    sizes = counts.tolist()
    return torch.stack([g.t() @ a for g, a in zip(dy.split(sizes), x.split(sizes))])


class GroupedLinearFunction(torch.autograd.Function):
    """Per-expert x_e W_e^T, where W is `copy` (the parameter `param` in the compute dtype) or, when
    `copy` is None, `param` itself (never one tensor twice, as for LinearFunction). Backward computes
    dx at once; the weight gradient (computed in the compute dtype, the grouped GEMM's only output
    dtype) goes to `param` now, at a zero-bubble schedule's W action, or, when `main_grad` (param's
    fp32 .grad) is given, is added into it in place. x [n, in] sorted by expert, W [e, out, in] -> [n, out]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, param: torch.Tensor, copy: torch.Tensor | None, counts: torch.Tensor,
                grouped: bool, main_grad: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, param, copy, counts)
        ctx.grouped, ctx.main_grad = grouped, main_grad
        return _expert_products(x, param if copy is None else copy, counts, grouped)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, param, copy, counts = ctx.saved_tensors
        weight = param if copy is None else copy
        grouped, dy, main_grad = ctx.grouped, dy.contiguous(), ctx.main_grad  # _grouped_mm refuses stride-0 gradients
        dx = _expert_products(dy, weight.transpose(-2, -1), counts, grouped) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            def compute() -> torch.Tensor:
                return _expert_weight_grads(x, dy, counts, grouped)
            dw = weight_grad_now_or_later(param, compute, None if main_grad is None else lambda: main_grad.add_(compute()))
        return dx, dw, None, None, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-expert x_e @ W_e^T as one grouped GEMM where the device and shapes allow, else a loop;
    the weight gradient defers to the W action of a zero-bubble schedule like `Linear`'s.
    x [n, in] sorted by expert, weight [e, out, in], counts [e] -> [n, out]."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    elif weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return GroupedLinearFunction.apply(x.contiguous(), weight, None, counts, grouped_mm_supported(x, weight), None)


GroupedGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (x, weight, counts) -> y


class ExpertExchange(Protocol):
    """How token copies reach the ranks holding their experts and come back."""

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor,
                 expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        """rows [n, d] sorted by global expert, counts [E], expert_ids [t, k] -> the rows at this
        rank's experts (grouped by local expert), the count per local expert, how to send them back."""

    def combine(self, y: torch.Tensor, plan: object) -> torch.Tensor:
        """The experts' outputs back to their tokens' rank, in the order `dispatch` took them."""


class LocalExchange:
    """One rank holds every expert: nothing is sent."""

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor, expert_ids: torch.Tensor):
        return rows, counts, None

    def combine(self, y: torch.Tensor, plan: object) -> torch.Tensor:
        return y

    def __repr__(self) -> str:
        return "local"


@dataclass(frozen=True)
class ExpertsStrategy:
    """`gemm`: the grouped product (FP8 replaces it); `exchange`: where the experts live (expert
    parallelism sends rows all-to-all)."""
    gemm: GroupedGemm = grouped_linear
    exchange: ExpertExchange = field(default_factory=LocalExchange)


class GroupedExperts(nn.Module):
    """The routed experts' SwiGLU weights as 3-D tensors [experts, out, in] (this rank's experts
    under expert parallelism). Input rows are sorted by expert; `counts[e]` rows belong to expert e."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.strategy = ExpertsStrategy()

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [n, d] sorted by expert, counts [e] -> [n, d]."""
        gemm = self.strategy.gemm
        hidden = F.silu(gemm(x, self.gate_proj, counts)) * gemm(x, self.up_proj, counts)
        return gemm(hidden, self.down_proj, counts)


# ----------------------------------------------------------------------------- the balance loss

_balance_loss_grad_scale = 1.0


@contextlib.contextmanager
def balance_loss_scale(scale: float):
    """The factor the balance loss gradient gets in backward (1 / micro-batches per step)."""
    global _balance_loss_grad_scale
    previous, _balance_loss_grad_scale = _balance_loss_grad_scale, scale
    try:
        yield
    finally:
        _balance_loss_grad_scale = previous


class _AttachLoss(torch.autograd.Function):
    """Identity on `out` whose backward also differentiates `loss` (with d loss = the global scale).

    This adds an auxiliary loss to the objective without carrying it to the end of the model,
    which is what a pipeline stage needs.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.scale = _balance_loss_grad_scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, device=grad.device, dtype=torch.float32)


def sequence_balance_loss(scores: torch.Tensor, expert_ids: torch.Tensor, n_experts: int, alpha: float,
                          reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """alpha * sum_i f_i P_i, averaged over sequences (DeepSeek-V3 eq. 17-20).

    scores [b, s, e] unbiased affinities; expert_ids [b, s, k] selected experts.
    f_i = e / (k T) * #tokens of the sequence routed to i;  P_i = 1/T sum_t s_it / sum_j s_jt.
    `reduce` sums per-sequence statistics over ranks that hold other parts of the same sequences
    (sequence parallelism); T is then the full length.
    """
    b, s, k = expert_ids.shape
    counts = torch.zeros(b, n_experts, device=scores.device).scatter_add_(
        1, expert_ids.reshape(b, s * k), torch.ones(b, s * k, device=scores.device))
    affinity = (scores / scores.sum(-1, keepdim=True)).sum(1)              # [b, e], differentiable
    length = torch.full((1,), float(s), device=scores.device)
    if reduce is not None:
        counts, affinity, length = reduce(counts), reduce(affinity), reduce(length)
    f = counts * n_experts / (k * length)
    return alpha * (f * affinity / length).sum(-1).mean()


@dataclass
class Dispatched:
    """What the MoE pieces hand each other: dispatch -> run_experts -> combine."""
    x: torch.Tensor                      # [b, s, d] the MoE input (the shared experts' input)
    rows: torch.Tensor                   # [n, d] token copies at this rank's experts; their outputs after run_experts
    counts: torch.Tensor                 # [local experts] rows per expert (int64)
    plan: object                         # how the rows go back (None without expert parallelism)
    source: torch.Tensor                 # [t*k] token of each expert-sorted copy (int64)
    gates: torch.Tensor                  # [t*k] gate weight of each sorted copy (fp32)
    routed_shape: tuple[int, int, int]   # (b, s, d) of the routed tokens (this TP rank's slice)
    balance_loss: torch.Tensor | None    # the sequence-wise balance loss, attached in combine
    shared: torch.Tensor | None = None   # [b, s, d] shared experts' output, from run_experts
    residual: torch.Tensor | None = None  # the decoder layer's residual, carried for it


@dataclass(frozen=True)
class MoEStrategy:
    """Tensor parallelism's boundaries around routing: without sequence parallelism every TP rank
    routes only its slice of the (replicated) tokens (`split_tokens`) and the routed outputs are
    gathered back (`merge_tokens`); the balance loss's per-sequence statistics are summed over the
    ranks holding parts of one sequence (`reduce_stats`)."""
    split_tokens: Region = identity
    merge_tokens: Region = identity
    reduce_stats: Region = identity


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts > 0 else None
        self.balance_alpha = 0.0
        self.strategy = MoEStrategy()
        # Tokens routed to each expert by this step's grad-enabled forwards (selection statistics).
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)
        self.last_balance_loss = torch.zeros(())

    @property
    def num_experts(self) -> int:
        """Routed experts (the name DeepSpeed's engine reads when it takes over expert gradients)."""
        return self.n_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, d] -> [b, s, d]: the three pieces in a row."""
        return self.combine(self.run_experts(self.dispatch(x)))

    # The pieces a pipeline's overlapped F&B action interleaves with another micro-batch's backward:
    # `dispatch` and `combine` hold the expert-parallel all-to-alls, `run_experts` the computation.

    def dispatch(self, x: torch.Tensor) -> Dispatched:
        """Route the tokens of x [b, s, d] and send each token copy to its expert's rank."""
        routed_in = self.strategy.split_tokens(x)
        b, s, d = routed_in.shape
        tokens = routed_in.reshape(-1, d)
        expert_ids, weights, scores = self.gate(tokens)                           # [t, k], [t, k], [t, e]
        if torch.is_grad_enabled() and not recomputing():
            self.expert_load += torch.bincount(expert_ids.flatten(), minlength=self.n_experts).float()
        balance = None
        if self.balance_alpha > 0:
            balance = sequence_balance_loss(scores.view(b, s, -1), expert_ids.view(b, s, -1), self.n_experts,
                                            self.balance_alpha, self.strategy.reduce_stats)
            self.last_balance_loss = balance.detach()
        k = expert_ids.shape[1]
        flat = expert_ids.flatten()
        order = flat.argsort(stable=True)                                        # copies sorted by expert
        source = order // k                                                      # token of each sorted copy
        counts = torch.bincount(flat, minlength=self.n_experts)
        rows, local_counts, plan = self.experts.strategy.exchange.dispatch(tokens[source], counts, expert_ids)
        return Dispatched(x, rows, local_counts, plan, source, weights.flatten()[order], (b, s, d), balance)

    def run_experts(self, st: Dispatched) -> Dispatched:
        """The local experts on the rows dispatched to them, and the shared experts on all tokens
        (which need no communication, so they can run while the dispatch is in flight)."""
        shared = self.shared_experts(st.x) if self.shared_experts is not None else None
        return replace(st, rows=self.experts(st.rows, st.counts), shared=shared)

    def combine(self, st: Dispatched) -> torch.Tensor:
        """Send the expert outputs back, sum each token's copies weighted by their gates, add the
        shared experts. -> [b, s, d]"""
        b, s, d = st.routed_shape
        out = self.experts.strategy.exchange.combine(st.rows, st.plan).float() * st.gates.unsqueeze(-1)   # [t*k, d]
        out = torch.zeros(b * s, d, dtype=torch.float32, device=out.device) \
            .index_add_(0, st.source, out).to(st.x.dtype).view(b, s, d)
        if st.balance_loss is not None and torch.is_grad_enabled():
            out = _AttachLoss.apply(out, st.balance_loss)
        out = self.strategy.merge_tokens(out)
        if st.shared is not None:
            out = out + st.shared
        return out

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float, recenter: bool) -> None:
        """bias += gamma * sign(mean load - load): overloaded experts down, underloaded up."""
        bias = self.gate.e_score_correction_bias
        bias += gamma * torch.sign(load.mean() - load)
        if recenter:
            bias -= bias.mean()
