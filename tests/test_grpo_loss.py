"""GRPO loss core against hand-computed values: advantages, KL estimators, clipped surrogate,
aggregation modes on a ragged batch, clip fractions, GSPO, gradients, data-parallel scaling."""
from __future__ import annotations

import math
import random

import pytest
import torch

from megads.rl import dynamic_sampling_mask, group_advantages, kl_penalty, policy_loss, token_entropy

LENS = (2, 3, 5)            # the ragged batch: 3 sequences padded to T = 5
T = 5


def ragged(rows: list[list[float]], pad: float) -> torch.Tensor:
    """[S, T] fp32 from ragged rows, padded with `pad` (garbage that must be ignored)."""
    return torch.tensor([row + [pad] * (T - len(row)) for row in rows], dtype=torch.float32)


def response_mask(lens=LENS) -> torch.Tensor:
    return torch.tensor([[t < n for t in range(T)] for n in lens])


# ---------------------------------------------------------------- advantages

REWARDS = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.1, 0.1, 0.1, 0.1]])   # group 2 has zero spread


def test_grpo_advantages_sample_std():
    # mean 3, deviations [-2, -1, 0, 3], sample std sqrt(14 / 3) = 2.1602469
    expected = torch.tensor([[-0.9258201, -0.4629100, 0.0, 1.3887301], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "grpo"), expected, atol=1e-5, rtol=0)
    flat = group_advantages(REWARDS.flatten(), 4)              # flat input keeps its shape
    assert flat.shape == (8,)
    torch.testing.assert_close(flat, expected.flatten(), atol=1e-5, rtol=0)


def test_dr_grpo_advantages():
    expected = torch.tensor([[-2.0, -1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "dr_grpo"), expected, atol=1e-6, rtol=0)


def test_leave_one_out_advantages():
    # r_i - mean(others): 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3
    expected = torch.tensor([[-8 / 3, -4 / 3, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "loo"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "loo"])
def test_zero_spread_groups_get_exactly_zero(mode):
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3])
    assert torch.equal(group_advantages(rewards, 3, mode), torch.zeros(9))


def test_dynamic_sampling_mask():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert dynamic_sampling_mask(rewards, 4).tolist() == [True, False, False]


def test_advantage_errors():
    with pytest.raises(ValueError, match="mode 'ppo'"):
        group_advantages(REWARDS, 4, "ppo")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(REWARDS, 1)


# ---------------------------------------------------------------- KL estimators

