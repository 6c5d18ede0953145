"""GRPO objective as pure fp32 tensor functions on padded ragged batches.

Shapes: S sequences (n_prompts * G responses), T padded response length, V vocabulary.
`mask` [S, T] marks response tokens; values at padded positions are ignored (they may hold
anything, even inf).

References: GRPO, DeepSeekMath (arXiv 2402.03300); DAPO (arXiv 2503.14476): clip-higher,
token-mean aggregation, dynamic sampling; Dr. GRPO (arXiv 2503.20783): no std division,
constant-length normalisation; GSPO (arXiv 2507.18071): sequence-level ratio; RLOO
leave-one-out baseline (Ahmadian et al., arXiv 2402.14740); KL estimators k1/k2/k3 from
J. Schulman, "Approximating KL Divergence" (2020).
"""
from __future__ import annotations

import torch

ADVANTAGE_MODES = ("grpo", "dr_grpo", "loo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_prompts * G] or [n_prompts, G] -> fp32 [n_prompts, G]."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a baseline), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.detach().float().reshape(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, mode: str = "grpo",
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-response advantage from the rewards of its group; same shape as `rewards`.

    - "grpo" (DeepSeekMath): (r - mean) / (std + eps) with the *sample* std of the group
      (Bessel-corrected, divisor G - 1), as torch.std and the common GRPO implementations.
    - "dr_grpo" (Dr. GRPO): r - mean, no std division (no difficulty bias).
    - "loo" (RLOO): r_i - mean of the other G - 1 rewards = G / (G - 1) * (r_i - mean).
    Groups whose rewards are all equal get exactly zero advantage in every mode.
    """
    r = _groups(rewards, group_size)                          # [P, G]
    mean = r.mean(dim=1, keepdim=True)                        # [P, 1]
    if mode == "grpo":
        adv = (r - mean) / (r.std(dim=1, keepdim=True) + eps)
    elif mode == "dr_grpo":
        adv = r - mean
    elif mode == "loo":
        adv = r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"advantage mode {mode!r} is not one of {ADVANTAGE_MODES}")
    adv = adv.masked_fill(~dynamic_sampling_mask(r, group_size)[:, None], 0.0)
    return adv.reshape(rewards.shape)


def dynamic_sampling_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_prompts] bool: True for groups whose rewards are not all equal (DAPO dynamic sampling
    keeps only these; the others carry zero advantage and no gradient signal)."""
    r = _groups(rewards, group_size)                          # [P, G]
    return r.amax(dim=1) != r.amin(dim=1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) for tokens sampled from the policy (Schulman):
    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0,
    unbiased, the DeepSeekMath choice). Inputs are cast to fp32; output has their shape."""
    log_ratio = logp.float() - ref_logp.float()              # log pi / pi_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"kl estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def _aggregate(values: torch.Tensor, mask: torch.Tensor, aggregation: str,
               loss_scale_tokens: float | None, norm_len: int | None) -> torch.Tensor:
    """Reduce per-token values [S, T] (zero at padding) to a scalar; `mask` is fp32 [S, T]."""
    if loss_scale_tokens is not None and aggregation != "token-mean":
        raise ValueError(f"loss_scale_tokens applies to aggregation 'token-mean' only, got {aggregation!r}")
    if aggregation == "token-mean":
        if loss_scale_tokens is None:
            return values.sum() / mask.sum().clamp(min=1.0)
        if loss_scale_tokens <= 0:
            raise ValueError(f"loss_scale_tokens must be > 0, got {loss_scale_tokens}")
        return values.sum() / float(loss_scale_tokens)
    if aggregation == "seq-mean-token-mean":
        return (values.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    if aggregation == "seq-mean-token-sum-norm":
        if not norm_len or norm_len < 1:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs norm_len >= 1 (the constant max length)")
        return (values.sum(dim=1) / norm_len).mean()
    raise ValueError(f"aggregation {aggregation!r} is not one of {AGGREGATIONS}")


def policy_loss(
    logp: torch.Tensor,                     # [S, T] log pi_theta(token), requires grad
    old_logp: torch.Tensor,                 # [S, T] log pi_old(token), from rollout
    advantages: torch.Tensor,               # [S] per sequence or [S, T] per token
    mask: torch.Tensor,                     # [S, T] bool/0-1, response tokens
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token-mean",
    ref_logp: torch.Tensor | None = None,   # [S, T] log pi_ref(token); needed when kl_beta > 0
    kl_beta: float = 0.0,
    kl_estimator: str = "k3",
    sequence_ratio: bool = False,
    loss_scale_tokens: float | None = None,
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO loss (to minimise) plus a KL penalty, and detached scalar metrics.

    Per token: r = exp(logp - old_logp); pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    (PPO clip with DAPO's decoupled low/high range); loss_t = pg + kl_beta * KL_t (DeepSeekMath
    puts the KL in the loss, not the reward).

    sequence_ratio (GSPO): s_i = exp(mean_t(logp - old_logp)) over the response tokens; each
    token uses GSPO-token's r_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], whose value is s_i and whose
    gradient is s_i * grad log pi(y_t). With aggregation "seq-mean-token-mean" this is exactly
    GSPO's gradient s_i A_i / |y_i| sum_t grad log pi(y_t); other aggregations reweight it.

    aggregation:
      "token-mean" (DAPO, default): sum over all tokens / token count; for data parallelism pass the
          global token count of the whole batch as `loss_scale_tokens` so rank losses sum correctly.
      "seq-mean-token-mean" (DeepSeekMath GRPO): mean over each sequence's tokens, then over sequences.
      "seq-mean-token-sum-norm" (Dr. GRPO): sum over each sequence's tokens / `norm_len` (a constant,
          e.g. the max response length), then mean over sequences.

    Metrics (detached 0-dim fp32 tensors, means over response tokens): clip_frac_low (A < 0 and
    r < 1 - clip_low), clip_frac_high (A > 0 and r > 1 + clip_high), ratio_mean, ratio_max,
    pg_loss (surrogate alone, same aggregation), kl (estimator mean; when ref_logp is given).
    """
    if kl_beta and ref_logp is None:
        raise ValueError("kl_beta > 0 needs ref_logp (the reference model's log-probs)")
    m = mask.bool()
    mf = m.float()
    # Zero the padding first: inf/nan there would otherwise leak through exp() into the gradient.
    logp = logp.float().masked_fill(~m, 0.0)
    old_logp = old_logp.detach().float().masked_fill(~m, 0.0)
    adv = advantages.detach().float()
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand_as(logp).masked_fill(~m, 0.0)   # [S, T]

    log_ratio = logp - old_logp                                                   # [S, T]
    if sequence_ratio:
        seq_log_ratio = log_ratio.sum(dim=1) / mf.sum(dim=1).clamp(min=1.0)       # [S]
        log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()
    ratio = torch.exp(log_ratio)                                                  # [S, T]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(-adv * ratio, -adv * clipped) * mf                         # [S, T]

    token_loss = pg
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.detach().float().masked_fill(~m, 0.0), kl_estimator) * mf
        if kl_beta:
            token_loss = pg + kl_beta * kl
    loss = _aggregate(token_loss, mf, aggregation, loss_scale_tokens, norm_len)

    with torch.no_grad():
        n = mf.sum().clamp(min=1.0)
        r = ratio.detach()
        metrics = {
            "clip_frac_low": (((adv < 0) & (r < 1.0 - clip_low)) & m).sum() / n,
            "clip_frac_high": (((adv > 0) & (r > 1.0 + clip_high)) & m).sum() / n,
            "ratio_mean": (r * mf).sum() / n,
            "ratio_max": (r * mf).max(),
            "pg_loss": _aggregate(pg.detach(), mf, aggregation, loss_scale_tokens, norm_len),
        }
        if kl is not None:
            metrics["kl"] = kl.detach().sum() / n
    return loss, metrics


@torch.no_grad()
def token_entropy(logits: torch.Tensor, mask: torch.Tensor, chunk_size: int = 512) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distribution over response tokens, a detached 0-dim
    fp32 tensor. logits [S, T, V], mask [S, T]. Works on `chunk_size` positions at a time so only
    one fp32 softmax chunk exists at once: H = logsumexp(z) - sum softmax(z) * z."""
    m = mask.bool()
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[1], chunk_size):
        z = logits[:, start:start + chunk_size].float()                           # [S, c, V]
        lse = torch.logsumexp(z, dim=-1)                                          # [S, c]
        h = lse - (torch.exp(z - lse[..., None]) * z).sum(dim=-1)                 # [S, c]
        total += h.masked_fill(~m[:, start:start + chunk_size], 0.0).sum()
    return total / m.sum().clamp(min=1)
