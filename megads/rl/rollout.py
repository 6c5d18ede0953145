"""Batched autoregressive generation with MLA's latent KV cache, on the training ranks.

Prompts are right-padded and prefilled together; then every step feeds one token per sequence
at that sequence's own position, so a finished sequence of prompt + response is laid out
exactly as the training forward sees it (positions 0.., causal) and the recorded sampling
log-probabilities and expert choices line up with the training batch token for token.

Sampling is inverse-CDF with one uniform number per sequence and step, drawn for the whole
global batch from a generator seeded by (seed, batch index) and sliced by this rank's
offset: the tokens sampled do not depend on the parallel layout. Under DP / EP every rank
runs the same number of forwards (the loop stops when all ranks' sequences are done), as
expert all-to-alls require; TP ranks hold the same sequences and gather the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megads.model.deepseek_v3 import DeepSeekV3
from megads.parallel.mesh import Mesh
from megads.parallel.tensor import gather_vocab
from megads.rl.policy import capture_routes


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0        # 0: greedy
    top_p: float = 1.0


@dataclass
class Rollout:
    """n sequences of prompt + response (+ eos), right-padded to length L."""

    tokens: torch.Tensor            # [n, L] int64
    prompt_lens: torch.Tensor       # [n]
    response_lens: torch.Tensor     # [n] sampled tokens, eos included
    mask: torch.Tensor              # [n, L-1] bool: target tokens[:, 1:] that were sampled
    logprobs: torch.Tensor          # [n, L-1] fp32 log-prob each target was sampled with (0 elsewhere)
    routes: dict[str, torch.Tensor]  # MoE layer -> [n, L-1, k] experts chosen for the inputs tokens[:, :-1]

    def responses(self) -> list[list[int]]:
        return [self.tokens[i, p:p + r].tolist() for i, (p, r) in
                enumerate(zip(self.prompt_lens.tolist(), self.response_lens.tolist()))]

    def select(self, rows: slice) -> "Rollout":
        return Rollout(self.tokens[rows], self.prompt_lens[rows], self.response_lens[rows], self.mask[rows],
                       self.logprobs[rows], {k: v[rows] for k, v in self.routes.items()})


def sample_tokens(logits: torch.Tensor, uniform: torch.Tensor | None, params: SamplingParams
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] -> tokens [n] and their log-probs [n] under softmax(logits / temperature).

    Nucleus (top-p): the smallest set of most likely tokens whose mass reaches top_p, renormalised;
    a token is drawn from it by inverse CDF with `uniform` [n] in [0, 1). Greedy when
    temperature is 0 (log-probs then of the untempered distribution)."""
    logits = logits.float()
    if params.temperature == 0 or uniform is None:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = F.log_softmax(logits / params.temperature, dim=-1)
    probs, order = logp.exp().sort(dim=-1, descending=True)                    # [n, V]
    if params.top_p < 1.0:
        before = probs.cumsum(-1) - probs                                       # mass of more likely tokens
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniform.to(cdf) * cdf[:, -1])[:, None], right=True)
    tokens = order.gather(-1, pick.clamp(max=cdf.shape[-1] - 1)).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class UniformStream:
    """One uniform number per sequence of the global batch and generation step; a rank reads
    its slice [offset, offset + n)."""

    def __init__(self, seed: int, global_size: int, offset: int, device: torch.device):
        self.generator = torch.Generator().manual_seed(seed)
        self.global_size, self.offset, self.device = global_size, offset, device

    def next(self, n: int) -> torch.Tensor:
        u = torch.rand(self.global_size, generator=self.generator, dtype=torch.float64)
        return u[self.offset:self.offset + n].to(self.device)


def _any_active(done: torch.Tensor, mesh: Mesh) -> bool:
    active = (~done).any().float().reshape(1)
    if mesh.world_size > 1:
        dist.all_reduce(active, op=dist.ReduceOp.MAX)
    return bool(active.item())


@torch.no_grad()
def generate(model: DeepSeekV3, prompts: list[list[int]], params: SamplingParams, eos_id: int, pad_id: int,
             mesh: Mesh, uniforms: UniformStream | None = None, dtype: torch.dtype = torch.float32) -> Rollout:
    """Generate one response per prompt (repeat a prompt G times for a group). Collective over
    the world: every rank calls it once per batch, with its own prompts."""
    device = model.lm_head.weight.device
    n = len(prompts)
    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(prompt_lens.max())
    total = longest + params.max_new_tokens
    tokens = torch.full((n, total), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, device=device)
    logprobs = torch.zeros(n, total, device=device)
    sampled = torch.zeros(n, total, dtype=torch.bool, device=device)
    cache = model.new_cache(n, total, device, dtype)
    rows = torch.arange(n, device=device)
    with capture_routes(model) as captured:
        routes = {}
        positions = torch.arange(longest, device=device).expand(n, -1)
        logits = model.decode(tokens[:, :longest], positions, cache)[rows, prompt_lens - 1]   # [n, V/tp]
        for name, ids in captured.items():
            routes[name] = ids.new_zeros(n, total, ids.shape[-1])
            routes[name][:, :longest] = ids.view(n, longest, -1)
        write = prompt_lens.clone()                 # where each sequence's next token goes
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for _ in range(params.max_new_tokens):
            uniform = uniforms.next(n) if uniforms is not None else None
            new, logp = sample_tokens(gather_vocab(logits, mesh), uniform, params)
            active = ~done
            tokens[rows[active], write[active]] = new[active]
            logprobs[rows[active], write[active]] = logp[active]
            sampled[rows[active], write[active]] = True
            done = done | (new == eos_id) | (write + 1 >= total)
            if not _any_active(done, mesh):
                break
            fed = tokens[rows, write][:, None]                  # [n, 1] the token just written
            logits = model.decode(fed, write[:, None], cache)[:, 0]
            for name, ids in captured.items():
                routes[name][rows, write] = ids.view(n, -1)
            write = torch.where(done, write, write + 1)       # a finished sequence re-feeds its last token
    length = int((prompt_lens + sampled.sum(1)).max())
    return Rollout(tokens=tokens[:, :length], prompt_lens=prompt_lens, response_lens=sampled.sum(1),
                   mask=sampled[:, 1:length], logprobs=logprobs[:, 1:length],
                   routes={k: v[:, :length - 1] for k, v in routes.items()})