def test_kl_estimators_acceptance():
    logp, ref = torch.full((3,), -1.0), torch.tensor([0.0, -15.0, -30.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([-1.0, 14.0, 29.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 98.0, 420.5]), atol=1e-4, rtol=0)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([0.7183, 13.0, 28.0]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


# ---------------------------------------------------------------- aggregation on a ragged batch

def test_aggregation_modes_on_ragged_batch():
    # ratio 1 everywhere, so the per-token loss is -A; padding holds garbage (huge log-probs, A = 100)
    old = ragged([[-1.0, -2.0], [-0.5, -1.5, -3.0], [-1.0, -1.0, -2.0, -0.1, -0.7]], pad=-1e4)
    logp = ragged([[-1.0, -2.0], [-0.5, -1.5, -3.0], [-1.0, -1.0, -2.0, -0.1, -0.7]], pad=1e4)
    adv = ragged([[1.0, 2.0], [3.0, -1.0, 4.0], [0.5, 0.5, -2.0, 1.0, 2.0]], pad=100.0)
    # sequence sums of -A: -3, -6, -2; 10 tokens
    cases = {
        "token-mean": -11 / 10,
        "seq-mean-token-mean": (-3 / 2 - 6 / 3 - 2 / 5) / 3,      # -1.3
        "seq-mean-token-sum-norm": (-3 / 8 - 6 / 8 - 2 / 8) / 3,  # norm_len 8: -11/24
    }
    for aggregation, expected in cases.items():
        loss, metrics = policy_loss(logp, old, adv, response_mask(), aggregation=aggregation, norm_len=8)
        assert loss.item() == pytest.approx(expected, abs=1e-6), aggregation
        assert metrics["ratio_mean"].item() == pytest.approx(1.0)
        assert metrics["clip_frac_low"].item() == 0.0 and metrics["clip_frac_high"].item() == 0.0


def reference_loss(logp, old, ref, adv, lens, clip_low, clip_high, beta, aggregation, norm_len):
    """Plain-Python GRPO loss with the k3 KL, token by token."""
    per_seq = []
    for i, n in enumerate(lens):
        values = []
        for t in range(n):
            r = math.exp(logp[i][t] - old[i][t])
            pg = max(-adv[i] * r, -adv[i] * min(max(r, 1 - clip_low), 1 + clip_high))
            d = ref[i][t] - logp[i][t]
            values.append(pg + beta * (math.exp(d) - d - 1))
        per_seq.append(values)
    if aggregation == "token-mean":
        return sum(map(sum, per_seq)) / sum(lens)
    if aggregation == "seq-mean-token-mean":
        return sum(sum(v) / len(v) for v in per_seq) / len(lens)
    return sum(sum(v) / norm_len for v in per_seq) / len(lens)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_with_clipping_and_kl_matches_plain_python(aggregation):
    rng = random.Random(0)
    logp = [[rng.uniform(-3.0, -0.1) for _ in range(n)] for n in LENS]
    old = [[x + rng.uniform(-0.5, 0.5) for x in row] for row in logp]              # ratios 0.6 .. 1.65
    ref = [[x + rng.uniform(-1.0, 1.0) for x in row] for row in logp]
    adv = [1.5, -0.7, 0.4]
    loss, metrics = policy_loss(ragged(logp, 0.0), ragged(old, 0.0), torch.tensor(adv), response_mask(),
                                clip_low=0.2, clip_high=0.28, aggregation=aggregation,
                                ref_logp=ragged(ref, 0.0), kl_beta=0.05, norm_len=7)
    expected = reference_loss(logp, old, ref, adv, LENS, 0.2, 0.28, 0.05, aggregation, 7)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    kl_mean = sum(math.exp(r - p) - (r - p) - 1 for pr, rr in zip(logp, ref) for p, r in zip(pr, rr)) / 10
    assert metrics["kl"].item() == pytest.approx(kl_mean, abs=1e-5)


# ---------------------------------------------------------------- clipping and gradients

CLIP_LOW, CLIP_HIGH = 0.2, 0.28
RATIOS = [[1.5, 0.5], [0.5, 1.5, 1.0], [1.2, 1.29, 1.27, 0.7, 1.0]]
ADV = [1.0, -1.0, 2.0]
CLIPPED = [[True, False], [True, False, False], [False, True, False, False, False]]


def crafted_batch():
    old = ragged([[-1.0] * n for n in LENS], pad=-1.0)
    logp = (old + torch.log(ragged(RATIOS, pad=5.0))).requires_grad_(True)   # padding ratio 5, A > 0
    return logp, old, torch.tensor(ADV)


def test_clip_fractions():
    logp, old, adv = crafted_batch()
    loss, metrics = policy_loss(logp, old, adv, response_mask(), CLIP_LOW, CLIP_HIGH)
    # high: 1.5 (A=+1) and 1.29 (A=+2); low: 0.5 (A=-1). 0.5 with A>0 and 1.5 with A<0 are not clipped.
    assert metrics["clip_frac_high"].item() == pytest.approx(2 / 10)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 10)
    assert metrics["ratio_mean"].item() == pytest.approx(10.46 / 10, abs=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(1.5, abs=1e-6)
    # tokens: -1.28, -0.5 | 0.8, 1.5, 1.0 | -2.4, -2.56, -2.54, -1.4, -2.0  -> sum -9.38
    assert loss.item() == pytest.approx(-9.38 / 10, abs=1e-5)
    assert "kl" not in metrics


def test_token_mean_gradient_is_minus_a_r_over_n_where_unclipped():
    logp, old, adv = crafted_batch()
    loss, _ = policy_loss(logp, old, adv, response_mask(), CLIP_LOW, CLIP_HIGH)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = [[0.0 if CLIPPED[i][t] else -ADV[i] * RATIOS[i][t] / 10 for t in range(n)]
                for i, n in enumerate(LENS)]
    torch.testing.assert_close(grad, ragged(expected, 0.0), atol=1e-6, rtol=0)


def test_gspo_sequence_ratio_value_and_gradient():
    deltas = [[0.1, 0.3], [-0.2, 0.2, -0.3], [0.5] * 5]      # means 0.2, -0.1, 0.5
    old = ragged([[-2.0] * n for n in LENS], pad=0.0)
    logp = (old + ragged(deltas, pad=50.0)).requires_grad_(True)
    adv = torch.tensor(ADV)
    loss, metrics = policy_loss(logp, old, adv, response_mask(), CLIP_LOW, CLIP_HIGH,
                                aggregation="seq-mean-token-mean", sequence_ratio=True)
    s = [math.exp(0.2), math.exp(-0.1), math.exp(0.5)]      # 1.2214, 0.9048, 1.6487 (clipped at 1.28)
    # per sequence: -1 * s0, +1 * s1, -2 * 1.28
    assert loss.item() == pytest.approx((-s[0] + s[1] - 2 * 1.28) / 3, abs=1e-6)
    assert metrics["ratio_mean"].item() == pytest.approx((2 * s[0] + 3 * s[1] + 5 * s[2]) / 10, abs=1e-6)
    assert metrics["clip_frac_high"].item() == pytest.approx(5 / 10)
    (grad,) = torch.autograd.grad(loss, logp)
    # GSPO: d/dlogp_t [-A_i s_i] / S = -A_i s_i / (S |y_i|) through the mean; zero for the clipped sequence
    expected = [[-ADV[0] * s[0] / (3 * 2)] * 2, [-ADV[1] * s[1] / (3 * 3)] * 3, [0.0] * 5]
    torch.testing.assert_close(grad, ragged(expected, 0.0), atol=1e-6, rtol=0)


def test_kl_gradient_in_loss():
    logp = ragged([[-1.0, -2.0], [-0.5, -1.5, -3.0], [-1.0] * 5], pad=0.0).requires_grad_(True)
    ref = ragged([[-1.5, -1.0], [-0.5, -2.5, -2.0], [-2.0] * 5], pad=0.0)
    beta = 0.1
    loss, _ = policy_loss(logp, logp.detach(), torch.zeros(3), response_mask(),
                          ref_logp=ref, kl_beta=beta)            # A = 0: only the KL term
    (grad,) = torch.autograd.grad(loss, logp)
    lp, rf = logp.detach().tolist(), ref.tolist()
    # d k3 / d logp = 1 - exp(ref - logp)
    expected = [[beta * (1 - math.exp(rf[i][t] - lp[i][t])) / 10 for t in range(n)] for i, n in enumerate(LENS)]
    torch.testing.assert_close(grad, ragged(expected, 0.0), atol=1e-6, rtol=0)


def test_loss_scale_tokens_makes_data_parallel_shards_sum_to_full_batch():
    torch.manual_seed(0)
    lens = (1, 4, 2, 5)
    mask = response_mask(lens)
    logp = (-torch.rand(4, T) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(4, T)
    ref = logp.detach() + 0.3 * torch.randn(4, T)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    kwargs = dict(clip_low=0.2, clip_high=0.28, ref_logp=ref, kl_beta=0.04)
    full, _ = policy_loss(logp, old, adv, mask, **kwargs)
    halves = [policy_loss(logp[sl], old[sl], adv[sl], mask[sl], **{**kwargs, "ref_logp": ref[sl]},
                          loss_scale_tokens=12)[0] for sl in (slice(0, 2), slice(2, 4))]   # 5 + 7 tokens
    assert (halves[0] + halves[1]).item() == pytest.approx(full.item(), abs=1e-6)
    g_full, = torch.autograd.grad(full, logp)
    g_halves, = torch.autograd.grad(halves[0] + halves[1], logp)
    torch.testing.assert_close(g_halves, g_full, atol=1e-7, rtol=0)


def test_policy_loss_errors():
    logp, old, adv = crafted_batch()
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(logp, old, adv, response_mask(), kl_beta=0.1)
    with pytest.raises(ValueError, match="norm_len"):
        policy_loss(logp, old, adv, response_mask(), aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean' only"):
        policy_loss(logp, old, adv, response_mask(), aggregation="seq-mean-token-mean", loss_scale_tokens=10)
    with pytest.raises(ValueError, match="'sum'"):
        policy_loss(logp, old, adv, response_mask(), aggregation="sum")


# ---------------------------------------------------------------- entropy

def test_token_entropy_chunked_matches_plain_python():
    torch.manual_seed(1)
    logits = torch.randn(3, T, 7) * 2
    logits[0, 2:] = float("inf")                              # padding garbage
    mask = response_mask()
    entropies = []
    for i, n in enumerate(LENS):
        for t in range(n):
            z = logits[i, t].tolist()
            p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
            entropies.append(-sum(q * math.log(q) for q in p))
    expected = sum(entropies) / len(entropies)
    for chunk in (1, 2, 512):
        assert token_entropy(logits, mask, chunk_size=chunk).item() == pytest.approx(expected, abs=1e-5)
    uniform = token_entropy(torch.zeros(2, 4, 16), torch.ones(2, 4))
    assert uniform.item() == pytest.approx(math.log(16), abs=1e-6)
